"""Teachers trained elsewhere (train.py --teacher-checkpoint): this repo's .pt, bare
state dicts and RepDistiller/mdistiller's {"model": state_dict}, with their
parameter names; files that do not fit are refused in one line."""

import json
import os

import pytest
import torch

import checkpoint
import models
import pretrained
from conftest import FAST, assert_one_line_error, run_script, write_cifar10

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
CLASSES = [str(i) for i in range(10)]


def bn(prefix):
    return [f"{prefix}.{key}" for key in BN]


# Parameter names of RepDistiller's (and mdistiller's) models/resnet.py, wrn.py and
# ShuffleNetv2.py, written out from their module structure.


def repdistiller_resnet(blocks, widths):
    names = ["conv1.weight", *bn("bn1")]
    previous = widths[0]
    for group, width in enumerate(widths[1:], 1):
        for block in range(blocks):
            prefix = f"layer{group}.{block}"
            names += [f"{prefix}.conv1.weight", *bn(f"{prefix}.bn1"), f"{prefix}.conv2.weight", *bn(f"{prefix}.bn2")]
            if block == 0 and (group > 1 or previous != width):
                names += [f"{prefix}.downsample.0.weight", *bn(f"{prefix}.downsample.1")]
            previous = width
    return names + ["fc.weight", "fc.bias"]


def repdistiller_wrn(blocks, widen):
    names = ["conv1.weight"]
    previous = 16
    for group, width in enumerate((16 * widen, 32 * widen, 64 * widen), 1):
        for block in range(blocks):
            prefix = f"block{group}.layer.{block}"
            names += [*bn(f"{prefix}.bn1"), f"{prefix}.conv1.weight", *bn(f"{prefix}.bn2"), f"{prefix}.conv2.weight"]
            if block == 0 and previous != width:
                names.append(f"{prefix}.convShortcut.weight")
            previous = width
    return names + [*bn("bn1"), "fc.weight", "fc.bias"]


def repdistiller_shufflenetv2():
    names = ["conv1.weight", *bn("bn1")]
    for group, basic_blocks in enumerate((3, 7, 3), 1):
        for index in range(1, 6):  # the DownBlock
            names += [f"layer{group}.0.conv{index}.weight", *bn(f"layer{group}.0.bn{index}")]
        for block in range(1, basic_blocks + 1):
            for index in range(1, 4):
                names += [f"layer{group}.{block}.conv{index}.weight", *bn(f"layer{group}.{block}.bn{index}")]
    return names + ["conv2.weight", *bn("bn2"), "linear.weight", "linear.bias"]


THEIR_NAMES = {
    "resnet8": lambda: repdistiller_resnet(1, (16, 16, 32, 64)),
    "resnet32x4": lambda: repdistiller_resnet(5, (32, 64, 128, 256)),
    "resnet8x4": lambda: repdistiller_resnet(1, (32, 64, 128, 256)),
    "wrn_16_1": lambda: repdistiller_wrn(2, 1),
    "wrn_40_2": lambda: repdistiller_wrn(6, 2),
    "shufflenetv2": repdistiller_shufflenetv2,
}


def as_theirs(name, num_classes=10, ours=None):
    """A zoo model's weights (`ours`, or a fresh model's) under RepDistiller's
    names: each of their names, renamed, is one of ours, and every one of ours
    is reached."""
    ours = ours or models.build(name, num_classes).state_dict()
    rename = pretrained.FOREIGN_NAMES[type(models.build(name, num_classes))]
    theirs = THEIR_NAMES[name]()
    assert sorted(rename(k) for k in theirs) == sorted(ours), name
    return {k: ours[rename(k)].clone() for k in theirs}


@pytest.mark.parametrize("name", sorted(THEIR_NAMES))
def test_repdistiller_names_map_onto_ours_one_to_one(name, tmp_path):
    state = as_theirs(name)
    torch.save({"model": state, "epoch": 240, "best_acc": torch.tensor(73.1)}, tmp_path / "ckpt.pth")
    model, kind, _ = pretrained.load_teacher(tmp_path / "ckpt.pth", name, CLASSES, 3)
    assert "RepDistiller" in kind and not model.training
    renamed = {pretrained.FOREIGN_NAMES[type(model)](k): v for k, v in state.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in renamed.items())


def test_bare_state_dicts_load_with_our_names_or_theirs_and_a_dataparallel_prefix(tmp_path):
    ours = models.build("wrn_16_1", 10).state_dict()
    torch.save(ours, tmp_path / "ours.pt")
    torch.save({f"module.{k}": v for k, v in as_theirs("wrn_16_1", ours=ours).items()}, tmp_path / "theirs.pt")
    for file in ("ours.pt", "theirs.pt"):
        model, _, _ = pretrained.load_teacher(tmp_path / file, "wrn_16_1", CLASSES, 3)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.items())


