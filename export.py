"""Export a checkpoint of train.py to a file that runs without this repo.

    python3 export.py                                        # OUT_DIR/<DATASET>/distilled.pt -> distilled.onnx
    python3 export.py --checkpoint checkpoints/cifar10/teacher.pt --format pt2
    python3 export.py --data-dir data/cifar10-jpeg           # check parity on the test split

The exported graph takes uint8 images (N, C, H, W) at the checkpoint's size,
normalises them with the checkpoint's mean and std, runs the network and
returns class probabilities (N, classes); when the checkpoint was evaluated
with flip TTA, it averages each image with its mirror, as train.py's test
accuracy and predict.py do (--no-tta leaves that out, at half the cost). The
class names and the preprocessing go into the file: the ONNX model's
metadata_props, or metadata.json inside the .pt2 archive.

Every export is checked before it is kept: on at least 1,000 images (the
checkpoint's test split with --data-dir, topped up with generated images;
generated ones without), the file's probabilities (ONNX Runtime, or the
loaded torch.export program) against the network in PyTorch float32: the
largest absolute difference must be <= 1e-4 and top-1 must agree on at least
99.9% of the images. The file is written to a temporary name and only renamed
to the target once it passes, so a failed check leaves nothing there.

Exit status: 0 exported, 1 the parity check failed, 2 usage error.
"""

import json
import logging
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import config
import data
import datafiles
import models
from checkpoint import build_model
from checkpoint import load as load_checkpoint

PROG = "export.py"
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2"}
TOLERANCE = 1e-4  # largest absolute difference in probability allowed between the file and PyTorch
MIN_AGREEMENT = 0.999  # fraction of images on which top-1 must agree
PARITY_IMAGES = 1000  # at least this many images in the parity check
METADATA_FILE = "metadata.json"  # inside a .pt2 archive


class ExportError(Exception):
    """The parity check failed: the file does not compute what the checkpoint does."""


class Deployable(torch.nn.Module):
    """What a consumer of the file runs: uint8 images in, probabilities out.

    The normalisation is train.py's (data.normalize) and the flip averaging
    models.probabilities', so that the file gives predict.py's answers."""

    def __init__(self, model, mean, std, tta):
        super().__init__()
        self.model = model
        self.tta = tta
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.eval()  # for inference only: batch norm uses its running statistics, dropout is off

    def forward(self, images):
        return models.probabilities(self.model, (images.float() - self.mean) / self.std, self.tta)


def metadata(checkpoint, tta):
    """What a consumer needs besides the graph, as string values (ONNX
    metadata_props): the class names, and the whole preprocessing contract,
    datafiles.load_image's decoding followed by the graph's own normalisation."""
    preprocessing = {
        **datafiles.preprocessing(checkpoint["image_size"], checkpoint["in_channels"]),
        "mean": list(checkpoint["mean"]),
        "std": list(checkpoint["std"]),
        "normalisation": "inside the graph: (pixel - 255 * mean) / (255 * std) per channel",
        "tta": tta,
        "output": "class probabilities (N, classes)" + (", averaged over each image and its mirror" if tta else ""),
    }
    source = {"model": checkpoint["model"], "dataset": checkpoint.get("dataset"), "stage": checkpoint.get("stage")}
    return {
        "classes": json.dumps(checkpoint["classes"]),
        "preprocessing": json.dumps(preprocessing),
        "source": json.dumps(source),
    }


def _batch_dim():
    return {0: torch.export.Dim("batch")}


def write_onnx(module, example, path, props=None):
    """Export `module` with torch.onnx's dynamo exporter (batch size free) to
    `path`, a single self-contained .onnx file, with `props` as metadata."""
    import onnx

    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        verbose=False,
        dynamic_shapes=(_batch_dim(),),
        input_names=["images"],
        output_names=["probabilities"],
    )
    proto = program.model_proto
    if props:
        onnx.helper.set_model_props(proto, props)
    onnx.save_model(proto, str(path))


def write_pt2(module, example, path, props):
    """Export `module` with torch.export (batch size free) to a .pt2 archive, `props` in its metadata.json."""
    program = torch.export.export(module, (example,), dynamic_shapes=(_batch_dim(),))
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(props)})


