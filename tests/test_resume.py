"""Interruption, resume, divergence and atomic writes, run as a user would."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import datafiles
import models
import report
from conftest import FAST, ROOT, assert_one_line_error, run_script, whole_script, write_cifar10

# enough epochs on tiny data that a stage is still running when the first .last.pt appears
SLOW = [*FAST, "--stages", "teacher", "--epochs", "12", "--teacher", "airnet_xs", "--deterministic"]


@pytest.fixture
def tiny_cifar(tmp_path):
    write_cifar10(tmp_path / "data", per_class_train=8, per_class_test=2)
    return tmp_path / "data"


def start(data_dir, out, *extra):
    whole_script()
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(out),
        *SLOW,
        *extra,
    ]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no progress file appeared"
        time.sleep(0.01)


def kill_after_first_epoch(data_dir, out, *extra):
    """Start the slow teacher run and SIGKILL it once its first .last.pt is written."""
    process = start(data_dir, out, *extra)
    wait_for(out / "cifar10" / "teacher.last.pt", process)
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    """The weights of an uninterrupted deterministic run on the same tiny data."""
    root = tmp_path_factory.mktemp("reference")
    write_cifar10(root / "data", per_class_train=8, per_class_test=2)
    reference = run_script("train.py", "--data-dir", root / "data", "--out-dir", root / "out", *SLOW)
    assert reference.returncode == 0, reference.stderr[-2000:]
    return checkpoint.load(root / "out" / "cifar10" / "teacher.pt")["state_dict"]


def assert_same_weights(expected, path):
    got = checkpoint.load(path)["state_dict"]
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ"


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_cifar, tmp_path, reference_weights):
    out = tmp_path / "killed"
    kill_after_first_epoch(tiny_cifar, out)
    assert not (out / "cifar10" / "teacher.pt").exists(), "the stage finished before it could be killed"
    saved = torch.load(out / "cifar10" / "teacher.last.pt", weights_only=True)
    assert 1 < saved["progress"]["epoch"] <= 12
    done = saved["progress"]["epoch"] - 1
    commit = report.git_commit()[0]  # this code's commit, or None outside a checkout
    other = {"git_commit": commit, "git_dirty": True, "git_diff": "0123456789ab"}
    for record in saved["progress"]["log"]:  # as if this commit with other uncommitted changes had trained them
        record.update(other)
    torch.save(saved, out / "cifar10" / "teacher.last.pt")

    again = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", out, *SLOW)
    assert_one_line_error(again, "teacher.last.pt", "--resume", code=2)  # not silently overwritten

    resumed = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", out, *SLOW, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch" in resumed.stdout
    assert "nothing to resume" not in resumed.stdout
    assert not (out / "cifar10" / "teacher.last.pt").exists()
    assert_same_weights(reference_weights, out / "cifar10" / "teacher.pt")
    log = (out / "cifar10" / "teacher.jsonl").read_text().splitlines()
    assert len(log) == 12
    metrics = checkpoint.load(out / "cifar10" / "teacher.pt")["metrics"]
    assert metrics["earlier_code"] == [{**other, "first_epoch": 1, "last_epoch": done}]
    diffs = [json.loads(line)["git_diff"] for line in log]
    assert diffs == ["0123456789ab"] * done + [metrics["git_diff"]] * (12 - done)
    this_code = report.commit_text(metrics["git_commit"], metrics["git_dirty"], metrics["git_diff"])
    other_code = report.commit_text(commit, True, "0123456789ab")
    line = f"resumed under other code: teacher (epochs 1-{done} at {other_code}, the rest at {this_code})"
    assert line in resumed.stdout and line in (out / "cifar10" / "results.md").read_text()


@pytest.mark.slow
def test_a_stopped_fresh_run_keeps_the_finished_stage_and_its_log(tiny_cifar, tmp_path):
    finished = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", tmp_path, *FAST, "--stages", "teacher")
    assert finished.returncode == 0, finished.stderr[-2000:]
    folder = tmp_path / "cifar10"
    before = {name: (folder / name).read_bytes() for name in ("teacher.pt", "teacher.jsonl")}
    kill_after_first_epoch(tiny_cifar, tmp_path, "--fresh")  # retraining it, with other settings
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert json.loads((folder / "teacher.last.jsonl").read_text().splitlines()[0])["epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_progress_and_exits_with_its_code(tiny_cifar, tmp_path, reference_weights, signum, code):
    out = tmp_path / "out"
    process = start(tiny_cifar, out)
    wait_for(out / "cifar10" / "teacher.last.pt", process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    state = torch.load(out / "cifar10" / "teacher.last.pt", weights_only=True)
    assert state["stage"] == "teacher" and state["progress"]["epoch"] >= 1
    done, mid_epoch = state["progress"]["epoch"] - 1, state["progress"]["sums"] is not None
    outside = {"git_commit": None, "git_dirty": None, "git_diff": None}
    for record in state["progress"]["log"]:  # as if logged outside a git checkout
        record.update(outside)
    if mid_epoch:  # and the epoch in progress begun by other code
        state["progress"]["sums"]["code"] = {"git_commit": "e" * 40, "git_dirty": True, "git_diff": None}
    torch.save(state, out / "cifar10" / "teacher.last.pt")
    resumed = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", out, *SLOW, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = checkpoint.load(out / "cifar10" / "teacher.pt")["metrics"]
    assert metrics["epochs"] == 12
    unknown = [{**outside, "first_epoch": 1, "last_epoch": done}]
    begun = [{"git_commit": "e" * 40, "git_dirty": True, "git_diff": None, "first_epoch": done + 1,
              "last_epoch": done + 1}]  # fmt: skip
    assert metrics["earlier_code"] == (unknown if done else []) + (begun if mid_epoch else [])
    # usually stopped mid-epoch: the saved order, running sums and generator state carry the run on exactly
    assert_same_weights(reference_weights, out / "cifar10" / "teacher.pt")


@pytest.mark.slow
def test_an_unfinished_stage_passed_as_a_finished_one_points_at_resume(tiny_cifar, tmp_path):
    kill_after_first_epoch(tiny_cifar, tmp_path)
    last = tmp_path / "cifar10" / "teacher.last.pt"
    result = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", tmp_path / "other", *FAST,
                        "--stages", "distilled", "--teacher", "airnet_xs", "--teacher-checkpoint", last)  # fmt: skip
    expected = ("the resume file of an unfinished teacher stage, not a finished checkpoint; finish the stage with "
                "train.py --resume and pass the teacher.pt it saves")  # fmt: skip
    assert_one_line_error(result, f"argument --teacher-checkpoint: {last}: {expected}", code=2)
    result = run_script("predict.py", "--checkpoint", last, tiny_cifar)  # predict.py and export.py read it alike
    assert_one_line_error(result, f"{last}: {expected}", code=2)


@pytest.mark.slow
def test_resume_with_nothing_to_resume_says_so_and_trains_from_the_start(tiny_cifar, tmp_path):
    result = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", tmp_path, *FAST, "--stages", "teacher",
                        "--resume")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "cifar10"
    line = f"nothing to resume for teacher (no {folder / 'teacher.last.pt'}); training it from the start"
    assert line in result.stdout
    assert (folder / "teacher.pt").exists()


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(tiny_cifar, tmp_path):
    out = tmp_path / "out"
    kill_after_first_epoch(tiny_cifar, out)
    result = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", out, *SLOW, "--resume", "--lr", "0.01")
    assert_one_line_error(result, "other settings", "--lr", code=2)
    result = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", out, *SLOW, "--resume", "--no-flip")
    assert_one_line_error(result, "other settings", "--flip", code=2)

    last = out / "cifar10" / "teacher.last.pt"
    state = torch.load(last, weights_only=True)
    torch.save({**state, "device": "cuda"}, last)  # as if started on a GPU machine
    result = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", out, *SLOW, "--resume")
    assert_one_line_error(result, "started on cuda", "--device cuda", code=2)


@pytest.mark.slow
def test_signals_sent_back_to_back_stop_without_a_traceback(tiny_cifar, tmp_path):
    out = tmp_path / "out"
    process = start(tiny_cifar, out)
    wait_for(out / "cifar10" / "teacher.last.pt", process)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    torch.load(out / "cifar10" / "teacher.last.pt", weights_only=True)  # whatever was saved is intact


SIGNAL_WHEN_CALLED = """
import os, runpy, signal, sys
module, function, script = sys.argv[1:4]
sys.argv = sys.argv[3:]
sys.path.insert(0, os.path.dirname(script))
target = __import__(module)
original = getattr(target, function)

