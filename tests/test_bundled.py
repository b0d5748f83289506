"""The CIFAR-10 JPEG copy bundled in datasets/: the offline fallback, and a smoke run on real images."""

import urllib.error

import pytest
import torch

import data
from conftest import CIFAR10_NAMES, assert_one_line_error, run_script


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """An OUT_DIR whose cifar10/ folder the first test fills with the bundled
    copy's decoded cache (60,000 JPEG files, some seconds), and the others read."""
    return tmp_path_factory.mktemp("bundled") / "out"


def test_empty_data_dir_without_download_loads_the_bundled_copy_and_says_so(out_dir, tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    dataset = data.load("cifar10", empty, cache_dirs=[out_dir / "cifar10"], download=False)
    assert (len(dataset.train_y) + len(dataset.val_y), len(dataset.test_y)) == (50_000, 10_000)
    assert dataset.classes == CIFAR10_NAMES
    assert torch.bincount(dataset.test_y).tolist() == [1000] * 10
    assert tuple(dataset.train_x.shape[1:]) == (3, 32, 32) and dataset.train_x.dtype == torch.uint8
    assert dataset.source == f"{data.BUNDLED_CIFAR10} (the JPEG copy bundled with the repo)"
    line = capsys.readouterr().out.strip()
    assert line == (f"data: no CIFAR-10 in {empty}/ and --no-download was given, so this run uses the copy bundled "
                    f"with the repo, {data.BUNDLED_CIFAR10}: JPEG at quality about 75, expect accuracies a few tenths "
                    f"of a point below the lossless original, which is used instead once cifar-10-python.tar.gz is "
                    f"in {empty}/")
    assert list(empty.iterdir()) == []  # the user's data folder is left alone: the cache went to OUT_DIR
    assert len(list((out_dir / "cifar10").glob(".decoded-cifar10-jpeg.tar.gz-*.pt"))) == 1


def test_a_failed_download_falls_back_to_the_bundled_copy(out_dir, tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    splits = data.load_cifar("cifar10", tmp_path / "data", [tmp_path / "data", out_dir / "cifar10"], 32)
    assert len(splits.train_y) == 50_000 and splits.classes == CIFAR10_NAMES
    assert ("and the download failed (<urlopen error [Errno -2] Name or service not known>), so this run uses the "
            "copy bundled with the repo") in capsys.readouterr().out


def test_train_py_without_a_data_folder_or_network_uses_the_bundled_copy(out_dir, tmp_path):
    # a --crop-padding as large as the images stops the run right after loading, before any training
    result = run_script("train.py", "--data-dir", tmp_path / "nowhere", "--no-download", "--out-dir", out_dir,
                        "--crop-padding", "32")
    assert_one_line_error(result, "--crop-padding", code=2)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"data: no CIFAR-10 in {tmp_path / 'nowhere'}/ and --no-download was given, so this "
                               f"run uses the copy bundled with the repo")
    assert lines[1] == (f"data: cifar10 from {data.BUNDLED_CIFAR10} (the JPEG copy bundled with the repo): 10 classes, "
                        f"3x32x32, 45,000 train, 5,000 val, 10,000 test")
