"""The files train.py writes and reads back, in one place.

- `<stage>.pt`, a finished stage: the network's weights with what it takes to
  use them (model name, classes, image size, normalisation, TTA), the
  settings that trained it and its metrics. predict.py reads it too.
- `<stage>.last.pt`, an unfinished stage's progress: everything a resumed run
  needs to go on exactly where it stopped (weights, optimizer, scheduler,
  lookahead, random states, log, best epoch, the epoch's running sums).

train.py makes their content (Stage.finished, Stage.state_dict); this module
writes and reads plain dicts. Every file carries FORMAT, is written
atomically and is read with weights_only=True; a file of another format is
refused, naming the version that wrote it.
"""

import hashlib
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

import models
from datafiles import atomic_write


def unwritable(folder):
    """Why output files cannot be written into `folder` (made if missing), or
    None: checked before long work, so that it fails now and not after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        return error.strerror
    return None


def write_text(path, text):
    atomic_write(path, lambda p: p.write_text(text))


def file_digest(path):
    """A short content hash of a file, to tell one checkpoint from another."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def json_safe(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


# ---------------------------------------------------------------- finished stages


FORMAT = 2  # of <stage>.pt and <stage>.last.pt; bump it when their content changes


class OtherFormat(ValueError):
    """A file of this repo in another format than FORMAT. `problem` says
    which version wrote it; the message adds the fix for predict.py and
    export.py, and train.py gives its own."""

    def __init__(self, found):
        which = "a newer" if isinstance(found, int) and found > FORMAT else "an older"
        self.problem = f"written by {which} version of this repo (file format {found}; this version reads {FORMAT})"
        super().__init__(f"{self.problem}; train it again with this version")


def check_format(content):
    """Raise OtherFormat unless `content` (a dict of one of our files) is of
    FORMAT; a file without a number is of format 1, the last without one."""
    if content.get("format", 1) != FORMAT:
        raise OtherFormat(content.get("format", 1))


def save(path, content):
    """Write a finished stage (see Stage.finished in train.py)."""
    atomic_write(path, lambda p: torch.save({"format": FORMAT, **content}, p))


# torch.save writes a zip archive; before torch 1.6 (the format of older published
# teachers) it wrote pickles, the first of them torch's magic number.
LEGACY_TORCH_START = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def _written_by_torch(path):
    """Whether the file begins as every file torch.save writes does."""
    with open(path, "rb") as file:
        start = file.read(len(LEGACY_TORCH_START))
    return start.startswith(b"PK\x03\x04") or start == LEGACY_TORCH_START


class Unreadable(ValueError):
    """A file the system cannot read: its content is unknown, so the fix is
    never to delete it."""


def read(path, expected):
    """The content of a file torch.save wrote, loaded safely (weights_only).

    Raises ValueError with a one-line reason, `expected` naming what the file
    should be ("a checkpoint written by train.py"), for a file that cannot be
    read: torch's own message is long and advises weights_only=False, which
    we never load with."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except OSError as error:  # a file that cannot be read (permissions, I/O) is not judged by its content
        raise Unreadable(f"cannot read it ({error.strerror or error})") from None
    except Exception as error:  # truncated zip, pickle refused by weights_only, not a torch file...
        if not _written_by_torch(path):
            raise ValueError(f"not {expected} (not a torch file)") from None
        if isinstance(error, pickle.UnpicklingError):
            raise ValueError(f"not {expected} (it holds Python objects that a safe load refuses to build)") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"not a readable checkpoint ({reason[:200]})") from None


def refuse_unfinished(content):
    """Raise ValueError when `content`, given as a finished checkpoint, is the
    <stage>.last.pt of a stage still in training (see save_progress)."""
    if isinstance(content, dict) and {"progress", "trainable"} <= content.keys():
        stage = content.get("stage", "stage")
        raise ValueError(
            f"the resume file of an unfinished {stage} stage, not a finished checkpoint; finish the stage "
            f"with train.py --resume and pass the {stage}.pt it saves"
        )


def load(path):
    """Load a finished stage's checkpoint safely (weights_only) and check its keys.

    Raises ValueError with a one-line reason for anything that is not one of
    our checkpoints."""
    checkpoint = read(path, "a checkpoint written by train.py")
    refuse_unfinished(checkpoint)
    required = ("model", "state_dict", "num_classes", "in_channels", "classes")
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        raise ValueError("not a checkpoint of this repo (keys model, state_dict, num_classes, ... are missing)")
    check_format(checkpoint)
    return checkpoint


def build_model(checkpoint):
    """Rebuild the model a checkpoint describes and load its weights.

    Raises ValueError with a readable reason when the checkpoint does not fit
    (unknown model, weights of another shape)."""
    try:
        model = models.build(checkpoint["model"], checkpoint["num_classes"], checkpoint["in_channels"])
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        reason = first[1].strip() if len(first) > 1 else first[0]
        raise ValueError(
            f"its weights do not fit model {checkpoint['model']!r} with {checkpoint['num_classes']} classes ({reason})"
        ) from None
    return model


# ---------------------------------------------------------------- progress of an unfinished stage


def rng_states(generator):
    """Every random state that training draws from, in a weights_only-safe form."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states, generator):
    random.setstate(states["python"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    generator.set_state(states["data"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_progress(path, state):
    """Write an unfinished stage's progress (see Stage.state_dict in train.py)."""
    atomic_write(path, lambda p: torch.save({"format": FORMAT, **state}, p))


def load_progress(path):
    """The saved progress at `path`; ValueError with a one-line reason when it cannot be read."""
    state = read(path, "a resume file of train.py")
    if not isinstance(state, dict) or "progress" not in state:
        raise ValueError("not a resume file of train.py (it holds no progress)")
    check_format(state)
    return state
