"""Classify image files with a checkpoint saved by train.py.

    python3 predict.py photo.jpg                    # the distilled student under OUT_DIR (see default_checkpoint)
    python3 predict.py a.png b.jpg some_folder/ --top-k 3
    python3 predict.py *.png --checkpoint checkpoints/cifar10/teacher.pt --json
    python3 predict.py data/cifar10-jpeg/test --evaluate
    python3 predict.py photo.jpg --checkpoint checkpoints/cifar10/distilled.onnx   # or .pt2, a file of export.py
    python3 predict.py huge.tif --max-pixels 400000000                            # above the default limit

Every image is prepared exactly as training images were (datafiles.load_image):
EXIF orientation is applied, transparent pixels are composited onto white,
it is converted to the checkpoint's channels (RGB, or grey), its short side
is resized to the checkpoint's image size (Pillow's antialiased bilinear; a
large JPEG is decoded at a reduced scale first) and the centre square is
cropped, then it is normalised with the checkpoint's mean and std. Like
train.py's test accuracy, predictions average each image and its mirror when
the checkpoint was evaluated that way (flip TTA). An .onnx or .pt2 file
written by export.py (ONNX Runtime, or the torch.export program) does its own
normalisation and TTA, and gives the same output. Images of more than
--max-pixels pixels are refused as possible decompression bombs.

Exit status: 0 when every file was classified, 1 when any failed, 2 for a
usage error (bad flag, missing or unusable checkpoint).
"""

import collections
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import checkpoint
import config
import data
import datafiles
import export
import models
import runtime

PROG = "predict.py"


def add_arguments(parser):
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders of images")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint to use, or an .onnx or .pt2 file of export.py (default: OUT_DIR/DATASET/distilled.pt, or "
        "OUT_DIR/distilled.pt where --out-dir names a dataset's folder)",
    )
    parser.add_argument("--dataset", default=None, metavar="STR",
                        help="the dataset folder under OUT_DIR whose distilled.pt to use (default: the one that has "
                        f"a distilled.pt, where only one does; else {config.DATASET})")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=1, help="how many classes to show per image (default: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON list on stdout")
    parser.add_argument("--recursive", action="store_true", help="also read images in subfolders")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    parser.add_argument("--max-pixels", type=int, default=datafiles.MAX_PIXELS, metavar="INT",
                        help="refuse images with more pixels, as possible decompression bombs "
                        f"(default: {datafiles.MAX_PIXELS})")  # fmt: skip
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="treat each folder as <class>/<images> and report accuracy and a confusion summary",
    )


def usage_error(message):
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(2)


def default_checkpoint(out_dir, dataset):
    """(OUT_DIR/<dataset>/distilled.pt, dataset). Without --dataset, the
    dataset is the one under OUT_DIR that has a distilled.pt, if only one does:
    after train.py --dataset folder, a bare predict.py uses what it trained;
    an OUT_DIR that holds a distilled.pt itself is taken as a dataset's folder."""
    if dataset is None:
        found = sorted(path.parent.name for path in Path(out_dir).glob("*/distilled.pt"))
        if (Path(out_dir) / "distilled.pt").is_file():  # --out-dir named a dataset's folder itself
            if found:
                usage_error(f"{out_dir} holds a distilled.pt and {', '.join(f'{d}/distilled.pt' for d in found)}; "
                            f"pick one with --checkpoint PATH")  # fmt: skip
            return Path(out_dir) / "distilled.pt", Path(out_dir).resolve().name
        if len(found) > 1:
            usage_error(f"{out_dir} holds a distilled.pt for {len(found)} datasets ({', '.join(found)}); "
                        f"pick one with --dataset NAME or --checkpoint PATH")  # fmt: skip
        dataset = found[0] if found else config.DATASET
    return Path(out_dir) / dataset / "distilled.pt", dataset


def load_model(path, how, device):
    """The checkpoint's model in eval mode, and the checkpoint dict; for an
    .onnx or .pt2 file of export.py, its export.CLASSIFIERS reader and the
    same keys from its metadata. how: what to do when there is no file at `path`."""
    if not Path(path).is_file():
        usage_error(f"no checkpoint at {path}; {how}")
    reader = export.CLASSIFIERS.get(Path(path).suffix.lower().removeprefix("."))
    if reader is not None:
        try:
            model = reader(path)
        except ValueError as error:
            usage_error(f"{path}: {error}")
        return model, model.info
    try:
        saved = checkpoint.load(path)
        model = checkpoint.build_model(saved)
    except (ValueError, OSError) as error:
        usage_error(f"{path}: {error}")
    return model.to(device).eval().to(memory_format=torch.channels_last), saved