def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return original(*args, **kwargs)

setattr(target, function, signalled)
runpy.run_path(script, run_name="__main__")
"""


def interrupt_when(module, function, *args):
    """Run train.py with `args`, sending it SIGINT as `module.function` is called: at a known point, not a moment."""
    whole_script()
    command = [sys.executable, "-c", SIGNAL_WHEN_CALLED, module, function, str(ROOT / "train.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_outside_the_training_steps_exits_130_keeping_what_is_saved(tiny_cifar, tmp_path):
    args = ["--data-dir", tiny_cifar, "--out-dir", tmp_path, *FAST, "--stages", "teacher"]
    typed = f"python3 {shlex.quote(str(ROOT / 'train.py'))} {shlex.join(map(str, args))}"  # the script as typed
    folder = tmp_path / "cifar10"
    saving = interrupt_when("checkpoint", "save", *args)  # as the finished stage is saved: saved, then stopped
    assert_one_line_error(saving, "stopped by SIGINT; progress is saved. Continue with:", "--resume", code=130)
    assert (folder / "teacher.pt").exists() and not (folder / "teacher.last.pt").exists()
    saved = (folder / "teacher.pt").read_bytes()
    reporting = interrupt_when("report", "write_results", *args)  # at once; the stage was kept, not trained
    assert_one_line_error(reporting, f"stopped at once by SIGINT; nothing was trained yet. Run it again with: {typed}",
                          code=130)  # fmt: skip
    assert not (folder / "results.md").exists()
    loading = interrupt_when("data", "load", *args, "--fresh")  # as typed: --resume would keep what --fresh retrains
    assert_one_line_error(loading, f"stopped at once by SIGINT; nothing was trained yet. Run it again with: {typed} "
                          "--fresh", code=130)  # fmt: skip
    assert (folder / "teacher.pt").read_bytes() == saved


@pytest.mark.slow
def test_a_fresh_retrain_stopped_part_way_goes_on_as_a_retrain(tiny_cifar, tmp_path):
    args = ["--data-dir", tiny_cifar, "--out-dir", tmp_path, *FAST, "--stages", "teacher"]
    assert run_script("train.py", *args).returncode == 0
    folder = tmp_path / "cifar10"
    old = (folder / "teacher.pt").read_bytes()
    stopped = interrupt_when("data", "train_batches", *args, "--fresh")  # after the first step of the retrain
    script = shlex.quote(str(ROOT / "train.py"))  # as typed
    go_on = f"python3 {script} {shlex.join(map(str, args[:-2]))} --stages teacher --fresh --resume"
    assert_one_line_error(stopped, f"stopped by SIGINT; progress is saved. Continue with: {go_on}", code=130)
    assert (folder / "teacher.last.pt").exists() and (folder / "teacher.pt").read_bytes() == old
    # plain --resume would have kept the old teacher.pt and left the retrain's progress behind
    resumed = run_script("train.py", *shlex.split(go_on)[2:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch 1, step 1" in resumed.stdout and "skipping" not in resumed.stdout
    assert not (folder / "teacher.last.pt").exists() and (folder / "teacher.pt").read_bytes() != old


@pytest.mark.slow
def test_a_resume_file_that_cannot_be_read_is_not_called_corrupt(tiny_cifar, tmp_path):
    (tmp_path / "cifar10" / "teacher.last.pt").mkdir(parents=True)  # unreadable to every user, root too
    result = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", tmp_path, *FAST, "--stages", "teacher",
                        "--resume")  # fmt: skip
    assert_one_line_error(result, "teacher.last.pt: cannot read it (Is a directory)", code=2)
    assert "delete" not in result.stderr and "torch file" not in result.stderr


def replace_teacher(path):
    """Put another teacher in teacher.pt, of the same settings (as if retrained elsewhere)."""
    saved = torch.load(path, weights_only=True)
    saved["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in saved["state_dict"].items()}
    torch.save(saved, path)


@pytest.mark.slow
def test_distilled_run_is_not_resumed_against_another_teacher(tiny_cifar, tmp_path):
    out = tmp_path / "out"
    teacher = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", out, *SLOW, "--epochs", "1,12,12")
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    process = start(tiny_cifar, out, "--stages", "distilled", "--epochs", "1,12,12")
    wait_for(out / "cifar10" / "distilled.last.pt", process)
    process.kill()
    process.wait()
    replace_teacher(out / "cifar10" / "teacher.pt")
    result = run_script(
        "train.py", "--data-dir", tiny_cifar, "--out-dir", out, *SLOW, "--stages", "distilled", "--epochs", "1,12,12",
        "--resume",
    )  # fmt: skip
    assert_one_line_error(result, "distilled.last.pt", "another teacher", "--fresh", code=2)


@pytest.mark.slow
def test_teacher_whose_weights_do_not_fit_its_model_is_one_line(tiny_cifar, tmp_path):
    out = tmp_path / "out"
    teacher = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", out, *SLOW, "--epochs", "1")
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    path = out / "cifar10" / "teacher.pt"
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "state_dict": models.build("airnet_s", 10, 3).state_dict()}, path)  # an older layout
    result = run_script(
        "train.py", "--data-dir", tiny_cifar, "--out-dir", out, *FAST, "--stages", "distilled", "--teacher", "airnet_xs"
    )
    assert_one_line_error(result, "teacher.pt", "--fresh", code=1)


@pytest.mark.slow
def test_progress_whose_weights_do_not_fit_the_model_is_one_line(tiny_cifar, tmp_path):
    out = tmp_path / "out"
    kill_after_first_epoch(tiny_cifar, out)
    path = out / "cifar10" / "teacher.last.pt"
    saved = torch.load(path, weights_only=True)
    trainable = {k.replace("head.0.", "head."): v for k, v in saved["trainable"].items()}  # AirNet's older head
    torch.save({**saved, "trainable": trainable}, path)
    result = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", out, *SLOW, "--resume")
    assert_one_line_error(result, "teacher.last.pt", "do not fit", "--fresh", code=2)
    assert path.exists()  # nothing saved is lost


@pytest.mark.slow
def test_non_finite_loss_stops_with_epoch_step_and_fix(tiny_cifar, tmp_path):
    out = tmp_path / "out"
    good = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", out, *FAST, "--stages", "teacher")
    assert good.returncode == 0, good.stderr[-2000:]
    before = (out / "cifar10" / "teacher.pt").read_bytes()
    result = run_script(
        "train.py",
        "--data-dir",
        tiny_cifar,
        "--out-dir",
        out,
        *FAST,
        "--stages",
        "student",
        "--optimizer",
        "sgd",
        "--lr",
        "1e30",
        "--epochs",
        "2",
    )
    assert_one_line_error(result, "non-finite", "epoch 1, step", "--lr", code=1)
    assert (out / "cifar10" / "teacher.pt").read_bytes() == before
    checkpoint.load(out / "cifar10" / "teacher.pt")
    assert not (out / "cifar10" / "student.pt").exists()


@pytest.mark.slow
def test_unwritable_out_dir_is_reported_before_training(tiny_cifar, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    result = run_script("train.py", "--data-dir", tiny_cifar, "--out-dir", blocker, *FAST)
    assert_one_line_error(result, "--out-dir", code=2)
    assert "data:" not in result.stdout  # nothing was loaded or trained


def test_interrupted_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "teacher.pt"
    torch.save({"weights": torch.ones(3)}, path)

    def crash(*args):
        raise OSError("disk vanished between the temporary file and the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        datafiles.atomic_write(path, lambda p: torch.save({"weights": torch.zeros(3)}, p))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.pt"]  # no temporary file left behind
