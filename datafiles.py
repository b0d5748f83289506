"""Reading datasets from files: archives, IDX files, image trees and single
images, decoded to uint8 tensors, with a cache of decoded trees, downloads
that leave nothing half-written, and atomic writes of any file.

Every loader returns Splits: the train and test images as one uint8 tensor
each, shaped (N, C, H, W), with int64 labels and class names.

Sources:
- cifar10 / cifar100: the official python-batch archive or its extracted
  folder, or a tree train/<class>/* + test/<class>/* of image files, in
  DATA_DIR; otherwise torchvision downloads the archive. When cifar10 cannot
  be had that way, the JPEG copy bundled in datasets/ is read instead (a
  fallback the caller may forbid, see `load_cifar`).
- fashion-mnist: the official IDX files (.gz or not) in DATA_DIR, then in
  /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist; also a
  fallback); otherwise torchvision downloads them.
- folder: any train/<class>/* + test/<class>/* tree of images (test/ may
  also be called val/ or validation/), with the same classes in both; or a
  single <class>/* tree (torchvision's ImageFolder layout), returned whole
  as train images with their relative paths in Splits.files, for data.load
  to split.
Decoded image trees are cached (see `load_image_tree`).
"""

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
READABLE = " ".join(sorted(IMAGE_EXTENSIONS))  # for messages on files it cannot read
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CACHE_VERSION = 2  # bump when the decoded-tree cache format or load_image's decoding changes
HELD_OUT = ("test", "val", "validation")  # names of an image tree's held-out split, in order of preference
BUNDLED_CIFAR10 = Path(__file__).resolve().parent / "datasets" / "cifar10-jpeg.tar.gz"

# load_image checks an image's size against its own max_pixels, before
# decoding it: one limit, which a caller can raise past Pillow's default.
Image.MAX_IMAGE_PIXELS = None
MAX_PIXELS = 250_000_000  # larger images are refused as possible decompression bombs (a 200-megapixel photo passes)
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white, as a viewer shows them on a page
VECTOR_SUFFIXES = (".svg", ".svgz")
SPLIT_FILE = "split.json"  # in OUT_DIR/<dataset>/: how train.py split a single <class>/* tree, for predict.py


class DataError(Exception):
    """A problem with the user's data, reported as one line."""


class TooLarge(DataError):
    """An image over load_image's max_pixels, a limit the caller may raise
    to `pixels`, the image's own count."""

    def __init__(self, message, pixels):
        super().__init__(message)
        self.pixels = pixels


@dataclass
class Splits:
    """A dataset as uint8 image tensors (N, C, H, W) and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list
    source: str  # where the data was read from, for logs
    files: list | None = None  # a single <class>/* tree: the train images' paths relative to it (no test split)


def atomic_write(path, write):
    """Write a file through a temporary file and os.replace, so that a crash
    never leaves a half-written file where a good one was. `write(temporary)`
    writes the content."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------- images


