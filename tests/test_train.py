import json
import shutil

import pytest
import torch

import models
from conftest import FAST, assert_one_line_error, run_script, write_cifar10


def test_pipeline_end_to_end_then_skips_finished_stages(tmp_path):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    result = run_script("train.py", "--data-dir", tmp_path / "data", "--out-dir", out, *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = out / "cifar10"
    for stage in ("teacher", "student", "distilled"):
        checkpoint = models.load_checkpoint(folder / f"{stage}.pt")
        assert checkpoint["stage"] == stage and checkpoint["classes"][0] == "airplane"
        assert checkpoint["image_size"] == 32 and checkpoint["in_channels"] == 3 and len(checkpoint["mean"]) == 3
        model = models.checkpoint_model(checkpoint)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        log = [json.loads(line) for line in (folder / f"{stage}.jsonl").read_text().splitlines()]
        assert len(log) == 1 and {"epoch", "loss", "train_acc", "val_acc", "lr", "images", "seconds"} <= set(log[0])
    results = json.loads((folder / "results.json").read_text())
    assert set(results) == {"teacher", "student", "distilled"}
    for row in results.values():
        assert {"model", "params", "test_acc"} <= set(row) and 0 <= row["test_acc"] <= 1 and row["params"] > 0
    assert results["teacher"]["params"] > results["student"]["params"]
    table = (folder / "results.md").read_text()
    assert "| distilled | airnet_xs |" in table and "CPU latency" in table
    source = str(tmp_path / "data" / "cifar-10-python.tar.gz")  # results name the data they were measured on
    assert all(row["data"] == source for row in results.values()) and f"\ndata: {source}\n" in table

    stamp = (folder / "teacher.pt").stat().st_mtime_ns
    again = run_script("train.py", "--data-dir", tmp_path / "data", "--out-dir", out, *FAST)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("skipping") == 3
    assert (folder / "teacher.pt").stat().st_mtime_ns == stamp


def test_results_name_one_data_source_or_each_stage_s_when_they_differ():
    import train

    assert train.data_sources({"teacher": {"data": "a"}, "student": {"data": "a"}}) == "data: a\n"
    kept = {"teacher": {"data": "jpeg"}, "student": {"data": "official"}, "distilled": {}}  # {}: an older checkpoint
    assert train.data_sources(kept) == "data: teacher from jpeg; student from official; distilled from not recorded\n"


def test_distilled_alone_trains_the_missing_teacher_first(tmp_path):
    write_cifar10(tmp_path / "data", per_class_train=3, per_class_test=1)
    out = tmp_path / "out"
    result = run_script("train.py", "--data-dir", tmp_path / "data", "--out-dir", out, *FAST, "--stages", "distilled")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training the teacher first" in result.stdout
    assert (out / "cifar10" / "teacher.pt").exists() and (out / "cifar10" / "distilled.pt").exists()
    assert not (out / "cifar10" / "student.pt").exists()


def test_missing_data_is_one_line_naming_where_and_how(tmp_path):
    (tmp_path / "empty").mkdir()  # (cifar10 would fall back to the bundled copy: tests/test_bundled.py)
    result = run_script("train.py", "--dataset", "cifar100", "--data-dir", tmp_path / "empty", "--out-dir",
                        tmp_path / "out", "--no-download", *FAST)
    assert_one_line_error(result, "empty", "cifar-100-python.tar.gz", "--data-dir", code=1)
    result = run_script("train.py", "--data-dir", tmp_path / "nowhere", "--dataset", "folder", *FAST)
    assert_one_line_error(result, "--data-dir", "nowhere", code=2)


def test_an_archive_given_as_data_dir_says_the_flag_takes_a_folder_and_what_goes_in_it(tmp_path):
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"\x1f\x8b not read")
    result = run_script("train.py", "--data-dir", archive, "--out-dir", tmp_path / "out", *FAST)
    assert_one_line_error(result, code=2)
    assert result.stderr.strip() == (
        f"train.py: error: argument --data-dir: {archive} is a file, but the flag takes a folder: for cifar10 it "
        f"looks there for cifar-10-python.tar.gz, its extracted cifar-10-batches-py/, or train/<class>/ + "
        f"test/<class>/ image folders (test/ may be val/ or validation/)")


