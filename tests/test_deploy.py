"""Deploying: the preprocessing contract that datafiles.load_image keeps and the
exported files state, and predict.py giving one answer for a checkpoint, its
.onnx and its .pt2 on the images people actually have (transparent PNGs,
large photos), with the decompression-bomb limit and vector images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import datafiles
import export
from conftest import assert_one_line_error, coloured_images, run_script, train_teacher, write_cifar10

# ---------------------------------------------------------------- load_image


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 0, 40)
    rgba[..., 3] = [0, 85, 170, 255]  # alpha per column
    Image.fromarray(rgba).save(tmp_path / "logo.png")
    loaded = datafiles.load_image(tmp_path / "logo.png", 4, 3)
    # 255 * (1 - a) + colour * a, a = alpha / 255, rounded
    assert loaded[:, 0].tolist() == [[255, 237, 218, 200], [255, 170, 85, 0], [255, 183, 112, 40]]
    assert (loaded[:, :, :] == loaded[:, :1, :]).all()  # every row alike


def test_grey_with_alpha_is_composited_onto_white_for_a_grey_checkpoint(tmp_path):
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0], la[..., 1] = 100, [0, 85, 170, 255]
    Image.fromarray(la, "LA").save(tmp_path / "grey.png")
    assert datafiles.load_image(tmp_path / "grey.png", 4, 1)[0, 0].tolist() == [255, 203, 152, 100]


def test_a_transparent_palette_colour_is_white_whatever_colour_it_stores(tmp_path):
    indices = np.array([[0, 0, 1, 1]] * 4, np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 0, 0, 255, 0, 0])  # index 0 black (transparent), index 1 red
    image.save(tmp_path / "palette.png", transparency=0)
    loaded = datafiles.load_image(tmp_path / "palette.png", 4, 3)
    assert loaded[:, 0].T.tolist() == [[255, 255, 255], [255, 255, 255], [255, 0, 0], [255, 0, 0]]


def smooth_photo(path, width, height, label=3):
    """A JPEG of a coloured_images picture enlarged to width x height (smooth, so it compresses and encodes fast)."""
    Image.fromarray(coloured_images([label], size=16, seed=label)[0]).resize((width, height)).save(path, quality=90)
    return path


@pytest.mark.parametrize("size", [32, 224])
def test_a_large_jpeg_decoded_at_reduced_scale_is_within_2_levels_of_the_full_decode(tmp_path, size):
    picture = Image.fromarray(coloured_images([3], size=16, seed=3)[0]).resize((3000, 2000), Image.Resampling.NEAREST)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 2000x3000
    picture.save(tmp_path / "photo.jpg", quality=90, exif=exif)
    with Image.open(tmp_path / "photo.jpg") as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    full = np.asarray(datafiles.resize_and_crop(upright, size), dtype=np.int16).transpose(2, 0, 1)
    # 7 levels apart at 224 if the JPEG were reduced all the way to size, without the factor 2 to spare
    assert np.abs(datafiles.load_image(tmp_path / "photo.jpg", size, 3).astype(np.int16) - full).max() <= 2


def test_a_108_megapixel_photo_is_within_the_default_limit(tmp_path):
    path = tmp_path / "108mp.jpg"
    Image.linear_gradient("L").resize((12000, 9000)).save(path, quality=80)  # grey: quick to write
    loaded = datafiles.load_image(path, 32, 3)
    assert loaded.shape == (3, 32, 32)
    expected = 255 * (np.arange(32) + 0.5) / 32  # black to white downwards: row i averages its 1/32 of the height
    assert np.abs(loaded[:, :, 16] - expected).max() <= 3


def test_an_image_over_max_pixels_is_refused_before_decoding(tmp_path):
    path = smooth_photo(tmp_path / "photo.jpg", 3000, 2000)
    with pytest.raises(datafiles.TooLarge) as refused:
        datafiles.load_image(path, 32, 3, max_pixels=5_999_999)
    assert str(refused.value) == (
        f"{path}: image too large (3000x2000, 6,000,000 pixels, over the limit of 5,999,999 against decompression "
        f"bombs)"
    )
    assert refused.value.pixels == 6_000_000
    assert datafiles.load_image(path, 32, 3, max_pixels=6_000_000).shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["logo.svg", "logo.SVGZ"])
def test_a_vector_image_is_named_as_such(tmp_path, name):
    (tmp_path / name).write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    with pytest.raises(datafiles.DataError) as refused:
        datafiles.load_image(tmp_path / name, 32, 3)
    assert str(refused.value) == f"{tmp_path / name}: vector images (SVG) are not supported; convert it to a PNG first"


# ---------------------------------------------------------------- predict.py on a checkpoint, its .onnx and its .pt2


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A teacher checkpoint trained by train.py on tiny CIFAR-10 data, its .onnx and its .pt2, and
    the images: a partly transparent RGBA PNG whose transparent pixels store black, a 3000x2000
    photo and a 108-megapixel one."""
    root = tmp_path_factory.mktemp("deploy")
    write_cifar10(root / "data", per_class_train=10, per_class_test=4)
    checkpoint = train_teacher(root / "data", root / "out", 4)
    files = {"pt": checkpoint}
    for fmt in ("onnx", "pt2"):
        files[fmt] = root / f"teacher.{fmt}"
        result = run_script("export.py", "--checkpoint", checkpoint, "--format", fmt, "--out", files[fmt])
        assert result.returncode == 0, result.stderr
    rgba = np.zeros((120, 180, 4), np.uint8)
    rgba[30:90, 45:135, :3] = coloured_images([1], size=180, seed=9)[0][:60, :90]  # the logo, opaque
    rgba[30:90, 45:135, 3] = 255
    rgba[20:100, 35:145, 3] = np.maximum(rgba[20:100, 35:145, 3], 128)  # a half-transparent black rim
    images = [root / "logo.png", smooth_photo(root / "photo.jpg", 3000, 2000, label=7), root / "108mp.jpg"]
    Image.fromarray(rgba).save(images[0])
    Image.linear_gradient("L").resize((12000, 9000)).save(images[2], quality=80)
    return files, images