def load_image(path, size, channels=3, max_pixels=MAX_PIXELS):
    """Decode one image file the way training data is decoded (`preprocessing`
    states how, for the metadata of exported files).

    Returns a uint8 array (C, size, size). Raises DataError naming the file,
    TooLarge for an image of more than `max_pixels` pixels.
    """
    if Path(str(path)).suffix.lower() in VECTOR_SUFFIXES:
        raise DataError(f"{path}: vector images (SVG) are not supported; convert it to a PNG first")
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise TooLarge(
                    f"{path}: image too large ({image.width}x{image.height}, {pixels:,} pixels, over the limit "
                    f"of {max_pixels:,} against decompression bombs)",
                    pixels,
                )
            image.draft(None, (2 * size, 2 * size))  # a JPEG decodes at 1/2, 1/4 or 1/8 scale, still >= 2 x size
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(image, dtype=np.float64)
                high = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                image = Image.fromarray(np.clip(array / high * 255.0, 0, 255).astype(np.uint8))
            image = flatten_transparency(image).convert("RGB" if channels == 3 else "L")
            if image.width < 2 or image.height < 2:
                raise DataError(f"{path}: image is only {image.width}x{image.height} pixels; need at least 2x2")
            array = np.asarray(resize_and_crop(image, size), dtype=np.uint8)
    except DataError:
        raise
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable") from None
    except (OSError, ValueError, SyntaxError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        suffix = Path(str(path)).suffix.lower()
        if isinstance(error, UnidentifiedImageError) and suffix in IMAGE_EXTENSIONS:
            reason += f"; not a {suffix} image, or damaged: replace or remove it"
        elif isinstance(error, UnidentifiedImageError):  # a format Pillow cannot decode (HEIC, RAW)
            reason += f"; it reads {READABLE}: convert it to JPEG or PNG"
        raise DataError(f"{path}: cannot read image ({reason})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def preprocessing(size, channels):
    """What load_image does, in words and numbers, for the metadata of an
    exported file: a consumer without this repo must repeat it exactly."""
    colour = "R, G, B in that order (not BGR)" if channels == 3 else "grey, Pillow's L = 0.299 R + 0.587 G + 0.114 B"
    return {
        "input": "uint8 array (N, C, H, W), channels first, values 0-255 (not scaled to 0-1: the graph normalises)",
        "image_size": size,
        "in_channels": channels,
        "channels": colour,
        "decode": "EXIF orientation applied; 16-bit images scaled by 255/65535, 32-bit integer and float ones by "
        "255/their maximum",
        "transparency": f"composited onto RGB {BACKGROUND} (white) before the conversion to "
        f"{'RGB' if channels == 3 else 'grey'}: alpha channels, and palette or colour images with a transparent colour",
        "resize": "short side to image_size, long side to Python's round(long * image_size / short), with Pillow's "
        "Image.resize(BILINEAR), which antialiases when shrinking (its triangle filter widens by the shrink factor, "
        "as torchvision's resize with antialias=True; OpenCV's INTER_LINEAR does not); a JPEG is first decoded by "
        "libjpeg at the most reduced of 1/8, 1/4, 1/2 scale that keeps both sides >= 2 x image_size, if any "
        "(Pillow's Image.draft)",
        "crop": "the centre square: left = (width - image_size) // 2, top = (height - image_size) // 2",
    }


def flatten_transparency(image):
    """`image` composited onto BACKGROUND if it has transparency (an alpha
    channel, or a palette or colour marked transparent), else itself. The
    colour stored under a transparent pixel is arbitrary (often black), so
    dropping the alpha channel would classify what nobody sees."""
    if not image.has_transparency_data:
        return image
    return Image.alpha_composite(Image.new("RGBA", image.size, (*BACKGROUND, 255)), image.convert("RGBA"))


def resize_and_crop(image, size):
    """The short side resized to `size` (Pillow's bilinear filter, which
    antialiases: it widens with the shrink factor), then the centre square."""
    if image.size == (size, size):
        return image
    scale = size / min(image.size)
    resized = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def list_images(folder):
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_folders(root):
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def held_out_folder(root):
    """The held-out split of an image tree: test/, else val/ or validation/
    (the spelling of timm and ImageFolder users), or None."""
    return next((Path(root) / name for name in HELD_OUT if (Path(root) / name).is_dir()), None)


def is_image_tree(root):
    return (Path(root) / "train").is_dir() and held_out_folder(root) is not None


def is_class_tree(root):
    """A single <class>/<image> tree: class folders holding images, no train/."""
    root = Path(root)
    if not root.is_dir() or (root / "train").is_dir():
        return False
    return any(list_images(folder) for folder in class_folders(root))


def class_tree_files(root):
    """The classes of a single <class>/* tree and each one's image files; a
    class folder without images is refused, as in tree_files."""
    classes = [p.name for p in class_folders(root)]
    per_class = [list_images(Path(root) / c) for c in classes]
    empty = [c for c, found in zip(classes, per_class) if not found]
    if empty:
        plural = "es" * (len(empty) > 1)
        raise DataError(f"no images for class{plural} {listed(empty)} (no image files in {root}/<class>/); add some "
                        f"there, or remove the class{plural}")  # fmt: skip
    return classes, per_class


def load_class_tree(root, size, channels, cache_dirs):
    """Decode a single <class>/* tree once (then reuse a cache, as
    load_image_tree), as train images alone, with their relative paths."""
    root = Path(root)
    classes, per_class = class_tree_files(root)
    found = [f for files in per_class for f in files]
    files = [f.relative_to(root).as_posix() for f in found]
    name = cache_name(root, size, channels)
    blob, cached = read_cache(cache_dirs, name, tree_fingerprint(found))
    if blob is None:
        train_x, train_y = decode_split(root, per_class, size, channels)
        blob = {"fingerprint": tree_fingerprint(found), "classes": classes, "train_x": train_x, "train_y": train_y}
        write_cache(cache_dirs, name, blob)
    empty = blob["train_x"][:0]
    source = str(root) if cached is None else f"{root} (cached in {cached})"
    return Splits(blob["train_x"], blob["train_y"], empty, blob["train_y"][:0], blob["classes"], source, files)


def tree_fingerprint(files):
    """Hash of names, sizes and modification times: changes when the files do."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def decode_split(split, per_class, size, channels):
    """uint8 images and int64 labels of one split's files, listed per class."""
    from tqdm import tqdm

    files = [f for found in per_class for f in found]
    images = np.stack(
        [
            load_image(f, size, channels)
            for f in tqdm(files, desc=f"decoding {split}", leave=False, mininterval=1, disable=None)
        ]
    )
    labels = [label for label, found in enumerate(per_class) for _ in found]
    return torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64)


def listed(names, limit=5):
    """`names` joined by commas: the first `limit` of them and a count of the
    rest, so that a tree of a thousand classes still gets a one-line error."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def tree_files(train, held_out):
    """The class names of an image tree and, for train/ and the held-out
    split, the image files of each class, from directory listings alone.

    The classes are train/'s folders. A tree whose splits do not hold the same
    classes, each with images, is refused here, before any decoding: it would
    silently train on a class with no images, or test fewer classes than it
    trains, dropping the images of a misspelt held-out folder."""
    classes = [p.name for p in class_folders(train)]
    if not classes:
        raise DataError(f"{train} has no class folders; expected {train}/<class>/<image files>")
    held_out_classes = {p.name for p in class_folders(held_out)}
    if not held_out_classes:
        raise DataError(f"{held_out} has no class folders; sort its images into {held_out}/<class>/, with the "
                        f"class folders of {train}")  # fmt: skip
    lower = {c.lower(): c for c in classes}
    unknown = [
        f"{name} ({train} has {lower[name.lower()]!r}; names are case-sensitive)" if name.lower() in lower else name
        for name in sorted(held_out_classes - set(classes))
    ]
    if unknown:
        raise DataError(
            f"{held_out} has class folders that {train} lacks: {listed(unknown)}; rename each to match its "
            f"train/ class, remove it, or give it training images in {train}"
        )
    files = {
        split: [list_images(split / c) if (split / c).is_dir() else [] for c in classes] for split in (train, held_out)
    }
    for split, per_class in files.items():
        empty = [c for c, found in zip(classes, per_class) if not found]
        if empty:
            kind, plural = "training" if split == train else "held-out", "es" * (len(empty) > 1)
            raise DataError(
                f"no {kind} images for class{plural} {listed(empty)} (no image files in {split}/<class>/); add "
                f"some there, or remove the class{plural} from both {train} and {held_out}"
            )
    return classes, files[train], files[held_out]


def cache_name(path, size, channels):
    """The decoded-image cache's file name for a tree or archive at `path`."""
    key = hashlib.sha256(f"{Path(path).resolve()}|{size}|{channels}|{CACHE_VERSION}".encode()).hexdigest()[:12]
    return f".decoded-{Path(path).name}-{size}px-{channels}ch-{key}.pt"


def read_cache(cache_dirs, name, fingerprint):
    """(the cached tensors, the file) from the first of `cache_dirs` whose
    cache `name` matches `fingerprint`, or (None, None)."""
    for folder in cache_dirs:
        cached = Path(folder) / name
        if cached.is_file():
            try:
                blob = torch.load(cached, weights_only=True)
                if blob.get("fingerprint") == fingerprint:
                    return blob, cached
            except Exception:  # a stale or broken cache is simply rebuilt
                pass
    return None, None


def write_cache(cache_dirs, name, blob):
    """Save the cache in the first of `cache_dirs` that can be written to
    (none: it is rebuilt next time)."""
    for folder in cache_dirs:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(folder) / name, lambda p: torch.save(blob, p))
            break
        except OSError:
            continue