BAD_CONFIGS = [
    (["--lr", "-1"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--alpha", "1.5"], "--alpha"),
    (["--alpha", "-0.1"], "--alpha"),
    (["--temperature", "0"], "--temperature"),
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


@pytest.mark.parametrize("args,flag", BAD_CONFIGS, ids=[" ".join(a) for a, _ in BAD_CONFIGS])
def test_bad_configuration_is_one_line_naming_the_flag(capsys, args, flag):
    """The parser and checks train.py uses, called in-process: exit 2, one line naming the flag."""
    import config
    import data
    import distill

    choices = {"DATASET": data.DATASETS, "TEACHER": models.MODELS, "STUDENT": models.MODELS,
               "METHOD": distill.METHODS, "OPTIMIZER": distill.OPTIMIZERS}
    with pytest.raises(SystemExit) as stop:
        config.parse(args, choices=choices)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], lines


@pytest.mark.parametrize("args,flag", [(["--lr", "-1"], "--lr"), (["--teacher", "resnet9000"], "--teacher"),
                                       (["--bogus-flag", "1"], "--bogus-flag"), (["--resume", "--fresh"], "--resume")])
def test_bad_configuration_through_train_py_stops_before_any_work(tmp_path, args, flag):
    result = run_script("train.py", "--data-dir", tmp_path, "--out-dir", tmp_path / "out", *args)
    assert_one_line_error(result, flag, code=2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pt"))


def test_translation_as_large_as_the_image_is_refused_before_training(tmp_path):
    write_cifar10(tmp_path)
    result = run_script("train.py", "--data-dir", tmp_path, "--out-dir", tmp_path / "out", *FAST, "--crop-padding", "32")
    assert_one_line_error(result, "--crop-padding", code=2)
    assert "smaller value" in result.stderr and not any((tmp_path / "out").rglob("*.pt"))


def test_help_lists_every_constant_with_its_default():
    import config

    result = run_script("train.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in config.defaults():
        assert f"--{name.lower().replace('_', '-')}" in text
    alpha_help = text.split("--alpha FLOAT ")[1].split(" --")[0]
    assert "weight of the distillation term" in alpha_help and "(default: 0.9)" in alpha_help


@pytest.fixture(scope="module")
def method_setup(tmp_path_factory):
    """Tiny CIFAR-10 data and a teacher trained on it, shared by the method runs."""
    root = tmp_path_factory.mktemp("methods")
    write_cifar10(root / "data", per_class_train=20, per_class_test=2)
    result = run_script("train.py", "--data-dir", root / "data", "--out-dir", root / "teacher", *FAST,
                        "--stages", "teacher", "--epochs", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.mark.parametrize("method", ["kd", "dkd", "lskd", "fitnet", "at"])
def test_every_method_trains_through_train_py(method_setup, method):
    out = method_setup / method
    (out / "cifar10").mkdir(parents=True)
    shutil.copy(method_setup / "teacher" / "cifar10" / "teacher.pt", out / "cifar10" / "teacher.pt")
    result = run_script("train.py", "--data-dir", method_setup / "data", "--out-dir", out, *FAST, "--stages", "distilled",
                        "--method", method, "--epochs", "2", "--dkd-warmup", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in (out / "cifar10" / "distilled.jsonl").read_text().splitlines()]
    assert log[1]["loss"] < log[0]["loss"], log
    checkpoint = models.load_checkpoint(out / "cifar10" / "distilled.pt")
    assert checkpoint["metrics"]["method"] == method
    # the student's checkpoint holds the student alone: no adapter, no teacher
    student_keys = set(models.build("airnet_xs", 10, 3).state_dict())
    assert set(checkpoint["state_dict"]) == student_keys


def test_paper_recipe_sets_the_benchmark_settings_and_explicit_flags_win(tmp_path):
    write_cifar10(tmp_path / "data", per_class_train=3, per_class_test=1)
    result = run_script("train.py", "--recipe", "paper", "--dataset", "cifar10", "--data-dir", tmp_path / "data",
                        "--out-dir", tmp_path / "out", "--teacher", "airnet_xs", "--student", "mobilenetv2",
                        "--stages", "student", "--epochs", "1", "--batch-size", "16", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    used = models.load_checkpoint(tmp_path / "out" / "cifar10" / "student.pt")["config"]
    assert (used["OPTIMIZER"], used["LR"], used["MOMENTUM"], used["WEIGHT_DECAY"]) == ("sgd", 0.05, 0.9, 5e-4)
    assert used["LR_SCHEDULE"] == "step" and used["LR_MILESTONES"] == [0.625, 0.75, 0.875]
    assert used["STUDENT_LR"] == 0.01  # MobileNetV2 and ShuffleNet students train at 0.01
    assert used["VAL_SIZE"] == 0 and used["TTA"] is False and used["ALPHA"] == 0.9 and used["TEMPERATURE"] == 4.0
    assert used["AT_WEIGHT"] == 1000.0
    assert (used["BIAS_LR_SCALE"], used["LOOKAHEAD"], used["CROP_PADDING"]) == (1.0, False, 4)
    assert used["EPOCHS"] == [1, 1, 1] and used["BATCH_SIZE"] == 16  # typed flags win over the recipe


def test_step_schedule_drops_tenfold_at_each_milestone():
    import distill

    multiplier = distill.lr_multiplier(100, 0.0, "step", (0.5, 0.75))
    assert [multiplier(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    linear = distill.lr_multiplier(100, 0.1, "linear")
    assert linear(0) == pytest.approx(0.1) and linear(9) == pytest.approx(1.0) and linear(99) == pytest.approx(1 / 90)


def test_a_typed_lr_alone_sets_every_stage():
    import config

    assert config.parse([])["STUDENT_LR"] == config.STUDENT_LR
    assert config.parse(["--lr", "0.1"])["STUDENT_LR"] == 0.0  # 0: the students use LR too
    assert config.parse(["--lr", "0.1", "--student-lr", "0.2"])["STUDENT_LR"] == 0.2


def test_paper_recipe_pair_settings_never_replace_typed_values():
    import config
    import distill

    def parse(*args):
        return config.parse(["--recipe", "paper", *args], derived=distill.paper_pair_settings)

    assert parse("--teacher", "wrn_40_2", "--student", "wrn_16_2")["DKD_BETA"] == 6.0  # the DKD paper's beta
    assert parse("--teacher", "wrn_40_2", "--student", "wrn_16_2", "--dkd-beta", "8")["DKD_BETA"] == 8.0
    assert parse("--student", "shufflenetv2")["STUDENT_LR"] == 0.01
    assert parse("--student", "shufflenetv2", "--lr", "0.02")["STUDENT_LR"] == 0.0  # a typed --lr sets every stage


def test_abbreviated_flags_are_refused(capsys):
    import config

    with pytest.raises(SystemExit) as stop:
        config.parse(["--batch", "16"])
    assert stop.value.code == 2 and "--batch" in capsys.readouterr().err


def test_without_a_validation_split_the_last_epoch_is_kept_and_logs_are_strict_json(tmp_path):
    write_cifar10(tmp_path / "data", per_class_train=4, per_class_test=1)
    result = run_script("train.py", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", *FAST,
                        "--stages", "teacher", "--val-size", "0", "--epochs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val n/a" in result.stdout

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    folder = tmp_path / "out" / "cifar10"
    log = [json.loads(line, parse_constant=refuse) for line in (folder / "teacher.jsonl").read_text().splitlines()]
    results = json.loads((folder / "results.json").read_text(), parse_constant=refuse)
    assert [r["val_acc"] for r in log] == [None, None]
    assert results["teacher"]["best_val_acc"] is None and results["teacher"]["best_epoch"] == 2