@pytest.mark.slow
def test_predict_gives_the_same_answers_on_the_checkpoint_its_onnx_and_its_pt2(deployed):
    files, images = deployed
    runs = {fmt: run_script("predict.py", "--checkpoint", path, *images, "--json", "--top-k", "10")
            for fmt, path in files.items()}  # fmt: skip
    for fmt, result in runs.items():
        assert result.returncode == 0 and result.stderr == "", (fmt, result.stderr)
    answers = {fmt: json.loads(result.stdout) for fmt, result in runs.items()}
    for fmt in ("onnx", "pt2"):
        for expected, got in zip(answers["pt"], answers[fmt]):
            assert got["file"] == expected["file"]
            assert got["predictions"][0]["class"] == expected["predictions"][0]["class"]
            by_class = {p["class"]: p["prob"] for p in got["predictions"]}
            assert max(abs(p["prob"] - by_class[p["class"]]) for p in expected["predictions"]) <= export.TOLERANCE


@pytest.mark.slow
def test_the_exported_files_state_the_preprocessing(deployed):
    files, _ = deployed
    for fmt in ("onnx", "pt2"):
        info = export.CLASSIFIERS[fmt](files[fmt]).info
        assert info["channels"] == "R, G, B in that order (not BGR)"
        assert info["input"].startswith("uint8 array (N, C, H, W)")
        assert "onto RGB (255, 255, 255) (white)" in info["transparency"]
        assert "Image.resize(BILINEAR), which antialiases" in info["resize"]
        assert len(info["mean"]) == len(info["std"]) == 3 and info["tta"] is True


@pytest.mark.slow
def test_the_pixel_limit_names_its_flag_and_a_vector_image_is_one_line(deployed, tmp_path):
    files, images = deployed
    (tmp_path / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    result = run_script("predict.py", "--checkpoint", files["onnx"], images[0], images[1], "--max-pixels", "5000000")
    assert_one_line_error(result, code=1)
    assert result.stderr == (
        f"predict.py: error: {images[1]}: image too large (3000x2000, 6,000,000 pixels, over the limit of 5,000,000 "
        f"against decompression bombs); classify it with --max-pixels 6000000\n"
    )
    assert result.stdout.startswith(f"{images[0]}: ")
    result = run_script("predict.py", "--checkpoint", files["pt"], tmp_path / "logo.svg")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"predict.py: error: {tmp_path / 'logo.svg'}: vector images (SVG) are not supported; convert it to a PNG "
        f"first\n"
    )


def broken_pt2(kind, tmp_path, good_pt2):
    path = tmp_path / f"{kind}.pt2"
    if kind == "truncated":
        blob = good_pt2.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "a-checkpoint":  # a torch file, but not a torch.export program
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "no-metadata":  # a torch.export program that export.py did not write
        torch.export.save(torch.export.export(torch.nn.Flatten(), (torch.zeros(2, 3),)), path)
    return path


BAD_PT2 = {
    "truncated": "not a readable torch.export program (truncated, or another kind of file); make one with: "
    "python3 export.py --format pt2",
    "a-checkpoint": "not a readable torch.export program (truncated, or another kind of file); make one with: "
    "python3 export.py --format pt2",
    "no-metadata": "a file without this repo's metadata (classes, preprocessing); make one with: "
    "python3 export.py --format pt2",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BAD_PT2))
def test_a_bad_pt2_file_is_one_line(deployed, tmp_path, kind):
    files, images = deployed
    path = broken_pt2(kind, tmp_path, files["pt2"])
    result = run_script("predict.py", "--checkpoint", path, images[0])
    assert_one_line_error(result, code=2)
    assert result.stderr == f"predict.py: error: {path}: {BAD_PT2[kind]}\n"
