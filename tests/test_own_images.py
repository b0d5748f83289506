"""A single <class>/* folder of one's own images: split into train and test by
the seed, recorded, and used alike by train.py, predict.py --evaluate and
export.py; a validation split that fits a small dataset; what a run says."""

import json
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import predict
import train

import config
import data
import datafiles
import plan
import runtime
from conftest import ROOT, whole_script, write_image_tree


def class_tree(root, per_class=10, classes=("cat", "dog", "fish")):
    """root/<class>/*.png: the train/ half of write_image_tree, moved up."""
    write_image_tree(root.parent / "whole", classes, per_class_train=per_class, per_class_test=0, mixed=False)
    shutil.move(root.parent / "whole" / "train", root)
    return root


def test_a_class_tree_is_split_stratified_and_by_the_seed(tmp_path):
    root = class_tree(tmp_path / "pets")
    loaded = data.load("folder", root, val_size=3, seed=1, test_fraction=0.2)
    assert (len(loaded.train_y), len(loaded.val_y), len(loaded.test_y)) == (21, 3, 6)
    assert torch.bincount(loaded.test_y).tolist() == [2, 2, 2]
    assert [loaded.classes.index(name.split("/")[0]) for name in loaded.test_files] == loaded.test_y.tolist()
    assert loaded.notes == ["split: 6 of the 30 images held out for testing (TEST_FRACTION 0.2, seed 1)"]
    again = data.load("folder", root, val_size=3, seed=1, test_fraction=0.2)
    assert again.test_files == loaded.test_files and torch.equal(again.test_x, loaded.test_x)
    assert data.load("folder", root, val_size=3, seed=2, test_fraction=0.2).test_files != loaded.test_files


def test_a_class_folder_without_images_is_refused_in_one_line(tmp_path):
    root = class_tree(tmp_path / "pets")
    (root / "bird").mkdir()
    with pytest.raises(datafiles.DataError) as error:
        datafiles.load_folder("folder", root, [], 32)
    assert str(error.value) == (f"no images for class bird (no image files in {root}/<class>/); add some there, "
                                "or remove the class")  # fmt: skip


def test_the_validation_split_shrinks_to_fit_a_small_dataset():
    small = torch.tensor([0] * 150 + [1] * 150)
    assert data.fitted_val_size(5000, small) == (
        30,
        "VAL_SIZE 5000 is too large for 300 training images; validating on 30 of them instead",
    )
    assert data.fitted_val_size(100, small) == (100, None)  # a size the user chose that leaves most for training
    assert data.fitted_val_size(5000, torch.zeros(50000, dtype=torch.int64)) == (5000, None)  # the CIFARs


def test_a_shrunk_validation_split_keeps_one_image_of_every_class():
    labels = torch.tensor([0] * 95 + [1] * 3 + [2] * 2)
    assert torch.bincount(labels[data.stratified_split(labels, 5, seed=0)[1]], minlength=3).tolist() == [5, 0, 0]
    assert torch.bincount(labels[data.stratified_split(labels, 5, seed=0, each=True)[1]]).tolist() == [5, 1, 1]


def test_counts_are_singular_for_one():
    assert [runtime.counted(n, "epoch") for n in (0, 1, 2, 1000)] == ["0 epochs", "1 epoch", "2 epochs", "1,000 epochs"]


def test_the_command_after_a_stop_repeats_the_script_as_typed():
    decided = plan.Plan(["--epochs", "3"], "/home/me/my repo/train.py")
    assert (
        decided.go_on() == "nothing was trained yet. Run it again with: python3 '/home/me/my repo/train.py' --epochs 3"
    )
    decided.rows["teacher"] = plan.Row("teacher", "train", "in --stages", begun=True)
    assert (
        decided.go_on() == "progress is saved. Continue with: python3 '/home/me/my repo/train.py' --epochs 3 --resume"
    )


def test_a_folder_dataset_writes_under_its_folder_name_and_predict_says_how_to_train_it():
    assert config.output_name("folder", "data/pets/") == "pets" and config.output_name("cifar10", "data") == "cifar10"
    assert config.how_to_train("pets", "runs") == (
        "'pets' is not a dataset train.py trains (cifar10, cifar100, fashion-mnist, folder); if it is a folder of "
        "your own images, train one with: python3 train.py --dataset folder --data-dir <path to pets/> --out-dir "
        "runs; else give --checkpoint PATH"
    )