def expand(paths, recursive, evaluate):
    """(file, None) for every input image, or (path, error) for an unusable
    input; and a note for each folder whose other files were skipped, named by
    extension, so that photos in a format it cannot read (HEIC, RAW) are not
    missed without a word."""
    items, notes = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            pattern = "**/*" if (recursive or evaluate) else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file())
            found = [p for p in files if p.suffix.lower() in datafiles.IMAGE_EXTENSIONS]
            skipped = skipped_files(path, (p for p in files if p.suffix.lower() not in datafiles.IMAGE_EXTENSIONS))
            if found and skipped:
                notes.append(f"{PROG}: {path}: skipped {skipped}")
            empty = "folder holds no image files" + (f"; it has {skipped}" if skipped else "")
            items += [(p, None) for p in found] or [(path, empty)]
        elif path.exists():
            items.append((path, None))
        else:
            items.append((path, "no such file or folder"))
    return items, notes


def skipped_files(folder, files):
    """'2 .heic, 1 .txt (not images it reads: .bmp ... .webp)' for these files
    of `folder`, or '' for none; hidden ones (.DS_Store, .git/) are not counted."""
    shown = [p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    counts = collections.Counter(p.suffix.lower() or "without extension" for p in shown)
    if not counts:
        return ""
    counted = ", ".join(f"{n} {suffix}" for suffix, n in counts.most_common())
    return f"{counted} (not images it reads: {datafiles.READABLE})"


def refuse_whole_dataset(paths):
    """--evaluate labels each image by its folder, so a dataset folder given
    whole, or a folder holding one (data/ with data/cifar10-jpeg/train/ in
    it), would score its training images too: it is refused, naming the
    held-out split to give instead."""
    for raw in map(Path, paths):
        trees = sorted(folder.parent for folder in raw.rglob("train") if datafiles.is_image_tree(folder.parent))
        if trees:  # the outermost first: raw itself, when it is one
            where = "is" if trees[0] == raw else f"holds one, {trees[0]}:"
            held_out = datafiles.held_out_folder(trees[0])
            usage_error(f"{raw} {where} a whole dataset (train/ and {held_out.name}/): --evaluate on it would count "
                        f"the training images; give {held_out}, the held-out images")  # fmt: skip


def refuse_foreign_folders(items, classes):
    """--evaluate labels each image by its folder: every folder must be named after a class of the checkpoint."""
    unknown = sorted({p.parent.name for p, error in items if error is None} - set(classes))
    if unknown:
        usage_error(
            f"--evaluate needs <class>/<image> folders named after the checkpoint's classes; "
            f"{', '.join(unknown[:5])} {'is' if len(unknown) == 1 else 'are'} not among "
            f"{', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}"
        )


def recorded_test_images(items, paths, split_file, classes):
    """The images --evaluate scores, once their folders are checked against
    `classes`: on the single <class>/* tree that train.py split (its
    split.json, beside the checkpoint, names the tree), the recorded test
    images of that tree alone, the others having been trained on."""
    refuse_foreign_folders(items, classes)
    if not split_file.is_file():
        return items
    split = json.loads(split_file.read_text())
    root = Path(split["root"])
    if not any(Path(raw).resolve() == root for raw in paths):
        return items
    test = {root / name for name in split["test"]}
    kept = [(p, error) for p, error in items if root not in p.resolve().parents or p.resolve() in test]
    print(f"{root}: evaluating the {len(test)} test images recorded in {split_file}", file=sys.stderr)
    return kept


def read_image(path, size, channels, max_pixels):
    """uint8 (C, size, size) array, or an error string that names the problem."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        return datafiles.load_image(path, size, channels, max_pixels)
    except datafiles.TooLarge as error:
        return f"{str(error).removeprefix(f'{path}: ')}; classify it with --max-pixels {error.pixels}"
    except datafiles.DataError as error:
        return str(error).removeprefix(f"{path}: ")
    except PermissionError:
        return "permission denied"
    except OSError as error:
        return f"cannot read ({error.strerror or error})"


@torch.no_grad()
def predict(model, images, checkpoint, device):
    """Class probabilities for a uint8 batch, with the checkpoint's normalisation and TTA."""
    if isinstance(model, tuple(export.CLASSIFIERS.values())):  # an exported file normalises and averages flips itself
        return model(images)
    batch = data.normalize(images.to(device), checkpoint["mean"], checkpoint["std"])
    return models.probabilities(model, batch, checkpoint.get("tta", False)).cpu()


def classify(items, model, checkpoint, device, batch_size, max_pixels):
    """Yield (path, probabilities or None, error or None) in input order.

    Files are decoded by a thread pool (Pillow releases the GIL while
    decoding) and classified in batches."""
    size, channels = checkpoint["image_size"], checkpoint["in_channels"]
    with ThreadPoolExecutor() as pool:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            decoded = list(pool.map(lambda item: item[1] or read_image(item[0], size, channels, max_pixels), chunk))
            good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            probs = (
                predict(model, torch.from_numpy(np.stack([decoded[i] for i in good])), checkpoint, device)
                if good
                else None
            )
            rows = {i: probs[k] for k, i in enumerate(good)}
            for i, (path, _) in enumerate(chunk):
                yield (path, rows[i], None) if i in rows else (path, None, decoded[i])


def confusion_summary(labels, predicted, classes):
    """Overall accuracy and, per class, its accuracy and the class it is most often mistaken for."""
    n = len(classes)
    matrix = torch.zeros(n, n, dtype=torch.int64)
    matrix.index_put_(
        (torch.tensor(labels, dtype=torch.int64), torch.tensor(predicted, dtype=torch.int64)),
        torch.ones(len(labels), dtype=torch.int64),
        accumulate=True,
    )
    lines = [
        f"accuracy {matrix.diag().sum().item() / max(1, len(labels)):.2%} on {len(labels)} images",
        f"{'class':>16} {'images':>7} {'accuracy':>9}  most often mistaken for",
    ]
    for c in range(n):
        total = int(matrix[c].sum())
        if total == 0:
            continue
        wrong = matrix[c].clone()
        wrong[c] = 0
        worst = int(wrong.argmax())
        mistaken = f"{classes[worst]} ({int(wrong[worst])})" if wrong[worst] > 0 else "-"
        lines.append(f"{classes[c]:>16} {total:>7} {matrix[c, c].item() / total:>9.2%}  {mistaken}")
    return "\n".join(lines)


def main(argv=None):
    cfg = config.parse(argv, __doc__.split("\n\n")[0], names=["OUT_DIR", "DEVICE"], extra=add_arguments)
    for name in ("top_k", "batch_size", "max_pixels"):
        if cfg[name] < 1:
            config.fail(name.replace("_", "-"), f"must be >= 1 (got {cfg[name]})", PROG)
    if cfg["evaluate"]:
        refuse_whole_dataset(cfg["paths"])
    device = runtime.device(cfg["DEVICE"], PROG)
    if cfg["checkpoint"]:
        path, how = cfg["checkpoint"], "check the path given to --checkpoint"
    else:
        path, dataset = default_checkpoint(cfg["OUT_DIR"], cfg["dataset"])
        how = config.how_to_train(dataset, cfg["OUT_DIR"])
    model, checkpoint = load_model(path, how, device)
    classes = checkpoint["classes"]
    items, notes = expand(cfg["paths"], cfg["recursive"], cfg["evaluate"])
    if cfg["evaluate"]:  # the note is for folders of photos, not for the class folders it scores
        items = recorded_test_images(items, cfg["paths"], Path(path).parent / datafiles.SPLIT_FILE, classes)
    else:
        sys.stderr.write("".join(f"{note}\n" for note in notes))

    k = min(cfg["top_k"], len(classes))
    started = time.perf_counter()
    results, failures, labels, predicted = [], 0, [], []
    for path, probs, error in classify(items, model, checkpoint, device, cfg["batch_size"], cfg["max_pixels"]):
        if error is not None:
            failures += 1
            sys.stderr.write(f"{PROG}: error: {path}: {error}\n")
            results.append({"file": str(path), "error": error})
            continue
        top = probs.topk(k)
        ranked = [
            {"class": classes[i], "index": int(i), "prob": round(float(p), 6)} for p, i in zip(top.values, top.indices)
        ]
        results.append({"file": str(path), "predictions": ranked})
        if cfg["evaluate"]:
            labels.append(classes.index(path.parent.name))
            predicted.append(int(top.indices[0]))
        if not cfg["json"] and not cfg["evaluate"]:
            print(f"{path}: " + ", ".join(f"{r['class']} {r['prob']:.1%}" for r in ranked))
    if cfg["json"]:
        print(json.dumps(results, indent=1))
    if cfg["evaluate"]:
        seconds = time.perf_counter() - started
        print(
            f"{confusion_summary(labels, predicted, classes)}\n{len(items)} files in {seconds:.1f} s "
            f"({len(items) / seconds:,.0f} images/s, decoding included)",
            file=sys.stderr if cfg["json"] else sys.stdout,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
