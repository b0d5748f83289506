"""train.py under torchrun: several processes train one model, rank 0 writes."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import models
from conftest import FAST, ROOT, whole_script, write_cifar10

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch was built without gloo",
)


def torchrun_command(*args, processes=2):
    whole_script()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        str(ROOT / "train.py"),
        *map(str, args),
    ]


def torchrun(*args, processes=2, timeout=600):
    return subprocess.run(
        torchrun_command(*args, processes=processes), capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


@pytest.fixture(scope="module")
def easy_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    write_cifar10(root / "data", per_class_train=12, per_class_test=6)  # 120 train images
    return root / "data"


@pytest.mark.slow
def test_two_processes_train_one_model_and_rank_zero_writes_once(easy_cifar, tmp_path):
    """Every process ends each stage with the same weights (one model, not two), and only rank 0 writes."""
    digests = tmp_path / "digests"
    digests.mkdir()
    command = torchrun_command(
        digests, "--data-dir", easy_cifar, "--out-dir", tmp_path, *FAST, "--epochs", "15,2,2", "--val-size", "0"
    )
    command[command.index(str(ROOT / "train.py"))] = str(ROOT / "tests" / "ddp_replicas.py")
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    replicas = [json.loads((digests / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(replicas[0]) == 3 and replicas[0] == replicas[1]
    assert result.stdout.count("results (cifar10") == 1 and result.stdout.count("== teacher:") == 1
    folder = tmp_path / "cifar10"
    for stage, epochs in (("teacher", 15), ("student", 2), ("distilled", 2)):
        assert not (folder / f"{stage}.last.pt").exists()
        log = [json.loads(line) for line in (folder / f"{stage}.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == list(range(1, epochs + 1))  # one writer, one line per epoch
        assert all(r["images"] == 7 * 16 for r in log)  # both halves of 7 batches of 16 are counted
    assert set(json.loads((folder / "results.json").read_text())["stages"]) == {"teacher", "student", "distilled"}
    assert checkpoint.load(folder / "teacher.pt")["metrics"]["test_acc"] > 0.5  # the easy data is learnt


@pytest.mark.slow
def test_a_signal_stops_the_job_at_the_end_of_an_epoch_and_resume_goes_on(easy_cifar, tmp_path):
    args = ["--data-dir", easy_cifar, "--out-dir", tmp_path, *FAST, "--stages", "teacher", "--epochs", "40"]
    log = tmp_path / "cifar10" / "teacher.last.jsonl"  # the log of the stage in progress
    job = subprocess.Popen(torchrun_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while (
        not (log.exists() and len(log.read_text().splitlines()) >= 2) and job.poll() is None and time.time() < deadline
    ):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=300)
    assert "stopped by SIGTERM; progress is saved" in stderr, stderr[-3000:]
    state = torch.load(tmp_path / "cifar10" / "teacher.last.pt", weights_only=True)
    done = len(log.read_text().splitlines())
    assert (
        state["progress"]["epoch"] == done + 1 and state["progress"]["step"] == 0 and done < 40
    )  # saved at the end of an epoch

    result = torchrun(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at epoch {done + 1}, step 0" in result.stdout
    finished = (tmp_path / "cifar10" / "teacher.jsonl").read_text().splitlines()  # the saved stage's log
    assert [json.loads(line)["epoch"] for line in finished] == list(range(1, 41)) and not log.exists()


@pytest.mark.slow
def test_a_batch_that_does_not_split_evenly_is_refused(easy_cifar, tmp_path):
    result = torchrun("--data-dir", easy_cifar, "--out-dir", tmp_path, *FAST, "--batch-size", "15")
    assert result.returncode != 0
    assert "argument --batch-size: 15 does not split evenly over the 2 processes" in result.stderr
    assert 'Traceback (most recent call last):\n  File "' + str(ROOT / "train.py") not in result.stderr


@pytest.mark.slow
def test_a_brought_teacher_distils_under_torchrun(easy_cifar, tmp_path):
    """Every process loads the --teacher-checkpoint file, and the distilled student names that file's digest."""
    teacher_file = tmp_path / "teacher_weights.pt"
    torch.save(models.build("airnet_s", 10).state_dict(), teacher_file)  # a bare state dict of --teacher
    result = torchrun("--data-dir", easy_cifar, "--out-dir", tmp_path, *FAST, "--stages", "distilled",
                      "--teacher-checkpoint", teacher_file)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "cifar10"
    assert not (folder / "teacher.pt").exists()
    assert checkpoint.load(folder / "distilled.pt")["teacher_digest"] == checkpoint.file_digest(teacher_file)
    rows = json.loads((folder / "results.json").read_text())["stages"]
    assert rows["teacher"]["method"] == "brought" and rows["distilled"]["method"] == "kd"
