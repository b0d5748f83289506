"""Deploying: the preprocessing contract that data.load_image keeps on the
images people actually have (transparent PNGs, large photos), with the
decompression-bomb limit and vector images."""

import numpy as np
import pytest
from PIL import Image, ImageOps

import data
from conftest import coloured_images

# ---------------------------------------------------------------- load_image


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 0, 40)
    rgba[..., 3] = [0, 85, 170, 255]  # alpha per column
    Image.fromarray(rgba).save(tmp_path / "logo.png")
    loaded = data.load_image(tmp_path / "logo.png", 4, 3)
    # 255 * (1 - a) + colour * a, a = alpha / 255, rounded
    assert loaded[:, 0].tolist() == [[255, 237, 218, 200], [255, 170, 85, 0], [255, 183, 112, 40]]
    assert (loaded[:, :, :] == loaded[:, :1, :]).all()  # every row alike


def test_grey_with_alpha_is_composited_onto_white_for_a_grey_checkpoint(tmp_path):
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0], la[..., 1] = 100, [0, 85, 170, 255]
    Image.fromarray(la, "LA").save(tmp_path / "grey.png")
    assert data.load_image(tmp_path / "grey.png", 4, 1)[0, 0].tolist() == [255, 203, 152, 100]


def test_a_transparent_palette_colour_is_white_whatever_colour_it_stores(tmp_path):
    indices = np.array([[0, 0, 1, 1]] * 4, np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 0, 0, 255, 0, 0])  # index 0 black (transparent), index 1 red
    image.save(tmp_path / "palette.png", transparency=0)
    loaded = data.load_image(tmp_path / "palette.png", 4, 3)
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
    full = np.asarray(data.resize_and_crop(upright, size), dtype=np.int16).transpose(2, 0, 1)
    # 7 levels apart at 224 if the JPEG were reduced all the way to size, without the factor 2 to spare
    assert np.abs(data.load_image(tmp_path / "photo.jpg", size, 3).astype(np.int16) - full).max() <= 2


def test_a_108_megapixel_photo_is_within_the_default_limit(tmp_path):
    path = tmp_path / "108mp.jpg"
    Image.linear_gradient("L").resize((12000, 9000)).save(path, quality=80)  # grey: quick to write
    loaded = data.load_image(path, 32, 3)
    assert loaded.shape == (3, 32, 32)
    expected = 255 * (np.arange(32) + 0.5) / 32  # black to white downwards: row i averages its 1/32 of the height
    assert np.abs(loaded[:, :, 16] - expected).max() <= 3


def test_an_image_over_max_pixels_is_refused_before_decoding(tmp_path):
    path = smooth_photo(tmp_path / "photo.jpg", 3000, 2000)
    with pytest.raises(data.TooLarge) as refused:
        data.load_image(path, 32, 3, max_pixels=5_999_999)
    assert str(refused.value) == (
        f"{path}: image too large (3000x2000, 6,000,000 pixels, over the limit of 5,999,999 against decompression "
        f"bombs)"
    )
    assert refused.value.pixels == 6_000_000
    assert data.load_image(path, 32, 3, max_pixels=6_000_000).shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["logo.svg", "logo.SVGZ"])
def test_a_vector_image_is_named_as_such(tmp_path, name):
    (tmp_path / name).write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    with pytest.raises(data.DataError) as refused:
        data.load_image(tmp_path / name, 32, 3)
    assert str(refused.value) == f"{tmp_path / name}: vector images (SVG) are not supported; convert it to a PNG first"
