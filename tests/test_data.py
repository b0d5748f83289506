import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import datafiles
from conftest import CIFAR10_NAMES, tensor_dataset, write_cifar10, write_cifar100, write_fashion_mnist, write_image_tree


def check_splits(splits, n_train, n_test, shape, num_classes):
    assert splits.train_x.dtype == torch.uint8 and splits.test_x.dtype == torch.uint8
    assert splits.train_y.dtype == torch.int64
    assert tuple(splits.train_x.shape) == (n_train, *shape)
    assert tuple(splits.test_x.shape) == (n_test, *shape)
    assert len(splits.classes) == num_classes
    assert int(splits.train_y.min()) >= 0 and int(splits.train_y.max()) < num_classes


@pytest.mark.parametrize("archive", [True, False])
def test_cifar10_archive_and_folder(tmp_path, archive):
    write_cifar10(tmp_path, per_class_train=6, per_class_test=2, archive=archive)
    splits = datafiles.load_cifar("cifar10", tmp_path, [], 32, download=False)
    check_splits(splits, 60, 20, (3, 32, 32), 10)
    assert splits.classes == CIFAR10_NAMES
    assert torch.bincount(splits.train_y).tolist() == [6] * 10


def test_cifar10_pixels_keep_their_channel_order(tmp_path):
    write_cifar10(tmp_path, archive=False)
    splits = datafiles.load_cifar("cifar10", tmp_path, [], 32, download=False)
    # the generator brightens channel label % 3 of every image
    for image, label in zip(splits.train_x[:10], splits.train_y[:10]):
        means = image.float().mean(dim=(1, 2))
        assert int(means.argmax()) == int(label) % 3


@pytest.mark.parametrize("archive", [True, False])
def test_cifar100_archive_and_folder(tmp_path, archive):
    write_cifar100(tmp_path, archive=archive)
    splits = datafiles.load_cifar("cifar100", tmp_path, [], 32, download=False)
    check_splits(splits, 200, 100, (3, 32, 32), 100)
    assert splits.classes[:2] == ["class000", "class001"]


def test_cifar_image_tree(tmp_path):
    write_image_tree(tmp_path, classes=CIFAR10_NAMES[:4], per_class_train=3, per_class_test=2, mixed=False)
    splits = datafiles.load_cifar("cifar10", tmp_path, [tmp_path], 32, download=False)
    check_splits(splits, 12, 8, (3, 32, 32), 4)
    assert splits.classes == CIFAR10_NAMES[:4]


