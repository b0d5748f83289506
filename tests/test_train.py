import json
import math
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import config
import data
import datafiles
import distill
import models
import optim
import stages
from conftest import (
    FAST,
    assert_one_line_error,
    run_script,
    tensor_dataset,
    train_teacher,
    write_cifar10,
    write_cifar100,
    write_image_tree,
)


@pytest.mark.slow
def test_pipeline_end_to_end_then_skips_finished_stages(tmp_path):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    result = run_script("train.py", "--data-dir", tmp_path / "data", "--out-dir", out, *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = out / "cifar10"
    for stage in ("teacher", "student", "distilled"):
        saved = checkpoint.load(folder / f"{stage}.pt")
        assert saved["stage"] == stage and saved["classes"][0] == "airplane"
        assert saved["image_size"] == 32 and saved["in_channels"] == 3 and len(saved["mean"]) == 3
        model = checkpoint.build_model(saved)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        log = [json.loads(line) for line in (folder / f"{stage}.jsonl").read_text().splitlines()]
        assert len(log) == 1 and {"epoch", "loss", "train_acc", "val_acc", "lr", "images", "seconds"} <= set(log[0])
    results = json.loads((folder / "results.json").read_text())["stages"]
    assert set(results) == {"teacher", "student", "distilled"}
    for row in results.values():
        assert {"model", "params", "test_acc"} <= set(row) and 0 <= row["test_acc"] <= 1 and row["params"] > 0
    assert results["teacher"]["params"] > results["student"]["params"]
    table = (folder / "results.md").read_text()
    assert "| distilled | airnet_xs | kd |" in table and "| student | airnet_xs | cross-entropy |" in table
    gain = json.loads((folder / "results.json").read_text())["distillation_gain"]
    assert gain == round(100 * (results["distilled"]["test_acc"] - results["student"]["test_acc"]), 2)
    assert f"Distillation gain: {gain:+.2f} points" in table
    assert json.loads((folder / "results.json").read_text())["compression"] == {
        "skipped": "COMPRESSION_REPORT is False"
    }
    assert "Not measured: COMPRESSION_REPORT is off (`--no-compression-report`)." in table  # FAST turns it off
    source = str(tmp_path / "data" / "cifar-10-python.tar.gz")  # results name the data they were measured on
    assert all(row["data"] == source for row in results.values()) and f"\ndata: {source}\n" in table

    stamp = (folder / "teacher.pt").stat().st_mtime_ns
    again = run_script("train.py", "--data-dir", tmp_path / "data", "--out-dir", out, *FAST)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("skipping") == 3
    assert (folder / "teacher.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_distilled_alone_trains_the_missing_teacher_first(tmp_path):
    write_cifar10(tmp_path / "data", per_class_train=3, per_class_test=1)
    out = tmp_path / "out"
    result = run_script("train.py", "--data-dir", tmp_path / "data", "--out-dir", out, *FAST, "--stages", "distilled")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training the teacher first" in result.stdout
    assert (out / "cifar10" / "teacher.pt").exists() and (out / "cifar10" / "distilled.pt").exists()
    assert not (out / "cifar10" / "student.pt").exists()


@pytest.mark.slow
def test_missing_data_is_one_line_naming_where_and_how(tmp_path):
    (tmp_path / "empty").mkdir()  # (cifar10 would not fall back either: tests/test_bundled.py)
    result = run_script("train.py", "--dataset", "cifar100", "--data-dir", tmp_path / "empty", "--out-dir",
                        tmp_path / "out", "--no-download", *FAST)  # fmt: skip
    assert_one_line_error(result, "empty", "cifar-100-python.tar.gz", "--data-dir", code=1)
    result = run_script("train.py", "--data-dir", tmp_path / "nowhere", "--dataset", "folder", *FAST)
    assert_one_line_error(result, "--data-dir", "nowhere", code=2)


@pytest.mark.slow
def test_an_archive_given_as_data_dir_says_the_flag_takes_a_folder_and_what_goes_in_it(tmp_path):
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"\x1f\x8b not read")
    result = run_script("train.py", "--data-dir", archive, "--out-dir", tmp_path / "out", *FAST)
    assert_one_line_error(result, code=2)
    assert result.stderr.strip() == (
        f"train.py: error: argument --data-dir: {archive} is a file, but the flag takes a folder: for cifar10 it "
        f"looks there for cifar-10-python.tar.gz, its extracted cifar-10-batches-py/, or train/<class>/ + "
        f"test/<class>/ image folders (test/ may be val/ or validation/)"
    )


BAD_CONFIGS = [
    (["--lr", "-1"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--alpha", "1.5"], "--alpha"),
    (["--alpha", "-0.1"], "--alpha"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--lr", "inf"], "--lr"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--teacher", "resnet9000"], "--teacher"),
    (["--student", "tiny"], "--student"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--method", "magic"], "--method"),
    (["--optimizer", "lion"], "--optimizer"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "1,2"], "--epochs"),
    (["--epochs", "x"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--val-size", "-5"], "--val-size"),
    (["--dropout", "1"], "--dropout"),
    (["--label-smoothing", "1.2"], "--label-smoothing"),
    (["--device", "tpu"], "--device"),
    (["--amp", "fp8"], "--amp"),
    (["--stages", "teacher,bogus"], "--stages"),
    (["--weight-decay", "-1e-4"], "--weight-decay"),
    (["--warmup", "1"], "--warmup"),
    (["--bogus-flag", "1"], "--bogus-flag"),
    (["--dkd-beta", "-1"], "--dkd-beta"),
    (["--image-size", "4"], "--image-size"),
    (["--fitnet-weight", "x"], "--fitnet-weight"),
]


@pytest.mark.slow
def test_an_out_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_script("train.py", "--out-dir", tmp_path / "a-file", "--data-dir", tmp_path / "no-data")
    assert_one_line_error(result, "argument --out-dir: cannot write to", "choose a writable --out-dir", code=2)


@pytest.mark.parametrize("args,flag", BAD_CONFIGS, ids=[" ".join(a) for a, _ in BAD_CONFIGS])
def test_bad_configuration_is_one_line_naming_the_flag(capsys, args, flag):
    """The parser and checks train.py uses, called in-process: exit 2, one line naming the flag."""
    import config

    with pytest.raises(SystemExit) as stop:
        config.parse(args)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], lines


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,flag",
    [
        (["--lr", "-1"], "--lr"),
        (["--teacher", "resnet9000"], "--teacher"),
        (["--bogus-flag", "1"], "--bogus-flag"),
    ],
)
def test_bad_configuration_through_train_py_stops_before_any_work(tmp_path, args, flag):
    result = run_script("train.py", "--data-dir", tmp_path, "--out-dir", tmp_path / "out", *args)
    assert_one_line_error(result, flag, code=2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pt"))


@pytest.mark.slow
def test_translation_as_large_as_the_image_is_refused_before_training(tmp_path):
    write_cifar10(tmp_path)
    result = run_script(
        "train.py", "--data-dir", tmp_path, "--out-dir", tmp_path / "out", *FAST, "--crop-padding", "32"
    )
    assert_one_line_error(result, "--crop-padding", code=2)
    assert "smaller value" in result.stderr and not any((tmp_path / "out").rglob("*.pt"))


@pytest.mark.slow
def test_help_lists_every_constant_with_its_default():
    import config

    result = run_script("train.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in config.defaults():
        assert f"--{name.lower().replace('_', '-')}" in text
    alpha_help = text.split("--alpha FLOAT ")[1].split(" --")[0]
    assert "weight of the distillation term" in alpha_help and "(default: 0.5)" in alpha_help
    assert "(default: 0)" in text.split("--seed INT ")[-1].split(" --")[0]  # a zero is shown, not ""
    assert '(default: "")' in text.split("--teacher-checkpoint STR ")[-1].split(" --stages")[0]


@pytest.fixture(scope="module")
def method_setup(tmp_path_factory):
    """Tiny CIFAR-10 data and a teacher trained on it, shared by the method runs."""
    root = tmp_path_factory.mktemp("methods")
    write_cifar10(root / "data", per_class_train=20, per_class_test=2)
    train_teacher(root / "data", root / "teacher", 3)
    return root


# kd also runs the teaching options: the route, the mirrored teacher and the student from the teacher's weights
TEACHING = ["--route", "--teacher-mirror", "--student-init", "teacher"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "dkd", "lskd", "fitnet", "at"])
def test_every_method_trains_through_train_py(method_setup, method):
    out = method_setup / method
    (out / "cifar10").mkdir(parents=True)
    shutil.copy(method_setup / "teacher" / "cifar10" / "teacher.pt", out / "cifar10" / "teacher.pt")
    flags = ["--stages", "distilled", "--method", method, "--epochs", "3,2,2", "--dkd-warmup", "0"]
    flags += TEACHING if method == "kd" else []
    result = run_script("train.py", "--data-dir", method_setup / "data", "--out-dir", out, *FAST, *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in (out / "cifar10" / "distilled.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log), log
    saved = checkpoint.load(out / "cifar10" / "distilled.pt")
    assert saved["metrics"]["method"] == method
    # the student's checkpoint holds the student alone (no adapter, no teacher), and it trained
    torch.manual_seed(0)  # the seed train.py builds the student with
    initial = models.build("airnet_xs", 10, 3).state_dict()
    assert set(saved["state_dict"]) == set(initial)
    assert not torch.equal(saved["state_dict"]["head.0.weight"], initial["head.0.weight"])
    if method == "kd":
        assert "alpha 0.5, student from the teacher, route, mirrored teacher]" in result.stdout


@pytest.mark.slow
def test_the_teacher_keeps_its_weights_at_evenly_spaced_epochs_before_its_best(method_setup):
    teacher = checkpoint.load(method_setup / "teacher" / "cifar10" / "teacher.pt")
    best = teacher["metrics"]["best_epoch"]
    assert [anchor["epoch"] for anchor in teacher["anchors"]] == [e for e in stages.anchor_epochs(3) if e < best]
    assert stages.anchor_epochs(3) == [1, 2] and stages.anchor_epochs(12) == [3, 6, 9] and stages.anchor_epochs(1) == []


@pytest.mark.slow
def test_paper_recipe_sets_the_benchmark_settings_and_explicit_flags_win(tmp_path):
    write_cifar10(tmp_path / "data", per_class_train=3, per_class_test=1)
    result = run_script(
        "train.py",
        "--recipe",
        "paper",
        "--dataset",
        "cifar10",
        "--data-dir",
        tmp_path / "data",
        "--out-dir",
        tmp_path / "out",
        "--teacher",
        "airnet_xs",
        "--student",
        "mobilenetv2",
        "--stages",
        "student",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--no-compression-report",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    used = checkpoint.load(tmp_path / "out" / "cifar10" / "student.pt")["config"]
    assert (used["OPTIMIZER"], used["MOMENTUM"], used["WEIGHT_DECAY"]) == ("sgd", 0.9, 5e-4)
    assert used["LR_SCHEDULE"] == "step" and used["LR_MILESTONES"] == [0.625, 0.75, 0.875]
    assert used["LR"] == [0.05, 0.01, 0.01]  # MobileNetV2 and ShuffleNet students train at 0.01
    assert used["VAL_SIZE"] == 0 and used["TTA"] is False and used["ALPHA"] == 0.9 and used["TEMPERATURE"] == 4.0
    assert used["AT_WEIGHT"] == 1000.0
    assert (used["BIAS_LR_SCALE"], used["LOOKAHEAD"], used["CROP_PADDING"]) == (1.0, False, 4)
    assert used["EPOCHS"] == [1, 1, 1] and used["BATCH_SIZE"] == 16  # typed flags win over the recipe


def test_a_typed_lr_alone_sets_every_stage():
    import config

    assert config.parse([])["LR"] == config.LR
    assert config.parse(["--lr", "0.1"])["LR"] == (0.1, 0.1, 0.1)
    assert config.parse(["--lr", "0.1,0.2,0.3"])["LR"] == (0.1, 0.2, 0.3)


def test_paper_recipe_pair_settings_never_replace_typed_values():
    import config

    def parse(*args):
        return config.parse(["--recipe", "paper", *args])

    assert parse("--teacher", "wrn_40_2", "--student", "wrn_16_2")["DKD_BETA"] == 6.0  # the DKD paper's beta
    assert parse("--teacher", "wrn_40_2", "--student", "wrn_16_2", "--dkd-beta", "8")["DKD_BETA"] == 8.0
    assert parse("--student", "shufflenetv2")["LR"] == (0.05, 0.01, 0.01)
    assert parse("--student", "shufflenetv2", "--lr", "0.02")["LR"] == (
        0.02,
        0.02,
        0.02,
    )  # a typed --lr sets every stage


def test_the_default_recipe_distils_cifar100_at_its_own_temperature_and_weight():
    import config

    cifar10 = config.parse([])
    assert (cifar10["TEMPERATURE"], cifar10["ALPHA"]) == (2.0, 0.5)
    cifar100 = config.parse(["--dataset", "cifar100"])
    assert (cifar100["TEMPERATURE"], cifar100["ALPHA"]) == (1.0, 0.9)
    typed = config.parse(["--dataset", "cifar100", "--temperature", "3"])
    assert (typed["TEMPERATURE"], typed["ALPHA"]) == (3.0, 0.9)  # a typed flag wins, the other setting stays
    airbench = config.parse(["--dataset", "cifar100", "--recipe", "airbench"])  # another recipe: its own settings
    assert (airbench["TEMPERATURE"], airbench["ALPHA"]) == (4.0, 0.9)


def test_abbreviated_flags_are_refused(capsys):
    import config

    with pytest.raises(SystemExit) as stop:
        config.parse(["--batch", "16"])
    assert stop.value.code == 2 and "--batch" in capsys.readouterr().err


@pytest.mark.slow
def test_without_a_validation_split_the_last_epoch_is_kept_and_logs_are_strict_json(tmp_path):
    write_cifar10(tmp_path / "data", per_class_train=4, per_class_test=1)
    result = run_script(
        "train.py",
        "--data-dir",
        tmp_path / "data",
        "--out-dir",
        tmp_path / "out",
        *FAST,
        "--stages",
        "teacher",
        "--val-size",
        "0",
        "--epochs",
        "2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val n/a" in result.stdout

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    folder = tmp_path / "out" / "cifar10"
    log = [json.loads(line, parse_constant=refuse) for line in (folder / "teacher.jsonl").read_text().splitlines()]
    results = json.loads((folder / "results.json").read_text(), parse_constant=refuse)["stages"]
    assert [r["val_acc"] for r in log] == [None, None]
    assert results["teacher"]["best_val_acc"] is None and results["teacher"]["best_epoch"] == 2


def built_stage(*args):
    """The settings, optimizer, scheduler and lookahead of a teacher stage of 100 steps, built as train.py does."""
    cfg = config.parse(list(args))
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = tensor_dataset(images, torch.arange(64) % 10, 10)
    objective = distill.build_objective(cfg, cfg["TEACHER"], dataset, torch.device("cpu"))
    return (cfg, *optim.build(objective, cfg, cfg["LR"][0], 100))


def test_adam_with_warm_up_and_linear_decay_is_the_default_and_airbench_is_sgd():
    cfg, optimizer, scheduler, lookahead = built_stage()
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["betas"] == cfg["ADAM_BETAS"]
    assert {group["lr"] for group in optimizer.param_groups} == {cfg["LR"][0] / round(100 * cfg["WARMUP"])}
    assert {group["weight_decay"] for group in optimizer.param_groups} == {cfg["WEIGHT_DECAY"], 0.0}
    multiplier, warmup = scheduler.lr_lambdas[0], round(100 * cfg["WARMUP"])
    assert [multiplier(s) for s in (0, warmup - 1, 55, 99)] == pytest.approx(
        [1 / warmup, 1, 45 / (100 - warmup), 1 / (100 - warmup)]
    )
    assert lookahead is None and cfg["LABEL_SMOOTHING"] == 0.0

    cfg, optimizer, scheduler, lookahead = built_stage("--recipe", "airbench")
    assert (
        type(optimizer) is torch.optim.SGD and optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.85
    )
    assert sorted(group["initial_lr"] for group in optimizer.param_groups) == [0.375, 0.375, 0.375 * 64]
    assert optimizer.defaults["weight_decay"] == 0 and cfg["WEIGHT_DECAY"] == 1.33e-3  # L2 in the groups
    assert isinstance(lookahead, optim.Lookahead) and cfg["LABEL_SMOOTHING"] == 0.2 and cfg["WARMUP"] == 0.23
    assert cfg["EPOCHS"] == (11, 5, 5) and cfg["CROP_PADDING"] == 2


@pytest.mark.slow
def test_cifar100_reports_a_top5_accuracy_that_matches_a_hand_count(tmp_path):
    write_cifar100(tmp_path / "data", per_class_train=2, per_class_test=1)
    result = run_script("train.py", "--dataset", "cifar100", "--data-dir", tmp_path / "data", "--out-dir",
                        tmp_path / "out", *FAST, "--stages", "teacher", "--val-size", "100")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "out" / "cifar100"
    saved = checkpoint.load(folder / "teacher.pt")
    model = checkpoint.build_model(saved).eval()
    splits = datafiles.load_cifar("cifar100", tmp_path / "data", [], 32, download=False)
    with torch.no_grad():
        probs = models.probabilities(model, data.normalize(splits.test_x, saved["mean"], saved["std"]), tta=True)
    ranked = np.argsort(-probs.numpy(), axis=1)[:, :5]
    by_hand = np.mean([label in row for label, row in zip(splits.test_y.tolist(), ranked)])
    reported = json.loads((folder / "results.json").read_text())["stages"]["teacher"]
    assert len(splits.classes) == 100 and reported["test_top5"] == pytest.approx(by_hand, abs=1e-9)
    assert reported["test_top5"] >= reported["test_acc"]
    assert "| top-5 |" in (folder / "results.md").read_text()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny pipeline."""
    root = tmp_path_factory.mktemp("reuse")
    write_cifar10(root / "data", per_class_train=4, per_class_test=1)
    result = run_script("train.py", "--data-dir", root / "data", "--out-dir", root / "out", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


STALE = [
    (["--stages", "distilled", "--method", "dkd"], "distilled.pt", "--method kd then, dkd now"),
    (["--stages", "distilled", "--temperature", "3"], "distilled.pt", "--temperature 2.0 then, 3.0 now"),
    (["--stages", "student", "--epochs", "1,2,1"], "student.pt", "--epochs 1 then, 2 now"),
    (["--stages", "teacher", "--weight-decay", "0.1"], "teacher.pt", "--weight-decay"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,path,named", STALE, ids=[" ".join(a) for a, _, _ in STALE])
def test_a_stage_made_with_other_settings_is_refused_and_kept(finished_run, args, path, named):
    folder = finished_run / "out" / "cifar10"
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pt")}
    result = run_script(
        "train.py", "--data-dir", finished_run / "data", "--out-dir", finished_run / "out", *FAST, *args
    )
    assert_one_line_error(result, path, "other settings", named, "--fresh", code=2)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pt")} == before


@pytest.mark.slow
def test_a_distilled_stage_is_refused_against_another_teacher_and_reused_with_its_own(finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run / "out", out)
    same = run_script("train.py", "--data-dir", finished_run / "data", "--out-dir", out, *FAST)
    assert same.returncode == 0 and same.stdout.count("skipping") == 3, same.stderr[-2000:]
    teacher = torch.load(out / "cifar10" / "teacher.pt", weights_only=True)  # another teacher, of the same settings
    teacher["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in teacher["state_dict"].items()}
    torch.save(teacher, out / "cifar10" / "teacher.pt")
    result = run_script("train.py", "--data-dir", finished_run / "data", "--out-dir", out, *FAST, "--stages",
                        "student,distilled")  # fmt: skip
    assert_one_line_error(result, "distilled.pt", "the teacher (another teacher.pt)", "--fresh", code=2)
    left_out = run_script(
        "train.py", "--data-dir", finished_run / "data", "--out-dir", out, *FAST, "--stages", "student"
    )
    assert left_out.returncode == 0 and "distilled.pt was made with other settings; left out" in left_out.stdout
    summary = json.loads((out / "cifar10" / "results.json").read_text())
    assert set(summary["stages"]) == {"teacher", "student"}
    assert summary["left_out"] == {"distilled": ["the teacher (another teacher.pt)"]}
    line = "left out, saved with other settings: distilled.pt (the teacher (another teacher.pt))"
    assert line in (out / "cifar10" / "results.md").read_text().splitlines()
    # a teacher of other settings that the distilled stage needs is retrained with --fresh
    fresh = run_script("train.py", "--data-dir", finished_run / "data", "--out-dir", out, *FAST,
                       "--stages", "distilled", "--weight-decay", "0.01", "--fresh")  # fmt: skip
    assert fresh.returncode == 0 and "training the teacher first" not in fresh.stdout, fresh.stderr[-2000:]
    assert "== teacher:" in fresh.stdout and "== distilled:" in fresh.stdout
    assert f"teacher: {out / 'cifar10' / 'teacher.pt'} was made with other settings; retraining it" in fresh.stdout


@pytest.mark.slow
def test_reported_test_accuracy_is_what_predict_evaluate_measures_under_bf16(tmp_path):
    tree = write_image_tree(tmp_path / "tree", classes=("a", "b", "c", "d"), per_class_train=12, per_class_test=10,
                            mixed=False)  # fmt: skip
    result = run_script("train.py", "--dataset", "folder", "--data-dir", tree, "--out-dir", tmp_path / "out", *FAST,
                        "--stages", "teacher", "--amp", "bf16", "--epochs", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    reported = json.loads((tmp_path / "out" / "tree" / "results.json").read_text())["stages"]["teacher"]
    evaluated = run_script("predict.py", tree / "test", "--evaluate", "--checkpoint",
                           tmp_path / "out" / "tree" / "teacher.pt", "--device", "cpu")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"accuracy {reported['test_acc']:.2%} on 40 images" in evaluated.stdout
