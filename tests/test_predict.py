"""predict.py end to end, run as a user would: good files, bad files, bad checkpoints."""

import json
import os
import shlex
import shutil
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import datafiles
from conftest import assert_one_line_error, coloured_images, run_script, train_teacher, write_image_tree

CLASSES = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher checkpoint trained by train.py on a tiny image tree."""
    root = tmp_path_factory.mktemp("predict")
    write_image_tree(root / "tree", classes=CLASSES, per_class_train=10, per_class_test=4, mixed=False)
    return train_teacher(root / "tree", root / "out", 3, dataset="folder"), root / "tree"


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.png"
    Image.fromarray(coloured_images([1])[0]).save(path)
    return path


def predict(checkpoint, *args):
    return run_script("predict.py", "--checkpoint", checkpoint, *args)


def direct_top1(checkpoint_path, files):
    """Top-1 of the saved's model on the files, computed without predict.py."""
    saved = checkpoint.load(checkpoint_path)
    model = checkpoint.build_model(saved).eval()
    images = torch.from_numpy(np.stack([datafiles.load_image(f, saved["image_size"], 3) for f in files]))
    batch = data.normalize(images, saved["mean"], saved["std"])
    with torch.no_grad():
        probs = model(batch).softmax(1) + model(batch.flip(-1)).softmax(1)
    return [saved["classes"][i] for i in probs.argmax(1).tolist()]