def test_corrupt_cifar_archive_is_named(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(datafiles.DataError, match="cifar-10-python.tar.gz: corrupt"):
        datafiles.load_cifar("cifar10", tmp_path, [], 32, download=False)


def test_crafted_cifar_pickle_is_refused(tmp_path):
    folder = write_cifar10(tmp_path, archive=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    import pickle

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(datafiles.DataError, match="data_batch_1"):
        datafiles.load_cifar("cifar10", tmp_path, [], 32, download=False)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(datafiles.DataError) as error:  # (cifar10 falls back to the bundled copy: tests/test_bundled.py)
        datafiles.load_cifar("cifar100", tmp_path / "nowhere", [], 32, download=False)
    assert "nowhere" in str(error.value) and "cifar-100-python.tar.gz" in str(error.value)
    assert "--data-dir" in str(error.value)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx(tmp_path, compress):
    arrays = write_fashion_mnist(tmp_path, compress=compress)
    splits = datafiles.load_fashion_mnist("fashion-mnist", tmp_path, [], 28, download=False)
    check_splits(splits, 40, 20, (1, 28, 28), 10)
    assert torch.equal(splits.train_x[:, 0], torch.from_numpy(arrays["train"][0]))
    assert splits.train_y.tolist() == arrays["train"][1].tolist()
    assert splits.classes[0] == "T-shirt/top"


def test_the_system_fashion_mnist_stands_in_only_with_fallback(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "system")
    monkeypatch.setattr(datafiles, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "system"))
    (tmp_path / "empty").mkdir()
    splits = datafiles.load_fashion_mnist("fashion-mnist", tmp_path / "empty", [], 28, download=False)
    assert splits.source == str(tmp_path / "system") and len(splits.train_y) == 40
    with pytest.raises(datafiles.DataError) as error:
        datafiles.load_fashion_mnist("fashion-mnist", tmp_path / "empty", [], 28, download=False, fallback=False)
    assert str(error.value) == (
        f"no Fashion-MNIST IDX files in {tmp_path / 'empty'}, {tmp_path / 'empty' / 'FashionMNIST' / 'raw'}; "
        f"put the four *-ubyte.gz files in {tmp_path / 'empty'} (or point --data-dir at them)"
    )


def test_truncated_idx_is_named(tmp_path):
    write_fashion_mnist(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(datafiles.DataError, match="train-images-idx3-ubyte: corrupt"):
        datafiles.load_fashion_mnist("fashion-mnist", tmp_path, [], 28, download=False)


def test_folder_of_mixed_sizes_and_modes(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class_train=8, per_class_test=3, mixed=True)
    splits = datafiles.load_folder("folder", root, [tmp_path / "cache"], 24)
    check_splits(splits, 24, 9, (3, 24, 24), 3)
    assert splits.classes == ["cat", "dog", "fish"]
    assert splits.train_y.tolist() == [0] * 8 + [1] * 8 + [2] * 8


@pytest.mark.parametrize("held_out", ["val", "validation"])
def test_a_val_or_validation_folder_is_the_held_out_split(tmp_path, held_out):
    root = write_image_tree(tmp_path / "tree", per_class_train=3, per_class_test=2, mixed=False)
    (root / "test").rename(root / held_out)
    for splits in (
        datafiles.load_folder("folder", root, [tmp_path / "cache"], 32),
        datafiles.load_cifar("cifar10", root, [tmp_path / "cache"], 32, download=False),
    ):
        check_splits(splits, 9, 6, (3, 32, 32), 3)
        assert splits.test_y.tolist() == [0, 0, 1, 1, 2, 2]


def test_image_tree_cache_is_reused_and_rebuilt_on_change(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class_train=2, per_class_test=1, mixed=False)
    (tmp_path / "unwritable").write_text("a file where a folder should be")
    first = datafiles.load_folder("folder", root, [tmp_path / "unwritable", tmp_path / "out"], 32)
    caches = list((tmp_path / "out").glob(".decoded-*.pt"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    again = datafiles.load_folder("folder", root, [tmp_path / "out"], 32)
    assert caches[0].stat().st_mtime_ns == stamp and "cached" in again.source
    assert torch.equal(first.train_x, again.train_x)
    time.sleep(0.01)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "cat" / "extra.png")
    changed = datafiles.load_folder("folder", root, [tmp_path / "out"], 32)
    assert len(changed.train_y) == len(first.train_y) + 1


def test_corrupt_image_in_tree_is_named(tmp_path):
    root = write_image_tree(tmp_path, per_class_train=2, per_class_test=1, mixed=False)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(datafiles.DataError, match="broken.jpg"):
        datafiles.load_folder("folder", root, [tmp_path], 32)


TREE_MISTAKES = {  # mistake -> what the error says, {root} standing for the tree
    "empty train class": "no training images for class bird (no image files in {root}/train/<class>/); add some "
    "there, or remove the class from both {root}/train and {root}/test",
    "class only in test": "{root}/test has class folders that {root}/train lacks: zebra; rename each to match its "
    "train/ class, remove it, or give it training images in {root}/train",
    "classes only in test, many": "{root}/test has class folders that {root}/train lacks: z0, z1, z2, z3, z4 and 2 "
    "more; rename",
    "class spelt otherwise in test": "{root}/test has class folders that {root}/train lacks: Cat ({root}/train has "
    "'cat'; names are case-sensitive)",
    "images loose in test": "{root}/test has no class folders; sort its images into {root}/test/<class>/, with the "
    "class folders of {root}/train",
    "class missing from test": "no held-out images for classes dog, fish (no image files in {root}/test/<class>/); "
    "add some there, or remove the classes from both {root}/train and {root}/test",
}


@pytest.mark.parametrize("mistake", sorted(TREE_MISTAKES))
def test_splits_that_disagree_on_the_classes_are_refused_before_decoding(tmp_path, mistake):
    root = write_image_tree(tmp_path / "tree", per_class_train=2, per_class_test=1, mixed=False)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg: decoding it would fail first")
    if mistake == "empty train class":
        (root / "train" / "bird").mkdir()
        (root / "test" / "bird").mkdir()
    elif mistake == "class only in test":
        (root / "test" / "zebra").mkdir()
        shutil.copy(root / "test" / "cat" / "0000.png", root / "test" / "zebra")
    elif mistake == "classes only in test, many":  # named five at most: the error stays one readable line
        for name in [f"z{i}" for i in range(7)]:
            (root / "test" / name).mkdir()
    elif mistake == "images loose in test":  # as ImageNet's val/ comes
        for folder in list((root / "test").iterdir()):
            for image in folder.iterdir():
                image.rename(root / "test" / f"{folder.name}-{image.name}")
            folder.rmdir()
    elif mistake == "class spelt otherwise in test":
        (root / "test" / "cat").rename(root / "test" / "Cat")
    else:
        (root / "test" / "dog" / "0000.png").rename(root / "test" / "dog" / "notes.txt")  # a folder without images
        shutil.rmtree(root / "test" / "fish")
    with pytest.raises(datafiles.DataError) as error:
        datafiles.load_folder("folder", root, [tmp_path / "cache"], 32)
    assert str(error.value).startswith(TREE_MISTAKES[mistake].format(root=root))


def test_validation_split_is_disjoint_stratified_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, val = data.stratified_split(labels, 10, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert torch.bincount(labels[val]).tolist() == [5, 3, 2]
    assert torch.equal(val, data.stratified_split(labels, 10, seed=3)[1])
    assert not torch.equal(val, data.stratified_split(labels, 10, seed=4)[1])


def test_load_moves_to_device_and_normalises(tmp_path):
    write_cifar10(tmp_path, archive=False)
    dataset = data.load("cifar10", tmp_path, val_size=10, download=False)
    assert len(dataset.val_y) == 10 and len(dataset.train_y) == 50
    assert torch.bincount(dataset.val_y).tolist() == [1] * 10
    batch = data.normalize(dataset.train_x, dataset.mean, dataset.std)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert batch.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (batch.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_augment_keeps_shape_and_labels_and_flips_really_flip():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    generator = torch.Generator().manual_seed(0)
    flipped_any = False
    for _ in range(20):
        out = data.augment(images, padding=0, flip=True, generator=generator)
        assert out.shape == images.shape
        for i in range(2):  # each image is either itself or its mirror: labels stay aligned
            assert torch.equal(out[i], images[i]) or torch.equal(out[i], images[i].flip(-1))
            flipped_any |= torch.equal(out[i], images[i].flip(-1))
    assert flipped_any


def test_alternating_flip_flips_each_image_every_other_epoch():
    first, second, third = (data.alternating_flips(1000, epoch, seed=3, device="cpu") for epoch in (1, 2, 3))
    assert torch.equal(second, ~first) and torch.equal(third, first)  # each image both ways every two epochs
    assert 400 < int(first.sum()) < 600  # a random half, not a pattern
    assert torch.equal(first, data.alternating_flips(1000, 1, seed=3, device="cpu"))  # the seed alone decides
    assert not torch.equal(first, data.alternating_flips(1000, 1, seed=4, device="cpu"))


def test_train_batches_flip_exactly_the_images_they_are_told_to():
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(6)
    dataset = tensor_dataset(images, labels, 6, (0.0,) * 3, (1 / 255,) * 3)
    flips = torch.tensor([True, False, True, True, False, False])
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    batches = list(data.train_batches(dataset, order, 3, 0, flips, torch.Generator(), channels_last=False))
    for batch, batch_labels in batches:
        for image, label in zip(batch, batch_labels):
            expected = images[label].flip(-1) if flips[label] else images[label]
            assert torch.equal(image, expected.float()), int(label)
    assert torch.equal(torch.cat([b[1] for b in batches]), order)


@pytest.mark.parametrize("world", [2, 3])
def test_the_parts_of_a_torchrun_job_make_up_exactly_the_single_process_batches(world):
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40)
    dataset = tensor_dataset(images, labels, 40, (0.5,) * 3, (0.25,) * 3)
    order = torch.randperm(40)

    def batches(shard):
        generator = torch.Generator().manual_seed(7)
        out = list(data.train_batches(dataset, order, 12, 2, True, generator, shard=shard))
        return out, generator.get_state()

    whole, whole_state = batches((0, 1))
    parts = [batches((rank, world)) for rank in range(world)]
    for step, (batch, batch_labels) in enumerate(whole):
        for rank, (part, state) in enumerate(parts):
            assert torch.equal(part[step][0], batch[rank::world])
            assert torch.equal(part[step][1], batch_labels[rank::world])
            assert torch.equal(state, whole_state)  # every process's generator stays in step
    assert sum(len(part[0][1]) for part, _ in parts) == len(whole[0][1])


LAYOUTS = {  # the loaders keep images channels last
    "NCHW": lambda images: images,
    "channels_last": lambda images: images.contiguous(memory_format=torch.channels_last),
    "with gaps": lambda images: torch.cat([images, images], dim=3)[..., :8],
    "channels_last, offset": lambda images: torch.cat([images[:3], images]).contiguous(
        memory_format=torch.channels_last
    )[3:],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_flipped_crop_is_the_mirror_of_a_window_of_the_padded_image(layout):
    images = LAYOUTS[layout](torch.randint(1, 255, (20, 3, 8, 8), dtype=torch.uint8))
    index, flip = torch.randperm(20)[:12], torch.arange(12) % 2 == 0
    out = data.augment(images, padding=2, flip=flip, generator=torch.Generator().manual_seed(2), index=index)
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    for i in range(12):
        unflipped = out[i].flip(-1) if flip[i] else out[i]
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(unflipped, padded[index[i], :, dy : dy + 8, dx : dx + 8])]  # fmt: skip
        assert windows, f"image {i} is not a {'mirrored ' if flip[i] else ''}window of the padded image"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_crop_is_a_shifted_window_of_the_reflection_padded_image(layout):
    images = LAYOUTS[layout](torch.randint(1, 255, (20, 3, 8, 8), dtype=torch.uint8))
    index = torch.randperm(20)[:16]  # the batch's images, gathered with their crops
    generator = torch.Generator().manual_seed(1)
    out = data.augment(images, padding=2, flip=False, generator=generator, index=index)
    assert out.shape == (16, 3, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    shifted = 0
    for i in range(16):
        windows = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[index[i], :, dy : dy + 8, dx : dx + 8])
        ]
        assert windows, "crop is not a window of the padded image"
        shifted += windows != [(2, 2)]
    assert shifted > 8


def test_train_batches_cover_the_epoch_once(tmp_path):
    write_cifar10(tmp_path, archive=False)
    dataset = data.load("cifar10", tmp_path, val_size=0, download=False)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(60, generator=generator)
    labels = torch.cat([y for _, y in data.train_batches(dataset, order, 20, 4, True, generator)])
    assert len(labels) == 60 and torch.equal(torch.bincount(labels), torch.bincount(dataset.train_y))
    assert torch.equal(labels, dataset.train_y[order])


def test_train_batches_continue_exactly_from_a_saved_position(tmp_path):
    write_cifar10(tmp_path, archive=False)
    dataset = data.load("cifar10", tmp_path, val_size=0, download=False)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(60, generator=generator)
    state = generator.get_state()
    whole = [x for x, _ in data.train_batches(dataset, order, 10, 4, True, generator)]
    generator.set_state(state)
    batches = data.train_batches(dataset, order, 10, 4, True, generator)
    first_two = [next(batches), next(batches)]
    restored = torch.Generator().manual_seed(12345)  # as in a new process: only the saved state carries over
    restored.set_state(generator.get_state())
    rest = [x for x, _ in data.train_batches(dataset, order, 10, 4, True, restored, start=2)]
    assert len(rest) == 4 and all(torch.equal(a, b) for a, b in zip(whole[2:], rest))
    assert torch.equal(first_two[0][0], whole[0])


def test_a_download_reaches_the_data_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    import torchvision

    class Complete:  # torchvision's CIFAR10 where the network works: the archive lands in root
        def __init__(self, root, train, download):
            write_cifar10(root)

    class CutShort:  # Ctrl-C half-way through the download
        def __init__(self, root, train, download):
            with open(os.path.join(root, "cifar-10-python.tar.gz"), "wb") as half:
                half.write(b"\x1f\x8b\x08 half an archive")
            raise KeyboardInterrupt

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Complete)
    splits = datafiles.load_cifar("cifar10", tmp_path / "new", [tmp_path / "new"], 32)
    assert len(splits.train_y) == 60 and splits.classes == CIFAR10_NAMES
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["cifar-10-python.tar.gz"]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", CutShort)
    with pytest.raises(KeyboardInterrupt):
        datafiles.load_cifar("cifar10", tmp_path / "cut", [tmp_path / "cut"], 32, fallback=False)
    assert list((tmp_path / "cut").iterdir()) == []  # nothing that the next run would take for the dataset


def grey_tree(root, colour_file=None):
    """A train/ + test/ tree of grey digits-like images saved as RGB PNGs (optionally one in colour)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for label in ("0", "1"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                grey = (rng.random((28, 28)) * 255).astype(np.uint8)
                Image.fromarray(np.stack([grey] * 3, -1)).save(root / split / label / f"{i}.png")
    if colour_file:
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / colour_file)


def test_a_tree_of_grey_images_trains_on_one_channel(tmp_path):
    grey_tree(tmp_path)
    splits = datafiles.load_folder("folder", tmp_path, [tmp_path], 32)
    assert splits.train_x.shape == (8, 1, 32, 32) and splits.test_x.shape == (4, 1, 32, 32)
    rgb = datafiles.load_image_tree(tmp_path, 32, 3, [tmp_path])
    assert torch.equal(splits.train_x[:, 0], rgb.train_x[:, 1])


def test_one_colour_image_keeps_a_tree_in_three_channels(tmp_path):
    grey_tree(tmp_path, colour_file="test/1/colour.png")
    splits = datafiles.load_folder("folder", tmp_path, [tmp_path], 32)
    assert splits.train_x.shape[1] == 3 and splits.test_x.shape[1] == 3