def test_this_repos_checkpoint_loads_and_must_name_the_teacher_and_classes(tmp_path):
    model = models.build("resnet8", 10)
    saved = {
        "format": checkpoint.FORMAT,
        "stage": "teacher",
        "model": "resnet8",
        "num_classes": 10,
        "in_channels": 3,
        "image_size": 32,
        "classes": CLASSES,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "state_dict": model.state_dict(),
    }
    torch.save(saved, tmp_path / "teacher.pt")
    _, kind, _ = pretrained.load_teacher(tmp_path / "teacher.pt", "resnet8", CLASSES, 3)
    assert "teacher checkpoint of this repo" in kind
    with pytest.raises(ValueError, match="holds a resnet8, not the --teacher resnet14; pass --teacher resnet8"):
        pretrained.load_teacher(tmp_path / "teacher.pt", "resnet14", CLASSES, 3)
    with pytest.raises(ValueError, match="other classes"):
        pretrained.load_teacher(tmp_path / "teacher.pt", "resnet8", [c + "x" for c in CLASSES], 3)
    torch.save({**saved, "format": 1}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"^written by an older version of this repo \(file format 1;"):
        pretrained.load_teacher(tmp_path / "old.pt", "resnet8", CLASSES, 3)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_files_that_do_not_fit_are_refused_with_the_reason(tmp_path):
    cases = {
        "text": ("text.pt", "not a teacher checkpoint (not a torch file); pass a .pt of this repo"),
        "list": ("list.pt", "not a teacher checkpoint"),
        "empty": ("empty.pt", "not a teacher checkpoint"),
        "other": ("other.pt", "36 missing (stages.0.1.conv1.weight"),
        "classes": ("classes.pt", "of another shape (head.weight: 100x64"),
        "vgg": ("vgg.pt", "conv biases"),
        "code": ("code.pt", "(it holds Python objects that a safe load refuses to build); pass a .pt"),
    }
    (tmp_path / "text.pt").write_text("hello")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({}, tmp_path / "empty.pt")
    torch.save(as_theirs("resnet8"), tmp_path / "other.pt")  # resnet8 weights, loaded as resnet14 below
    torch.save({"model": as_theirs("resnet8", num_classes=100)}, tmp_path / "classes.pt")
    torch.save({"block0.0.weight": torch.zeros(64, 3, 3, 3), "block0.0.bias": torch.zeros(64)}, tmp_path / "vgg.pt")
    torch.save({"model": RunsCode(tmp_path / "ran")}, tmp_path / "code.pt")
    teachers = {"other": "resnet14", "vgg": "vgg8"}
    for case, (file, reason) in cases.items():
        with pytest.raises(ValueError) as error:
            pretrained.load_teacher(tmp_path / file, teachers.get(case, "resnet8"), CLASSES, 3)
        assert reason in str(error.value) and "\n" not in str(error.value), (case, str(error.value))
    assert not (tmp_path / "ran").exists()
    (tmp_path / "folder.pth").mkdir()  # what the system cannot read gets no advice on what to pass instead
    with pytest.raises(ValueError, match=r"^cannot read it \(Is a directory\)$"):
        pretrained.load_teacher(tmp_path / "folder.pth", "resnet8", CLASSES, 3)


# ---------------------------------------------------------------- through train.py


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("bring")
    write_cifar10(root / "data", per_class_train=4, per_class_test=2)
    return root / "data"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["bare state dict, our names", "{'model': ...}, RepDistiller's names"])
def test_a_brought_teacher_is_measured_then_distilled_from(tiny_cifar, tmp_path, layout):
    path = tmp_path / "teacher.pth"
    if layout.startswith("bare"):
        torch.save(models.build("resnet8", 10).state_dict(), path)
    else:
        torch.save({"model": as_theirs("resnet8"), "epoch": 240, "best_acc": torch.tensor(70.0)}, path)
    out = tmp_path / "out"
    result = run_script(
        "train.py",
        "--data-dir",
        tiny_cifar,
        "--out-dir",
        out,
        *FAST,
        "--compression-report",
        "--teacher",
        "resnet8",
        "--teacher-checkpoint",
        path,
        "--stages",
        "distilled",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    announced = result.stdout.index("not trained by this run: test accuracy")
    assert announced < result.stdout.index("== distilled:")  # measured before distillation starts
    folder = out / "cifar10"
    assert (folder / "distilled.pt").exists() and not (folder / "teacher.pt").exists()
    results = json.loads((folder / "results.json").read_text())
    teacher = results["stages"]["teacher"]
    assert teacher["checkpoint"] == str(path) and teacher["train_seconds"] is None
    assert not teacher["kept"] and teacher["git_commit"] is None and "kept from earlier runs" not in result.stdout
    assert set(results["compression"]["rows"]) == {"teacher", "distilled"}
    assert "| teacher | resnet8 |" in (folder / "results.md").read_text()


@pytest.mark.slow
def test_a_teacher_file_that_does_not_fit_stops_the_run_in_one_line(tiny_cifar, tmp_path):
    torch.save(models.build("resnet8", 10).state_dict(), tmp_path / "resnet8.pt")
    (tmp_path / "notes.txt").write_text("not weights")
    args = ["--data-dir", tiny_cifar, "--out-dir", tmp_path / "out", *FAST, "--stages", "distilled"]
    result = run_script("train.py", *args, "--teacher", "resnet14", "--teacher-checkpoint", tmp_path / "resnet8.pt")
    assert_one_line_error(result, "--teacher-checkpoint", "do not fit resnet14", code=2)
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 16)  # garbage that torch tries to unpickle
    for name in ("notes.txt", "random.pt"):
        result = run_script("train.py", *args, "--teacher", "resnet8", "--teacher-checkpoint", tmp_path / name)
        assert_one_line_error(result, "--teacher-checkpoint", f"{name}: not a teacher checkpoint (not a torch file); "
                              "pass a .pt of this repo, a state dict, or {'model': state_dict}", code=2)  # fmt: skip
        assert "weights_only" not in result.stderr
    result = run_script("train.py", *args, "--teacher", "resnet8", "--teacher-checkpoint", tmp_path / "nothing.pt")
    assert_one_line_error(result, "--teacher-checkpoint", "no such file", code=2)
    assert not (tmp_path / "out" / "cifar10" / "distilled.pt").exists()