def load_image_tree(root, size, channels, cache_dirs):
    """Decode a train/<class>/*, test/<class>/* (or val/, validation/) tree
    once, then reuse a cache.

    The cache is a torch file named after the tree, the image size and the
    channel count. It is written to the first writable folder of `cache_dirs`
    and rebuilt whenever a file in the tree is added, removed or changed."""
    root = Path(root)
    held_out = held_out_folder(root)
    classes, train_files, test_files = tree_files(root / "train", held_out)
    fingerprint = tree_fingerprint([f for found in train_files + test_files for f in found])
    name = cache_name(root, size, channels)
    blob, cached = read_cache(cache_dirs, name, fingerprint)
    if blob is not None:
        return Splits(
            blob["train_x"],
            blob["train_y"],
            blob["test_x"],
            blob["test_y"],
            blob["classes"],
            f"{root} (cached in {cached})",
        )
    train_x, train_y = decode_split(root / "train", train_files, size, channels)
    test_x, test_y = decode_split(held_out, test_files, size, channels)
    write_cache(
        cache_dirs,
        name,
        {
            "fingerprint": fingerprint,
            "classes": classes,
            "train_x": train_x,
            "train_y": train_y,
            "test_x": test_x,
            "test_y": test_y,
        },
    )
    return Splits(train_x, train_y, test_x, test_y, classes, str(root))