def onnx_session(path, threads=0):
    """An ONNX Runtime session on the CPU; threads 0 is ONNX Runtime's default (all cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings are about graph optimisations, not ours to act on
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def file_runner(path, fmt):
    """A function from a uint8 batch to the probabilities that the file at `path` computes."""
    return CLASSIFIERS[fmt](path)


def file_info(props, make):
    """What predict.py reads from a checkpoint (classes, image_size,
    in_channels, tta...), from an exported file's metadata; ValueError for a
    file that export.py did not write, saying to `make` one."""
    try:
        info = {"classes": json.loads(props["classes"]), **json.loads(props["preprocessing"])}
        return {**info, "image_size": int(info["image_size"]), "in_channels": int(info["in_channels"])}
    except (KeyError, ValueError, TypeError):
        raise ValueError(
            f"a file without this repo's metadata (classes, preprocessing); make one with: {make}"
        ) from None


class OnnxClassifier:
    """An exported .onnx file, used as predict.py uses a checkpoint: `info`
    holds file_info, and calling it on a uint8 batch gives probabilities.

    Raises ValueError with a one-line reason for a file that ONNX Runtime
    cannot load or that export.py did not write."""

    def __init__(self, path):
        try:
            self.session = onnx_session(path)
        except Exception as error:  # ONNX Runtime raises its own classes for truncated or foreign files
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"not a readable ONNX file ({reason[:200]})") from None
        self.info = file_info(self.session.get_modelmeta().custom_metadata_map, "python3 export.py")
        if [i.name for i in self.session.get_inputs()] != ["images"]:
            raise ValueError("an ONNX file whose input is not 'images'; make one with: python3 export.py")

    def __call__(self, images):
        return torch.from_numpy(self.session.run(None, {"images": images.numpy()})[0])


class Pt2Classifier:
    """An exported .pt2 file (a torch.export program), used as OnnxClassifier
    is; its metadata is the archive's metadata.json. Runs on the CPU, where
    it was exported."""

    def __init__(self, path):
        extra = {METADATA_FILE: ""}
        log = logging.getLogger("torch.export")  # it logs a traceback before raising on a foreign file
        disabled, log.disabled = log.disabled, True
        try:
            self.program = torch.export.load(path, extra_files=extra).module()
        except Exception:  # torch.export raises assorted classes, with messages that point at its log
            raise ValueError(
                "not a readable torch.export program (truncated, or another kind of file); make one with: "
                "python3 export.py --format pt2"
            ) from None
        finally:
            log.disabled = disabled
        try:
            props = json.loads(extra[METADATA_FILE])
        except ValueError:
            props = {}
        self.info = file_info(props if isinstance(props, dict) else {}, "python3 export.py --format pt2")

    @torch.no_grad()
    def __call__(self, images):
        return self.program(images)


CLASSIFIERS = {"onnx": OnnxClassifier, "pt2": Pt2Classifier}  # --format -> reader of the exported file


@torch.no_grad()
def parity(reference, run, images, batch_size=500):
    """(largest absolute difference in probability, fraction of images whose top-1 agrees)
    between `reference` (the module, PyTorch float32) and `run` (the file)."""
    largest, agree = 0.0, 0
    for start in tqdm(range(0, len(images), batch_size), desc="parity", unit="batch", leave=False, disable=None):
        batch = images[start : start + batch_size]
        expected, got = reference(batch).float(), run(batch).float()
        largest = max(largest, (expected - got).abs().max().item())
        agree += (expected.argmax(1) == got.argmax(1)).sum().item()
    return largest, agree / len(images)


def generated_images(n, channels, size, seed=0):
    """Uniform random uint8 images, for a check without data."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)


def parity_images(checkpoint, data_dir):
    """The images of the parity check and a few words saying where they come from."""
    channels, size = checkpoint["in_channels"], checkpoint["image_size"]
    if data_dir is None:
        return generated_images(PARITY_IMAGES, channels, size), f"{PARITY_IMAGES:,} generated images"
    dataset_name = checkpoint.get("dataset")
    if not Path(data_dir).is_dir():
        usage_error(
            f"argument --data-dir: {data_dir} is not a folder; point it at the {dataset_name} data the "
            f"checkpoint was trained on, or leave it out to check on generated images"
        )
    try:  # the folder's own data: no download, and no stand-in (the bundled CIFAR-10 copy) for a folder without it
        made = checkpoint.get("config", {})  # a single <class>/* tree is split as train.py split it
        dataset = data.load(dataset_name, data_dir, image_size=size, val_size=0, download=False, fallback=False,
                            seed=made.get("SEED", 0), test_fraction=made.get("TEST_FRACTION", 0.2))  # fmt: skip
    except datafiles.DataError as error:
        usage_error(f"argument --data-dir: {error}")
    if dataset.classes != checkpoint["classes"] or dataset.in_channels != channels:
        usage_error(
            f"argument --data-dir: {data_dir} holds other classes or channels than the checkpoint; point it "
            f"at the {dataset_name} data the checkpoint was trained on"
        )
    images, source = dataset.test_x.cpu(), datafiles.origin(dataset.source)
    if len(images) >= PARITY_IMAGES:
        return images, f"the {len(images):,} test images of {source}"
    extra = PARITY_IMAGES - len(images)
    return (
        torch.cat([images, generated_images(extra, channels, size)]),
        f"{PARITY_IMAGES:,} images ({len(images):,} test images of {source}, {extra:,} generated)",
    )