@pytest.mark.slow
def test_predictions_match_the_model_run_directly(trained, tmp_path):
    checkpoint, tree = trained
    files = []
    for i, label in enumerate([0, 1, 2, 0, 2]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(coloured_images([label], size=40, seed=50 + i)[0]).save(path)
        files.append(path)
    result = predict(checkpoint, *files, "--json", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)
    assert [item["file"] for item in items] == [str(f) for f in files]
    for item in items:
        assert len(item["predictions"]) == 2
        assert item["predictions"][0]["prob"] >= item["predictions"][1]["prob"]
        assert item["predictions"][0]["class"] == CLASSES[item["predictions"][0]["index"]]
    assert [item["predictions"][0]["class"] for item in items] == direct_top1(checkpoint, files)


@pytest.mark.slow
def test_plain_output_is_one_line_per_file_with_percentages(trained, tmp_path, good):
    checkpoint, _ = trained
    result = predict(checkpoint, good, "--top-k", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{good}: ") and lines[0].count("%") == 3


@pytest.mark.slow
def test_folder_input_is_sorted_and_recursive_is_opt_in(trained, tmp_path, good):
    checkpoint, _ = trained
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.png", "sub/c.png"):
        shutil.copy(good, folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".git").mkdir()
    for name in ("IMG_1.HEIC", "IMG_2.heic", ".DS_Store", ".git/HEAD"):  # phone photos it cannot read; hidden files
        (folder / name).write_bytes(b"\0" * 16)
    result = predict(checkpoint, folder, "--json")
    flat = json.loads(result.stdout)
    assert [os.path.basename(i["file"]) for i in flat] == ["a.png", "b.png"]
    readable = " ".join(sorted(datafiles.IMAGE_EXTENSIONS))
    assert result.returncode == 0 and result.stderr.splitlines() == [
        f"predict.py: {folder}: skipped 2 .heic, 1 .txt (not images it reads: {readable})"
    ]
    result = predict(checkpoint, folder, "--json", "--recursive")
    deep = json.loads(result.stdout)
    assert sorted(os.path.basename(i["file"]) for i in deep) == ["a.png", "b.png", "c.png"]
    assert result.stderr.splitlines() == [
        f"predict.py: {folder}: skipped 2 .heic, 1 .txt (not images it reads: {readable})"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "LA", "I;16"])
def test_every_image_mode_gives_a_prediction(trained, tmp_path, mode):
    checkpoint, _ = trained
    picture = Image.fromarray(coloured_images([2], size=37)[0])
    if mode == "I;16":
        picture = Image.fromarray(np.asarray(picture.convert("L"), dtype=np.uint16) * 257)
    elif mode != "RGB":
        picture = picture.convert(mode)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    picture.save(path)
    assert datafiles.load_image(path, 32, 3).shape == (3, 32, 32)
    items = json.loads(predict(checkpoint, path, "--json").stdout)
    assert items[0]["predictions"][0]["class"] in CLASSES


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255  # left half white
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = datafiles.load_image(tmp_path / "rotated.jpg", 20, 3)
    assert loaded[:, :5].mean() > 200 and loaded[:, -5:].mean() < 50  # white is on top after rotation


def png_header(path, width, height):
    """A PNG file that claims width x height grey pixels and holds one row:
    what a decompression bomb looks like before it is decoded."""

    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(bytes(width + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def make_bad_file(kind, tmp_path, good):
    path = (
        tmp_path
        / {
            "missing": "missing.png",
            "empty": "empty.png",
            "text": "text.jpg",
            "heic": "IMG_0001.HEIC",
            "header-only": "head.jpg",
            "truncated-png": "cut.png",
            "truncated-jpeg": "cut.jpg",
            "bomb": "bomb.png",
            "tiny": "tiny.png",
            "empty-folder": "nothing",
        }[kind]
    )
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, I am not a JPEG")
    elif kind == "header-only":  # a JPEG cut after its first bytes: damaged, not of another format
        Image.fromarray(coloured_images([0], size=64)[0]).save(tmp_path / "full.jpg", quality=90)
        path.write_bytes((tmp_path / "full.jpg").read_bytes()[:20])
    elif kind == "heic":  # an iPhone photo's container, which Pillow cannot open without a plugin
        path.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))
    elif kind == "truncated-png":
        blob = good.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "truncated-jpeg":
        Image.fromarray(coloured_images([0], size=64)[0]).save(tmp_path / "full.jpg", quality=90)
        blob = (tmp_path / "full.jpg").read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "bomb":
        png_header(path, 30000, 30000)  # 900 Mpixels, over datafiles.MAX_PIXELS
    elif kind == "tiny":
        Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    elif kind == "empty-folder":
        path.mkdir()
        (path / "readme.txt").write_text("no images here")
    return path


BAD_FILES = {
    "missing": "no such file",
    "empty": "empty file",
    "text": "cannot read image (cannot identify image file",
    "header-only": "; not a .jpg image, or damaged: replace or remove it)",
    "heic": "; it reads .bmp .gif .jpeg .jpg .pbm .pgm .png .ppm .tif .tiff .webp: convert it to JPEG or PNG)",
    "truncated-png": "cannot read image",
    "truncated-jpeg": "cannot read image",
    "bomb": "too large",
    "tiny": "1x1",
    "empty-folder": "folder holds no image files; it has 1 .txt (not images it reads: .bmp .gif .jpeg",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_is_one_line_and_good_files_still_classified(trained, tmp_path, good, kind):
    checkpoint, _ = trained
    bad = make_bad_file(kind, tmp_path, good)
    result = predict(checkpoint, good, bad)
    assert result.returncode == 1
    assert_one_line_error(result, str(bad), BAD_FILES[kind])
    assert result.stdout.startswith(f"{good}: ")
    items = json.loads(predict(checkpoint, bad, good, "--json").stdout)
    assert "error" in items[0] and items[1]["predictions"]


@pytest.mark.slow
def test_unreadable_file_is_reported(trained, tmp_path, good):
    checkpoint, _ = trained
    locked = tmp_path / "locked.png"
    shutil.copy(good, locked)
    locked.chmod(0)
    command = []
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that bypass file permissions
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        command = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    import subprocess

    from conftest import ROOT

    result = subprocess.run(
        [*command, sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(checkpoint), str(good), str(locked)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert_one_line_error(result, str(locked), "permission denied")
    assert result.stdout.startswith(f"{good}: ")


@pytest.mark.slow
def test_evaluate_reports_accuracy_equal_to_direct_computation(trained):
    checkpoint, tree = trained
    result = predict(checkpoint, tree / "test", "--evaluate")
    assert result.returncode == 0, result.stderr
    files = sorted((tree / "test").glob("*/*.png"))
    truth = [f.parent.name for f in files]
    expected = sum(a == b for a, b in zip(direct_top1(checkpoint, files), truth)) / len(files)
    assert f"accuracy {expected:.2%} on {len(files)} images" in result.stdout
    for name in CLASSES:
        assert name in result.stdout


@pytest.mark.slow
def test_evaluate_on_a_whole_dataset_folder_points_at_its_held_out_images(trained):
    checkpoint, tree = trained
    result = predict(checkpoint, tree, "--evaluate")
    assert_one_line_error(result, f"{tree} is a whole dataset", "training images", f"give {tree / 'test'}", code=2)
    assert result.stdout == ""
    result = predict(checkpoint, tree.parent, "--evaluate")  # a folder holding the dataset, as data/ may
    assert_one_line_error(result, f"{tree.parent} holds one, {tree}: a whole dataset", f"give {tree / 'test'}", code=2)


@pytest.mark.slow
def test_evaluate_where_no_image_decodes_reports_each_file_and_no_accuracy(trained, tmp_path):
    checkpoint, _ = trained
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "cat" / "note.jpg").write_text("not a picture")
    result = predict(checkpoint, tmp_path / "tree", "--evaluate")
    assert_one_line_error(result, "note.jpg", code=1)
    assert "accuracy 0.00% on 0 images" in result.stdout


@pytest.mark.slow
def test_evaluate_with_foreign_folder_names_says_so(trained, tmp_path, good):
    checkpoint, _ = trained
    (tmp_path / "tree" / "zebra").mkdir(parents=True)
    shutil.copy(good, tmp_path / "tree" / "zebra" / "z.png")
    (tmp_path / "tree" / "zebra" / "notes.txt").write_text("not an image")  # no note beside the error
    result = predict(checkpoint, tmp_path / "tree", "--evaluate")
    assert_one_line_error(result, "zebra", "not among", code=2)


def corrupt_checkpoint(kind, tmp_path, checkpoint_path):
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        blob = checkpoint_path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "not-a-checkpoint":
        path.write_text("just some text")
    elif kind in ("unknown-model", "class-mismatch"):
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        if kind == "unknown-model":
            checkpoint["model"] = "resnet9000"
        else:
            checkpoint["num_classes"] = 7
        torch.save(checkpoint, path)
    return path


BAD_CHECKPOINTS = {
    "missing": "no checkpoint at",
    "truncated": "not a readable checkpoint",
    "not-a-checkpoint": "not a checkpoint written by train.py",
    "unknown-model": "unknown model",
    "class-mismatch": "do not fit",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line(trained, tmp_path, good, kind):
    checkpoint, _ = trained
    path = corrupt_checkpoint(kind, tmp_path, checkpoint)
    result = predict(path, good)
    assert_one_line_error(result, str(path), BAD_CHECKPOINTS[kind], code=2)


@pytest.mark.slow
def test_a_text_file_given_as_checkpoint_is_named_as_such(tmp_path, good):
    path = corrupt_checkpoint("not-a-checkpoint", tmp_path, None)
    result = predict(path, good)
    assert result.stderr == f"predict.py: error: {path}: not a checkpoint written by train.py (not a torch file)\n"


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_checkpoint_that_would_run_code_is_refused(tmp_path, good):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": "airnet_xs", "payload": RunsCode(marker)}, path)
    result = predict(path, good)
    assert_one_line_error(
        result,
        str(path),
        "not a checkpoint written by train.py (it holds Python objects that a safe load refuses to build)",
        code=2,
    )
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset,how",
    [
        ("cifar100", "train one with: python3 train.py --dataset cifar100 --out-dir {out}; or, where train.py wrote "
                     "elsewhere, give its --out-dir, or --checkpoint PATH"),
        ("folder", "train one with: python3 train.py --dataset folder --data-dir <folder of <class>/ folders, or "
                   "of train/ and test/> --out-dir {out}; or, where train.py wrote elsewhere, give its --out-dir, or "
                   "--checkpoint PATH"),
        ("imagenet", "'imagenet' is not a dataset train.py trains (cifar10, cifar100, fashion-mnist, folder); if it is "
                     "a folder of your own images, train one with: python3 train.py --dataset folder --data-dir "
                     "<path to imagenet/> --out-dir {out}; else give --checkpoint PATH"),
    ],
)  # fmt: skip
def test_missing_default_checkpoint_says_how_to_make_it(tmp_path, good, dataset, how):
    out = tmp_path / "my runs"  # train.py writes elsewhere unless given the same --out-dir
    result = run_script("predict.py", "--out-dir", out, "--dataset", dataset, good)
    expected = f"no checkpoint at {out / dataset / 'distilled.pt'}; {how.format(out=shlex.quote(str(out)))}"
    assert_one_line_error(result, expected, code=2)


@pytest.mark.slow
def test_without_dataset_the_one_trained_dataset_under_out_dir_is_used(trained, tmp_path, good):
    checkpoint, _ = trained
    (tmp_path / "folder").mkdir()
    shutil.copy(checkpoint, tmp_path / "folder" / "distilled.pt")  # as after train.py --dataset folder
    result = run_script("predict.py", "--out-dir", tmp_path, good)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(": ")[1].split()[0] in CLASSES
    inside = run_script("predict.py", "--out-dir", tmp_path / "folder", good)  # the dataset's folder given as --out-dir
    assert inside.returncode == 0 and inside.stdout == result.stdout, inside.stderr
    shutil.copy(checkpoint, tmp_path / "distilled.pt")  # one beside the dataset folders as well: which is meant?
    both = run_script("predict.py", "--out-dir", tmp_path, good)
    assert_one_line_error(both, f"{tmp_path} holds a distilled.pt and folder/distilled.pt; pick one with --checkpoint "
                          "PATH", code=2)  # fmt: skip
    (tmp_path / "distilled.pt").unlink()
    explicit = run_script("predict.py", "--out-dir", tmp_path, "--dataset", "cifar10", good)  # as before
    assert_one_line_error(explicit, "cifar10/distilled.pt", "python3 train.py --dataset cifar10", code=2)
    (tmp_path / "cifar100").mkdir()
    shutil.copy(checkpoint, tmp_path / "cifar100" / "distilled.pt")
    several = run_script("predict.py", "--out-dir", tmp_path, good)
    assert several.returncode == 2 and several.stdout == ""
    assert several.stderr == (
        f"predict.py: error: {tmp_path} holds a distilled.pt for 2 datasets (cifar100, folder); "
        f"pick one with --dataset NAME or --checkpoint PATH\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,flag",
    [
        (["--top-k", "0"], "--top-k"),
        (["--device", "tpu"], "--device"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--max-pixels", "0"], "--max-pixels"),
        (["--bogus"], "--bogus"),
    ],
)
def test_usage_errors_exit_2(trained, good, args, flag):
    checkpoint, _ = trained
    assert_one_line_error(predict(checkpoint, good, *args), flag, code=2)