def origin(source):
    """Splits.source without the cache the images were read from this time,
    which says nothing about the data: for results, which compare sources."""
    return source.split(" (cached in ")[0]


def read_archive_tree(path):
    """{(split, class, file name): bytes} of the image files of a .tar.gz that
    holds a train/<class>/* + test/<class>/* tree (under any top folder),
    read into memory: nothing is extracted to disk."""
    files = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                name = PurePosixPath(member.name)
                if (
                    member.isfile()
                    and len(name.parts) >= 3
                    and name.parts[-3] in ("train", "test")
                    and name.suffix.lower() in IMAGE_EXTENSIONS
                ):
                    files[name.parts[-3:]] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: corrupt or unreadable archive ({error})") from None
    return files


def load_image_archive(path, size, channels, cache_dirs, source):
    """An image tree packed as a .tar.gz (see read_archive_tree), decoded
    from memory by load_image, as image files on disk are, then cached as
    load_image_tree caches; the cache is rebuilt when the archive's size or
    modification time changes. Classes and files come in the order of the
    extracted tree, so both give the same tensors."""
    path = Path(path)
    fingerprint = tree_fingerprint([path])
    name = cache_name(path, size, channels)
    blob, _ = read_cache(cache_dirs, name, fingerprint)
    if blob is None:
        files = read_archive_tree(path)
        classes = sorted({label for split, label, _ in files if split == "train"})
        blob = {"fingerprint": fingerprint, "classes": classes}
        from tqdm import tqdm

        for split in ("train", "test"):
            keys = sorted(key for key in files if key[0] == split and key[1] in classes)
            if not keys:
                raise DataError(f"{path}: the archive holds no {split}/<class>/ image files")
            images = []
            for key in tqdm(keys, desc=f"decoding {path.name} {split}", leave=False, mininterval=1, disable=None):
                try:
                    images.append(load_image(io.BytesIO(files[key]), size, channels))
                except DataError:
                    raise DataError(
                        f"{path}: {'/'.join(key)} is not a readable image; the archive is damaged"
                    ) from None
            blob[f"{split}_x"] = torch.from_numpy(np.stack(images))
            blob[f"{split}_y"] = torch.tensor([classes.index(key[1]) for key in keys], dtype=torch.int64)
        write_cache(cache_dirs, name, blob)
    return Splits(blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], blob["classes"], source)


# ---------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches, which hold only numpy arrays, lists and bytes.

    Anything else (a crafted file that would run code) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _unpickle_batch(raw, name):
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        return {_text(k): v for k, v in batch.items()}
    except Exception as error:
        raise DataError(f"{name}: not a readable CIFAR python batch ({error})") from None


CIFAR_LAYOUTS = {  # name -> folder inside the archive, train files, test files, meta file, label key, names key
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}
CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


