"""Datasets as whole uint8 tensors on the training device, and batched augmentation.

A dataset is read once (datafiles.py) into one uint8 tensor per split on the
device, shaped (N, C, H, W). There is no per-sample Dataset or DataLoader:
batches are sliced from the device tensor and augmented all at once (random
crop with padding, horizontal flip), which is what makes small-network
training fast (see airbench).
"""

import functools
from dataclasses import dataclass, field, replace

import torch

import datafiles

DATASETS = {  # name -> loader(name, data_dir, cache_dirs, image_size, download, fallback)
    "cifar10": datafiles.load_cifar,
    "cifar100": datafiles.load_cifar,
    "fashion-mnist": datafiles.load_fashion_mnist,
    "folder": datafiles.load_folder,
}


# ---------------------------------------------------------------- splits and batches


def stratified_split(labels, val_size, seed, each=False):
    """Indices (train, val) with `val_size` validation items, classes in proportion.

    Each class gives floor(val_size * share) items, and the remaining items go
    to the classes with the largest remainders, so the total is exact. each:
    every class of two items or more gives at least one (the total may then
    exceed val_size)."""
    labels = labels.cpu()
    n = len(labels)
    if not 0 <= val_size < n:
        raise datafiles.DataError(f"--val-size {val_size} must be between 0 and the {n} training images minus one")
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels)
    exact = counts.double() * val_size / n
    take = exact.floor().long()
    remainder = val_size - int(take.sum())
    take[torch.argsort(exact - take, descending=True, stable=True)[:remainder]] += 1
    if each:
        take = torch.maximum(take, (counts > 1).long())
    train_parts, val_parts = [], []
    for label, count in enumerate(take.tolist()):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        val_parts.append(members[:count])
        train_parts.append(members[count:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


@dataclass
class Data:
    """Train, validation and test tensors on the training device, ready to batch."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list
    mean: tuple  # per channel, in [0, 1]
    std: tuple
    source: str
    test_files: list | None = None  # a single <class>/* tree: its test images, relative to it (see split_tree)
    notes: list = field(default_factory=list)  # what load decided for the user to know, a line each

    @property
    def in_channels(self):
        return self.train_x.shape[1]

    @property
    def image_size(self):
        return self.train_x.shape[-1]

    def normalize(self, images, channels_last=True):
        """uint8 images of this dataset -> float32, normalised by its training set's statistics."""
        return normalize(images, self.mean, self.std, channels_last)


def fitted_val_size(val_size, labels):
    """The validation split's size for these training labels, and a line when
    it is not `val_size`: a split of more than half of the training images
    shrinks to a tenth of them (at least one per class, see stratified_split),
    so that a few hundred images of one's own are not refused for the
    CIFAR-sized default."""
    n = len(labels)
    if val_size <= n // 2:
        return val_size, None
    fitted = max(n // 10, 1)
    return fitted, f"VAL_SIZE {val_size} is too large for {n} training images; validating on {fitted} of them instead"


def split_tree(splits, test_fraction, seed):
    """A single <class>/* tree split into train and test, stratified, by
    `seed`: the same files, fraction and seed give the same split. Returns
    the splits and the test files' relative paths."""
    n_test = max(round(len(splits.train_y) * test_fraction), 1)
    train_idx, test_idx = stratified_split(splits.train_y, n_test, seed, each=True)
    x, y = splits.train_x, splits.train_y
    test_files = [splits.files[i] for i in test_idx.tolist()]
    return replace(
        splits, train_x=x[train_idx], train_y=y[train_idx], test_x=x[test_idx], test_y=y[test_idx]
    ), test_files


def load(
    name,
    data_dir,
    cache_dirs=(),
    image_size=32,
    val_size=5000,
    seed=0,
    device="cpu",
    download=True,
    fallback=True,
    test_fraction=0.2,
):
    """Load dataset `name`, carve a stratified validation split, move to `device`.
    A single <class>/* tree is first split into train and test (test_fraction).

    fallback: whether a dataset missing from `data_dir` (and not downloaded)
    may come from the bundled CIFAR-10 copy or the system Fashion-MNIST. They
    stand in for a first run's default folder; for a folder the user named,
    they would hide a typo behind other data."""
    if name not in DATASETS:
        raise datafiles.DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    splits = DATASETS[name](name, data_dir, [data_dir, *cache_dirs], image_size, download, fallback)
    if len(splits.classes) < 2:
        raise datafiles.DataError(f"{splits.source}: need at least two classes, found {len(splits.classes)}")
    test_files, notes = None, []
    if splits.files is not None:
        splits, test_files = split_tree(splits, test_fraction, seed)
        notes.append(f"split: {len(test_files)} of the {len(test_files) + len(splits.train_y)} images held out for "
                     f"testing (TEST_FRACTION {test_fraction:g}, seed {seed})")  # fmt: skip
    fitted, note = fitted_val_size(val_size, splits.train_y)
    notes += [note] if note else []
    train_idx, val_idx = stratified_split(splits.train_y, fitted, seed, each=fitted != val_size)
    train_x = splits.train_x[train_idx]
    mean, std = channel_stats(train_x)
    return Data(
        train_x.to(device),
        splits.train_y[train_idx].to(device),
        splits.train_x[val_idx].to(device),
        splits.train_y[val_idx].to(device),
        splits.test_x.to(device),
        splits.test_y.to(device),
        list(splits.classes),
        mean,
        std,
        splits.source,
        test_files,
        notes,
    )


def channel_stats(images):
    """Exact per-channel mean and std in [0, 1] of uint8 images, from histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].flatten().long(), minlength=256).double()
        counts /= counts.sum()
        mean = float((counts * values).sum())
        means.append(mean)
        stds.append(max(float((counts * (values - mean) ** 2).sum()) ** 0.5, 1e-3))
    return tuple(means), tuple(stds)


@functools.lru_cache(maxsize=16)
def _stats_on(mean, std, device):
    """Per-channel mean and std in uint8 units as tensors on `device`, made once:
    building them per batch would copy from the host, a sync on a GPU every step."""
    return (
        torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255,
        torch.tensor(std, device=device).view(1, -1, 1, 1) * 255,
    )


def normalize(images, mean, std, channels_last=True):
    """uint8 (N, C, H, W) -> float32 normalised, channels_last by default."""
    mean, std = _stats_on(tuple(mean), tuple(std), images.device)
    out = (images.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def mirror_index(index, size):
    """Indices outside [0, size) reflected back inside, without repeating the
    edge (as torch's 'reflect' padding): -1 -> 1, size -> size - 2."""
    return (size - 1) - (size - 1 - index.abs()).abs()


def augment(images, padding, flip, generator, index=None):
    """Random translation and horizontal flip, for a whole batch: the images
    of `index` (all of them by default), in one gather.

    Each image is shifted by its own offset in [-padding, padding] along each
    axis, with the border filled by reflection (a random crop of the image
    padded in 'reflect' mode, as in airbench). padding must be smaller than
    the image. flip: True gives each image its own coin; a bool tensor (one
    per image of the batch) says which to flip; False flips none. The batch's
    images, rows and columns (mirrored where flipped) become one index into
    the images' memory (read through their strides: the loaders keep them
    channels last), laid out channels last, so the batch comes out
    channels_last without another copy."""
    index = torch.arange(len(images), device=images.device) if index is None else index.to(images.device)
    n, (channels, height, width), device = len(index), images.shape[1:], images.device
    rows = torch.arange(height, device=device).expand(n, height)
    cols = torch.arange(width, device=device).expand(n, width)
    if padding > 0:
        dy = torch.randint(-padding, padding + 1, (n, 1), device=device, generator=generator)
        dx = torch.randint(-padding, padding + 1, (n, 1), device=device, generator=generator)
        rows, cols = mirror_index(dy + rows, height), mirror_index(dx + cols, width)
    if not torch.is_tensor(flip):
        flip = torch.rand(n, device=device, generator=generator) < 0.5 if flip else None
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    if not (images.is_contiguous() or images.is_contiguous(memory_format=torch.channels_last)):
        images = images.contiguous()  # neither layout: the flat view below needs one of them
    stride = images.stride()
    offsets = (
        index[:, None, None, None] * stride[0]
        + rows[:, :, None, None] * stride[2]
        + cols[:, None, :, None] * stride[3]
        + torch.arange(channels, device=device) * stride[1]
    )  # (n, height, width, channels)
    memory = images.as_strided((images.numel(),), (1,))
    return memory.take(offsets).permute(0, 3, 1, 2)


def alternating_flips(n, epoch, seed, device):
    """Which of n training images to flip in `epoch` (counted from 1) under
    alternating flip (airbench): a fixed random half in odd epochs, the other
    half in even ones. Every two epochs each image is seen both ways, where
    fresh coins leave a quarter of them unflipped (or flipped) twice running.
    Drawn from `seed` alone, so a resumed run flips the same images."""
    half = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    return (half ^ (epoch % 2 == 0)).to(device)


def train_batches(data, order, batch_size, padding, flip, generator, channels_last=True, start=0, shard=(0, 1)):
    """Augmented, normalised batches of one epoch, in the given `order` (a
    permutation of the training set), from step `start` on; the last partial
    batch is dropped. Augmentation draws from `generator`, so a run that
    restores the generator and the order continues exactly. flip: as in
    augment, with a tensor holding one entry per training image.

    shard = (rank, world_size): in a job of world_size processes, this one
    gets every world_size-th image of each batch, from the rank-th on. Every
    process draws the augmentation of the whole batch, so their generators
    stay in step and the shards together are exactly the batch that one
    process would train on."""
    rank, world = shard
    batch_size = min(batch_size, len(order))
    for first in range(start * batch_size, len(order) - batch_size + 1, batch_size):
        index = order[first : first + batch_size]
        images = augment(data.train_x, padding, flip[index] if torch.is_tensor(flip) else flip, generator, index)
        yield normalize(images[rank::world], data.mean, data.std, channels_last), data.train_y[index][rank::world]


def steps_per_epoch(data, batch_size):
    return len(data.train_y) // min(batch_size, len(data.train_y))