def export(module, props, fmt, out, images, where):
    """Write `module` (a Deployable) to `out` in format `fmt` if the file
    passes the parity check on `images`; raise ExportError, leaving nothing
    at `out`, if it does not. Returns (largest difference, agreement)."""
    # a temporary name in the target's folder (so that the rename is atomic) with the format's suffix,
    # which torch.export.save and load insist on
    temporary = out.with_name(f".{out.stem}.tmp{os.getpid()}{out.suffix}")
    try:
        (write_onnx if fmt == "onnx" else write_pt2)(module, images[:2], temporary, props)
        largest, agreement = parity(module, file_runner(temporary, fmt), images)
        engine = "ONNX Runtime" if fmt == "onnx" else "the loaded torch.export program"
        print(
            f"parity on {where}, {engine} against PyTorch float32: largest probability difference "
            f"{largest:.2e} (at most {TOLERANCE:.0e}), top-1 agreement {agreement:.2%} (at least {MIN_AGREEMENT:.1%})"
        )
        if largest > TOLERANCE or agreement < MIN_AGREEMENT:
            raise ExportError(
                f"the parity check failed (largest probability difference {largest:.2e}, top-1 "
                f"agreement {agreement:.2%}); nothing was written to {out}"
            )
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return largest, agreement


def usage_error(message):
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(2)


def add_arguments(parser):
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint to export (default: OUT_DIR/DATASET/distilled.pt)"
    )
    parser.add_argument(
        "--format",
        default="onnx",
        choices=sorted(SUFFIXES),
        help="onnx (ONNX Runtime and most inference engines) or pt2 (a torch.export program)",
    )
    parser.add_argument(
        "--out", default=None, help="file to write (default: the checkpoint's path with the format's suffix)"
    )
    parser.add_argument(
        "--no-tta",
        dest="tta",
        action="store_false",
        help="leave out the flip averaging even if the checkpoint was evaluated with it",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data of the checkpoint's dataset: its test split is the parity check's images "
        "(default: generated images)",
    )


def main(argv=None):
    cfg = config.parse(argv, description=__doc__.split("\n\n")[0], names=["OUT_DIR", "DATASET"], extra=add_arguments)
    name = config.output_name(cfg["DATASET"], cfg["data_dir"] or cfg["DATASET"])  # a folder's, by its --data-dir
    path = Path(cfg["checkpoint"] or Path(cfg["OUT_DIR"]) / name / "distilled.pt")
    if not path.is_file():
        how = config.how_to_train(cfg["DATASET"], cfg["OUT_DIR"]) if cfg["checkpoint"] is None else None
        usage_error(f"no checkpoint at {path}; {how or 'check the path given to --checkpoint'}")
    suffix = SUFFIXES[cfg["format"]]
    out = Path(cfg["out"] or path.with_suffix(suffix))
    if out.suffix != suffix:
        usage_error(
            f"argument --out: a --format {cfg['format']} file must end in {suffix} (got {out}), which is "
            f"how predict.py and other tools tell the formats apart"
        )
    if not out.parent.is_dir():
        usage_error(f"argument --out: {out.parent} is not a folder; create it or choose another --out")
    try:
        checkpoint = load_checkpoint(path)
        model = build_model(checkpoint)
    except (ValueError, OSError) as error:
        usage_error(f"{path}: {error}")
    tta = checkpoint.get("tta", False) and cfg["tta"]
    module = Deployable(model, checkpoint["mean"], checkpoint["std"], tta)
    images, where = parity_images(checkpoint, cfg["data_dir"])
    print(
        f"exporting {path} ({checkpoint['model']}, {len(checkpoint['classes'])} classes, "
        f"{checkpoint['in_channels']}x{checkpoint['image_size']}x{checkpoint['image_size']} uint8 input"
        f"{', flip TTA' if tta else ''}) to {out}"
    )
    try:
        export(module, metadata(checkpoint, tta), cfg["format"], out, images, where)
    except ExportError as error:
        sys.stderr.write(f"{PROG}: error: {error}\n")
        return 1
    except OSError as error:
        usage_error(f"cannot write {out} ({error.strerror or error}); choose a writable --out")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
