"""Tiny datasets written in the real on-disk formats, and helpers to run the scripts."""

import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def coloured_images(labels, size=32, seed=0):
    """uint8 (N, size, size, 3) images whose dominant colour channel and
    brightness depend on the label, so that a small net can learn them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (len(labels), size, size, 3)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, ..., int(label) % 3] += np.uint8(120 + 30 * (int(label) // 3 % 3))
    return images


def cifar_batches(num_classes, per_class_train, per_class_test, seed=0):
    """Train and test (images (N, 3072) uint8 in CIFAR's CHW byte order, labels)."""
    out = []
    for per_class, offset in ((per_class_train, 0), (per_class_test, 1)):
        labels = np.repeat(np.arange(num_classes), per_class)
        np.random.default_rng(seed + offset).shuffle(labels)
        images = coloured_images(labels, seed=seed + offset)
        out.append((images.transpose(0, 3, 1, 2).reshape(len(labels), -1), labels.tolist()))
    return out


def _pickle(obj):
    return pickle.dumps(obj, protocol=2)


def write_cifar10(folder, per_class_train=6, per_class_test=2, archive=True):
    """Write cifar-10-python.tar.gz (or the extracted cifar-10-batches-py/) with
    python-2-style pickles: bytes keys, as in the official files."""
    (train_x, train_y), (test_x, test_y) = cifar_batches(10, per_class_train, per_class_test)
    files = {}
    parts = np.array_split(np.arange(len(train_y)), 5)
    for i, part in enumerate(parts, 1):
        files[f"data_batch_{i}"] = _pickle(
            {b"batch_label": b"training batch", b"data": train_x[part], b"labels": [train_y[j] for j in part]}
        )
    files["test_batch"] = _pickle({b"data": test_x, b"labels": test_y})
    files["batches.meta"] = _pickle({b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    return _write_cifar(folder, "cifar-10-batches-py", "cifar-10-python.tar.gz", files, archive)


def write_cifar100(folder, per_class_train=2, per_class_test=1, archive=True):
    (train_x, train_y), (test_x, test_y) = cifar_batches(100, per_class_train, per_class_test)
    files = {
        "train": _pickle({b"data": train_x, b"fine_labels": train_y, b"coarse_labels": [y // 5 for y in train_y]}),
        "test": _pickle({b"data": test_x, b"fine_labels": test_y, b"coarse_labels": [y // 5 for y in test_y]}),
        "meta": _pickle(
            {
                b"fine_label_names": [f"class{i:03d}".encode() for i in range(100)],
                b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
            }
        ),
    }
    return _write_cifar(folder, "cifar-100-python", "cifar-100-python.tar.gz", files, archive)


def _write_cifar(folder, inner, archive_name, files, archive):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not archive:
        (folder / inner).mkdir()
        for name, blob in files.items():
            (folder / inner / name).write_bytes(blob)
        return folder / inner
    path = folder / archive_name
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"{inner}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    if compress:
        path = Path(f"{path}.gz")
        path.write_bytes(gzip.compress(blob))
    else:
        Path(path).write_bytes(blob)
    return path


def write_fashion_mnist(folder, compress=True, n_train=40, n_test=20):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 50, (n, 28, 28)).astype(np.uint8) + (labels * 20)[:, None, None].astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, compress)
        arrays[split] = (images, labels)
    return arrays


def write_image_tree(root, classes=("cat", "dog", "fish"), per_class_train=8, per_class_test=3, mixed=True, size=32):
    """train/<class>/*, test/<class>/* with, if mixed, assorted sizes, modes and formats."""
    root = Path(root)
    modes = ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "LA"] if mixed else ["RGB"]
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                array = coloured_images([label], size=size, seed=label * 100 + i + (split == "test") * 7)[0]
                image = Image.fromarray(array)
                if mixed:
                    mode = modes[(i + label) % len(modes)]
                    image = image.resize((size + 7 * (i % 3), size + 5 * (i % 2)))
                    if mode == "I;16":
                        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
                    elif mode != "RGB":
                        image = image.convert(mode)
                    suffix = ".jpg" if mode in ("RGB", "L", "CMYK") and i % 2 else ".png"
                    if mode in ("CMYK",):
                        suffix = ".jpg"
                else:
                    suffix = ".png"
                image.save(root / split / name / f"{i:04d}{suffix}")
    return root


RUNNING = {"slow": False}  # whether the test being run is marked slow


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    RUNNING["slow"] = item.get_closest_marker("slow") is not None  # before the fixtures, which may run scripts


def whole_script():
    """Fail a test that runs a whole script unless it is marked slow: the
    everyday run (-m "not slow") leaves out exactly these."""
    assert RUNNING["slow"], "a test that runs a whole script in a subprocess must be marked @pytest.mark.slow"


def run_script(script, *args, cwd=None, timeout=600, env=None):
    """Run one of the repo's scripts in a subprocess; returns CompletedProcess."""
    whole_script()
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=timeout,
        env=full_env,
    )


def assert_one_line_error(result, *fragments, code=None):
    """A user mistake: non-zero exit, no traceback, one line on stderr naming the problem."""
    assert result.returncode != 0, result.stdout + result.stderr
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def cifar10_archive(tmp_path):
    write_cifar10(tmp_path / "data")
    return tmp_path / "data"


# Flags that make a full train.py run take seconds on tiny data.
# small, quick runs; the compression report (ONNX export and timing, most of such a run) is tested on its own
FAST = ("--teacher airnet_s --student airnet_xs --epochs 1 --batch-size 16 --val-size 10 --device cpu "
        "--no-compression-report").split()  # fmt: skip


def train_teacher(data_dir, out_dir, epochs, dataset="cifar10"):
    """Train a teacher with train.py on tiny data (FAST settings, `epochs` epochs); returns its checkpoint."""
    result = run_script("train.py", "--dataset", dataset, "--data-dir", data_dir, "--out-dir", out_dir,
                        "--stages", "teacher", *FAST, "--epochs", epochs)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return Path(out_dir) / (Path(data_dir).name if dataset == "folder" else dataset) / "teacher.pt"


def tensor_dataset(images, labels, num_classes, mean=(0.5,) * 3, std=(0.25,) * 3):
    """A data.Data whose training and test sets are `images`, with no validation split."""
    import data

    return data.Data(images, labels, images[:0], labels[:0], images, labels, [str(i) for i in range(num_classes)],
                     mean, std, "test")  # fmt: skip


def trained_like(model, seed=0):
    """`model` in eval mode, its batch norms' statistics and affine parameters far from their initial ones (the
    scales that train; AirNet's stay at 1), so that folding them into convolutions is tested on real work."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        shape = norm.running_mean.shape
        norm.running_mean.copy_(torch.randn(shape, generator=generator))
        norm.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
        norm.bias.data.copy_(torch.randn(shape, generator=generator))
        if norm.weight.requires_grad:
            norm.weight.data.copy_(torch.randn(shape, generator=generator))
    return model.eval()