def _cifar_from_reader(read, where, name):
    """Build Splits from CIFAR python batches; `read(file)` returns its bytes."""
    folder, train_files, test_files, meta_file, label_key, names_key = CIFAR_LAYOUTS[name]

    def load(files):
        images, labels = [], []
        for file in files:
            batch = _unpickle_batch(read(file), f"{where}/{file}")
            try:
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels += list(batch[label_key])
            except (KeyError, ValueError) as error:
                raise DataError(f"{where}/{file}: not a {name} batch ({error})") from None
        return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)

    train_x, train_y = load(train_files)
    test_x, test_y = load(test_files)
    classes = [_text(c) for c in _unpickle_batch(read(meta_file), f"{where}/{meta_file}")[names_key]]
    return Splits(train_x, train_y, test_x, test_y, classes, where)


def _read_cifar_folder(path, name):
    def read(file):
        try:
            return (Path(path) / file).read_bytes()
        except OSError as error:
            raise DataError(f"{path}/{file}: cannot read ({error.strerror})") from None

    return _cifar_from_reader(read, str(path), name)


def _read_cifar_archive(path, name):
    folder = CIFAR_LAYOUTS[name][0]
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {m.name: m for m in archive.getmembers() if m.isfile()}

            def read(file):
                member = members.get(f"{folder}/{file}")
                if member is None:
                    raise DataError(
                        f"{path}: {folder}/{file} is missing from the archive; is it the {name} python archive?"
                    )
                return archive.extractfile(member).read()

            return _cifar_from_reader(read, str(path), name)
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: corrupt or unreadable archive ({error}); delete it or download it again") from None