def test_a_run_ends_by_naming_its_results_and_checkpoints(tmp_path):
    for name in ("results.md", "results.json", "curves.png", "teacher.pt", "distilled.pt", "student.last.pt"):
        (tmp_path / name).write_text("")
    assert train.outputs(tmp_path) == (
        f"results: {tmp_path}/results.md, {tmp_path}/results.json, {tmp_path}/curves.png\n"
        f"checkpoints: teacher.pt, distilled.pt in {tmp_path}"
    )


def test_evaluate_on_a_split_tree_scores_its_recorded_test_images_alone(tmp_path, capsys):
    root = class_tree(tmp_path / "pets", per_class=2)
    split = {"root": str(root.resolve()), "seed": 0, "test_fraction": 0.5, "test": ["cat/0001.png", "dog/0000.png"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    items, _ = predict.expand([str(root), str(tmp_path / "other.png")], False, True)
    kept = predict.recorded_test_images(items, [str(root)], tmp_path / "split.json", ["cat", "dog", "fish"])
    assert [p for p, _ in kept] == [root / "cat" / "0001.png", root / "dog" / "0000.png", tmp_path / "other.png"]
    assert f"evaluating the 2 test images recorded in {tmp_path / 'split.json'}" in capsys.readouterr().err
    assert (
        predict.recorded_test_images(items, [str(root / "cat")], tmp_path / "split.json", ["cat", "dog", "fish"])
        == items
    )


@pytest.mark.slow
def test_a_class_tree_trains_and_resumes_from_another_directory(tmp_path):
    """A few hundred images in one <class>/* folder train with --epochs 1; a
    run stopped part-way prints a command that resumes it from elsewhere."""
    whole_script()
    root = class_tree(tmp_path / "pets", per_class=100)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tiny = ["--teacher", "airnet_s", "--student", "airnet_xs", "--batch-size", "8", "--device", "cpu",
            "--no-compression-report"]  # fmt: skip
    args = [sys.executable, str(ROOT / "train.py"), "--dataset", "folder", "--data-dir", str(root), "--out-dir",
            str(tmp_path / "out"), *tiny]  # fmt: skip
    done = subprocess.run([*args, "--epochs", "1"], capture_output=True, text=True, cwd=elsewhere, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out" / "pets"  # the folder's name: another project's outputs go elsewhere
    assert "VAL_SIZE 5000 is too large for 240 training images; validating on 24 of them instead" in done.stdout
    assert "1 epoch of 27 steps" in done.stdout and "lr 0.00e+00" not in done.stdout
    assert f"checkpoints: teacher.pt, student.pt, distilled.pt in {out}" in done.stdout
    assert len(json.loads((out / "split.json").read_text())["test"]) == 60
    stopped = subprocess.Popen([*args, "--stages", "student", "--epochs", "3", "--fresh"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=elsewhere)  # fmt: skip
    for line in stopped.stdout:
        if line.startswith("student epoch   1/3"):
            stopped.send_signal(signal.SIGTERM)
            break
    stderr = stopped.communicate(timeout=600)[1]
    command = stderr.split("Continue with: ")[1].strip()
    assert command.startswith(f"python3 {shlex.quote(str(ROOT / 'train.py'))} ") and "--resume" in command
    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], capture_output=True, text=True,
                             cwd=tmp_path, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume   student" in resumed.stdout and Path(out / "student.pt").is_file()


def test_output_to_a_file_says_where_an_epoch_is_every_so_often(capsys):
    now = [0.0]
    bar = train.LogProgress("teacher", 100, 10, every=30, clock=lambda: now[0])
    for seconds in (10, 20, 31, 40, 62):
        now[0] = seconds
        bar.update()
    assert capsys.readouterr().out == (
        "teacher: step 13/100 (13%), 10.33 s/step\nteacher: step 15/100 (15%), 12.40 s/step\n"
    )


def test_the_test_fraction_and_image_size_shape_a_folder_dataset_alone():
    cfg = config.defaults()
    older = {k: v for k, v in cfg.items() if k != "TEST_FRACTION"}  # a checkpoint saved before the constant
    assert config.differences(older, cfg, "teacher") == []
    assert config.differences({**cfg, "IMAGE_SIZE": 16}, cfg, "teacher") == []  # CIFAR's images keep their size
    folder = {**cfg, "DATASET": "folder"}
    assert config.differences({**folder, "TEST_FRACTION": 0.5, "IMAGE_SIZE": 16}, folder, "teacher") == [
        "--image-size 16 then, 32 now",
        "--test-fraction 0.5 then, 0.2 now",
    ]