def download_whole(download, data_dir, files):
    """Run a torchvision `download(root)` in a hidden temporary folder of
    data_dir, then move `files` (paths within it) into data_dir: a download
    cut short (Ctrl-C, a lost connection) leaves nothing there that a later
    run would take for the dataset."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as root:
        download(root)
        for file in files:
            (Path(data_dir) / file).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(root) / file, Path(data_dir) / file)


def load_cifar(name, data_dir, cache_dirs, image_size, download=True, fallback=True):
    data_dir = Path(data_dir)
    folder = CIFAR_LAYOUTS[name][0]
    archive = data_dir / CIFAR_ARCHIVES[name]
    if is_image_tree(data_dir):
        return load_image_tree(data_dir, 32, 3, cache_dirs)
    if (data_dir / folder).is_dir():
        return _read_cifar_folder(data_dir / folder, name)
    if archive.is_file():
        return _read_cifar_archive(archive, name)
    bundled = name == "cifar10" and fallback and BUNDLED_CIFAR10.is_file()
    if download:
        import torchvision

        dataset_class = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
        try:
            download_whole(lambda root: dataset_class(root, train=True, download=True), data_dir, [archive.name])
        except Exception as error:
            reason = str(error).splitlines()[0][:120]
            if bundled:
                return load_bundled_cifar10(data_dir, cache_dirs, f"the download failed ({reason})")
            raise DataError(
                f"no {name} data in {data_dir} and the download failed ({reason}). "
                f"Put {CIFAR_ARCHIVES[name]} (or its extracted {folder}/, or a train/<class>/ + test/<class>/ "
                f"image tree) in {data_dir}, or point --data-dir at it"
            ) from None
        return _read_cifar_archive(archive, name)
    if bundled:
        return load_bundled_cifar10(data_dir, cache_dirs, "downloads are off")
    raise DataError(f"no {name} data in {data_dir}: put {CIFAR_ARCHIVES[name]} there, or point --data-dir at it")


def load_bundled_cifar10(data_dir, cache_dirs, why):
    """CIFAR-10 from the JPEG copy in datasets/, so that a machine with no
    network and no data folder still runs the pipeline. It says so in one
    line, before the decoding, since JPEG costs a little accuracy against the
    lossless original. Its cache goes to the other cache folders (the run's
    output folder), not to DATA_DIR, which holds nothing of this copy."""
    print(
        f"data: no CIFAR-10 in {data_dir}/ and {why}, so this run uses the copy bundled with the repo, "
        f"{BUNDLED_CIFAR10}: JPEG at quality about 75, expect accuracies a few tenths of a point below the "
        f"lossless original, which is used instead once {CIFAR_ARCHIVES['cifar10']} is in {data_dir}/",
        flush=True,
    )
    return load_image_archive(
        BUNDLED_CIFAR10,
        32,
        3,
        [d for d in cache_dirs if Path(d) != Path(data_dir)],
        f"{BUNDLED_CIFAR10} (the JPEG copy bundled with the repo)",
    )


# ---------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path):
    """Read an IDX file (optionally gzip'd) into a numpy array."""
    try:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as file:
            raw = file.read()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
            raise ValueError("bad magic number; not an unsigned-byte IDX file")
        dims = raw[3]
        shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
        body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
        if body.size != int(np.prod(shape)):
            raise ValueError(f"holds {body.size} bytes of data, header says {shape}")
        return body.reshape(shape)
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: corrupt or unreadable IDX file ({error})") from None


def _find_idx(folder, stem):
    for candidate in (Path(folder) / stem, Path(folder) / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(name, data_dir, cache_dirs, image_size, download=True, fallback=True):
    folders = [Path(data_dir), Path(data_dir) / "FashionMNIST" / "raw"]
    folders += [Path(FASHION_MNIST_SYSTEM_DIR)] if fallback else []
    for folder in folders:
        found = {key: _find_idx(folder, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if all(found.values()):
            arrays = {key: read_idx(path) for key, path in found.items()}
            return Splits(
                torch.from_numpy(arrays["train_x"].copy())[:, None],
                torch.from_numpy(arrays["train_y"].astype(np.int64)),
                torch.from_numpy(arrays["test_x"].copy())[:, None],
                torch.from_numpy(arrays["test_y"].astype(np.int64)),
                list(FASHION_MNIST_CLASSES),
                str(folder),
            )
    looked = ", ".join(str(f) for f in folders)
    fix = f"put the four *-ubyte.gz files in {data_dir} (or point --data-dir at them)" + (
        ", or install them with 'apt-get install dataset-fashion-mnist'" if fallback else ""
    )
    if download:
        import torchvision

        def both_splits(root):
            torchvision.datasets.FashionMNIST(root, train=True, download=True)
            torchvision.datasets.FashionMNIST(root, train=False, download=True)

        try:
            raw = [f"FashionMNIST/raw/{stem}.gz" for stem in FASHION_MNIST_FILES.values()]
            download_whole(both_splits, data_dir, raw)
        except Exception as error:
            raise DataError(
                f"no Fashion-MNIST IDX files in {looked} and the download failed "
                f"({str(error).splitlines()[0][:120]}); {fix}"
            ) from None
        return load_fashion_mnist(name, data_dir, cache_dirs, image_size, download=False, fallback=fallback)
    raise DataError(f"no Fashion-MNIST IDX files in {looked}; {fix}")


# ---------------------------------------------------------------- image folders


def load_folder(name, data_dir, cache_dirs, image_size, download=True, fallback=True):
    if is_class_tree(data_dir):
        return one_channel_if_grey(load_class_tree(data_dir, image_size, 3, cache_dirs))
    if not is_image_tree(data_dir):
        raise DataError(
            f"{data_dir} is not an image tree: expected {data_dir}/train/<class>/* and "
            f"{data_dir}/test/<class>/* (or val/, validation/), or {data_dir}/<class>/*; point --data-dir at such "
            "a folder"
        )
    return one_channel_if_grey(load_image_tree(data_dir, image_size, 3, cache_dirs))


def one_channel_if_grey(splits):
    """A tree whose every image is grey (R = G = B) trains on one channel.
    Three equal channels triple the input for nothing, and leave two thirds of
    the directions of AirNet's whitening stem without variance (predict.py
    then turns colour photos grey, as Pillow's 'L' mode does)."""
    images = (splits.train_x, splits.test_x)
    if not all(torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2]) for x in images):
        return splits
    return replace(splits, train_x=splits.train_x[:, :1].clone(), test_x=splits.test_x[:, :1].clone())


def expected_contents(name):
    """What DATA_DIR should hold for dataset `name`, in words, for messages."""
    tree = "train/<class>/ + test/<class>/ image folders (test/ may be val/ or validation/)"
    if name in CIFAR_ARCHIVES:
        return f"{CIFAR_ARCHIVES[name]}, its extracted {CIFAR_LAYOUTS[name][0]}/, or {tree}"
    if name == "fashion-mnist":
        return ", ".join(f"{stem}.gz" for stem in FASHION_MNIST_FILES.values()) + " (or the same unzipped)"
    return f"{tree}, or <class>/ folders"
