"""Defaults for train.py and predict.py. Edit them here, or override any of them
on the command line: NAME becomes --name, with dashes (DATA_DIR -> --data-dir).
"""

# data
DATASET = "cifar10"  # cifar10 | cifar100 | fashion-mnist | folder
DATA_DIR = "data"  # where the dataset is read from (and downloaded to, if it is missing)
DOWNLOAD = True  # download cifar10, cifar100 or fashion-mnist into DATA_DIR when it is not there
IMAGE_SIZE = 32  # side of the square images that a 'folder' dataset is resized to
VAL_SIZE = 5000  # training images held out (stratified) to pick the best epoch
OUT_DIR = "checkpoints"  # checkpoints, logs and results go to OUT_DIR/<dataset>/

# models and stages
TEACHER = "airnet_m"  # teacher model, a name from models.MODELS
STUDENT = "airnet_xs"  # student model, a name from models.MODELS
TEACHER_CHECKPOINT = ""  # distil from this teacher file (train.py's .pt, or a state dict of --teacher) instead
STAGES = "teacher,student,distilled"  # stages to run, in this order
FRESH = False  # retrain stages whose checkpoint already exists, and start unfinished ones over
RESUME = False  # continue unfinished stages from their <stage>.last.pt (with FRESH: a retrain stopped part-way)
METHOD = "kd"  # distillation method, a name from distill.METHODS

# optimisation: AdamW, a linear warm-up, then a linear decay to zero, stepped per batch
RECIPE = "default"  # default (the constants here) | airbench (SGD speed records) | paper (CIFAR-100 benchmark)
EPOCHS = (12, 8, 8)  # epochs of the teacher, student and distilled stages (one number sets all three)
BATCH_SIZE = 128  # images per step (in all, under torchrun)
OPTIMIZER = "adamw"  # adamw (Adam, decoupled weight decay) | sgd (Nesterov momentum)
LR = (8e-3, 8e-3, 8e-3)  # peak learning rate of the teacher, student and distilled stages (one number: all three)
ADAM_BETAS = (0.9, 0.99)  # Adam's decay rates of the gradient's first and second moments
WEIGHT_DECAY = 0.05  # decoupled for adamw, L2 for sgd; never applied to biases and norm weights
WARMUP = 0.2  # fraction of the steps with a linear warm-up, before the decay
LR_SCHEDULE = "linear"  # linear (decay to zero after the warm-up) | step (x0.1 at LR_MILESTONES)
LR_MILESTONES = (0.625, 0.75, 0.875)  # step schedule: fractions of a stage's epochs where the rate drops tenfold
LOOKAHEAD = False  # airbench's lookahead: weights pulled towards their moving average, which they end as
LABEL_SMOOTHING = 0.0  # label smoothing of every cross-entropy term (a smoothed teacher teaches less)
# SGD alone (the airbench and paper recipes set them)
MOMENTUM = 0.9  # SGD's Nesterov momentum
BIAS_LR_SCALE = 1.0  # learning-rate multiplier of the shifts of norms that have a fixed scale (AirNet)

# regularisation and augmentation
DROPOUT = 0.1  # dropout before the classifier of both networks
CROP_PADDING = 2  # random translation by up to this many pixels, reflection-padded (0 disables)
FLIP = True  # random horizontal flips
ALTERNATE_FLIP = True  # with FLIP: flip a fixed random half of the images in odd epochs, the other half in even ones
TTA = True  # evaluate on each image and its mirror, averaging the predictions

# distillation
TEMPERATURE = 2.0  # softmax temperature T of the distillation term (cifar100: 1.0, see RECIPES)
ALPHA = 0.5  # weight of the distillation term; CE gets 1 - ALPHA, the opposite of some repos (cifar100: 0.9)
DKD_ALPHA = 1.0  # dkd: weight of the target-class term (TCKD)
DKD_BETA = 8.0  # dkd: weight of the non-target term (NCKD); the paper tunes it per pair
DKD_WARMUP = 0.1  # dkd: fraction of training over which its distillation term ramps up (paper: 20 of 240 epochs)
LSKD_TEMPERATURE = 2.0  # lskd: temperature applied to the standardised logits
LSKD_WEIGHT = 9.0  # lskd: weight of its distillation term (the paper's 9); CE keeps 1 - ALPHA
FITNET_WEIGHT = 100.0  # fitnet: weight of the hint regression (MSE) term
AT_WEIGHT = 100.0  # at: weight of the attention-transfer term (paper recipe: 1000, set for maps of 32x32 to 8x8)

# runtime
SEED = 0  # seed of initialisation, data order, augmentation and the validation split
DETERMINISTIC = False  # deterministic kernels: identical results for identical runs (slower on GPU)
DEVICE = "auto"  # auto | cpu | cuda
AMP = "auto"  # bf16 autocast: auto (on where the hardware does bf16 natively) | bf16 | off
CHANNELS_LAST = True  # channels_last memory format, faster for convolutions on CPU and GPU
COMPILE = False  # torch.compile the training step
THREADS = 0  # CPU threads for torch (0: torch's default)


# ---------------------------------------------------------------------------
# Recipes: named sets of overrides, one entry each. 'airbench' is Keller
# Jordan's CIFAR-10 speed-record recipe carried over to this loop (the
# defaults before AdamW): SGD with Nesterov momentum 0.85, lr 0.375 at batch
# 256 (airbench's 11.5 per 1,024 images as a mean loss), L2 1.33e-3, norm
# shifts at 64 times the rate, lookahead, label smoothing 0.2, 23% warm-up.
# 'paper' is the standard
# CIFAR-100 distillation benchmark (CRD/RepDistiller, DKD/mdistiller): SGD
# with momentum 0.9 and weight decay 5e-4, lr 0.05, divided by 10 at epochs
# 150, 180 and 210 of 240, batch 64, T = 4, CE / KD weights 0.1 / 0.9, no
# label smoothing, dropout, lookahead, faster norm shifts or test-time flips,
# random crops with 4 pixels of padding (reflected here, zeros in those
# repos), the last epoch on the full training set and AT's weight of 1000.
# A recipe's DATASETS entry holds settings for particular datasets: on
# CIFAR-100 the default teacher's logits are flatter (standard deviation 2.7
# against 3.7 on CIFAR-10, with AirNet's fixed 1/9 scale), and it teaches
# best unsoftened and with more weight (T 1, ALPHA 0.9: 1.1 points of
# validation accuracy over T 2, ALPHA 0.5; on CIFAR-10 the two are within
# noise). A recipe's NETWORKS entry holds settings for particular networks,
# keyed by (teacher, student) or by student: DKD's beta per pair (the DKD
# paper's released configurations) and lr 0.01 for MobileNetV2 and ShuffleNet
# students. Flags typed on the command line always win over a recipe.
RECIPES = {
    "default": {"DATASETS": {"cifar100": {"TEMPERATURE": 1.0, "ALPHA": 0.9}}},
    "airbench": {
        "EPOCHS": (11, 5, 5), "BATCH_SIZE": 256, "OPTIMIZER": "sgd", "LR": (0.375, 0.375, 0.375), "MOMENTUM": 0.85,
        "WEIGHT_DECAY": 1.33e-3, "BIAS_LR_SCALE": 64.0, "LOOKAHEAD": True, "WARMUP": 0.23, "LABEL_SMOOTHING": 0.2,
        "DROPOUT": 0.1, "CROP_PADDING": 2, "TEMPERATURE": 4.0, "ALPHA": 0.9, "AT_WEIGHT": 10.0,
    },
    "paper": {
        "DATASET": "cifar100", "TEACHER": "resnet32x4", "STUDENT": "resnet8x4", "VAL_SIZE": 0,
        "EPOCHS": (240, 240, 240), "BATCH_SIZE": 64, "OPTIMIZER": "sgd", "LR": (0.05, 0.05, 0.05), "MOMENTUM": 0.9,
        "WEIGHT_DECAY": 5e-4, "BIAS_LR_SCALE": 1.0, "LOOKAHEAD": False, "CROP_PADDING": 4,
        "LR_SCHEDULE": "step", "LR_MILESTONES": (0.625, 0.75, 0.875), "WARMUP": 0.0,
        "LABEL_SMOOTHING": 0.0, "DROPOUT": 0.0, "TTA": False, "TEMPERATURE": 4.0, "ALPHA": 0.9,
        "DKD_WARMUP": 20 / 240, "AT_WEIGHT": 1000.0,
        "NETWORKS": {
            ("resnet32x4", "resnet8x4"): {"DKD_BETA": 8.0}, ("wrn_40_2", "wrn_16_2"): {"DKD_BETA": 6.0},
            ("resnet56", "resnet20"): {"DKD_BETA": 2.0}, ("resnet110", "resnet32"): {"DKD_BETA": 2.0},
            ("vgg13", "vgg8"): {"DKD_BETA": 6.0},
            **{student: {"LR": (0.05, 0.01, 0.01)} for student in ("mobilenetv2", "shufflenetv1", "shufflenetv2")},
        },
    },
}  # fmt: skip

# Settings that may change between the runs of a stage (a run and its
# resumption, or the run that finds the stage finished): where things are,
# what runs, and how fast. Every other setting shapes a stage's result; the
# distillation settings and the teacher shape the distilled stage alone (a
# teacher file's digest is checked, wherever it comes from).
RUNTIME_SETTINGS = {"DATA_DIR", "DOWNLOAD", "OUT_DIR", "STAGES", "FRESH", "RESUME", "DEVICE", "AMP", "CHANNELS_LAST",
                    "COMPILE", "THREADS", "DETERMINISTIC", "RECIPE",
                    "TEACHER_CHECKPOINT"}  # fmt: skip
DISTILLATION_SETTINGS = ("METHOD", "TEMPERATURE", "ALPHA", "DKD_", "LSKD_", "FITNET_", "AT_")  # names and prefixes
STAGE_NAMES = ("teacher", "student", "distilled")

# ---------------------------------------------------------------------------
# Everything below turns the constants above into a validated command line.

import argparse  # noqa: E402
import importlib  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

PER_STAGE = {"EPOCHS", "LR"}  # one number sets the teacher, student and distilled stages alike


def shaping(cfg, stage):
    """The settings that shape `stage`'s result, by name: all but the runtime
    ones, with this stage's entry of the per-stage ones; the distillation
    settings and the teacher's name count for the distilled stage alone, the
    student's name for the two student stages."""
    index, shaped = STAGE_NAMES.index(stage), {}
    for name, value in cfg.items():
        if name in RUNTIME_SETTINGS or not name.isupper():
            continue
        if stage != "distilled" and (name.startswith(DISTILLATION_SETTINGS) or name == "TEACHER" and index > 0):
            continue
        if stage == "teacher" and name == "STUDENT":
            continue
        shaped[name] = value[index] if name in PER_STAGE else list(value) if isinstance(value, tuple) else value
    return shaped


def differences(was, now, stage):
    """The settings that shape `stage` and differ between two configs, as 'flag: then -> now'."""
    was, now = shaping(was, stage), shaping(now, stage)
    return [f"--{flag(k)} {_shown(was.get(k))} then, {_shown(now[k])} now" for k in now if was.get(k) != now[k]]


def _shown(value):
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _in(low, high, closed=False):
    inside = (lambda v: low <= v <= high) if closed else (lambda v: low <= v < high)
    return lambda v: None if inside(v) else f"must be in [{low}, {high}{']' if closed else ')'}"


def _registry(module, name):
    """Names registered in module.name (imported when checked, so config.py stays light)."""
    return lambda v: (
        None
        if v in getattr(importlib.import_module(module), name)
        else (f"unknown name {v!r}; choose one of {', '.join(sorted(getattr(importlib.import_module(module), name)))}")
    )


def _stages(value):
    names = [s for s in value.split(",") if s]
    known = STAGE_NAMES
    return None if names and all(n in known for n in names) else f"must be a comma-separated list of {', '.join(known)}"


POSITIVE = lambda v: None if 0 < v < math.inf else "must be a finite number > 0"  # noqa: E731
NON_NEGATIVE = lambda v: None if 0 <= v < math.inf else "must be a finite number >= 0"  # noqa: E731
RULES = {  # constant -> check(value) returning an error or None
    "DATASET": _registry("data", "DATASETS"), "TEACHER": _registry("models", "MODELS"),
    "STUDENT": _registry("models", "MODELS"), "METHOD": _registry("distill", "METHODS"),
    "OPTIMIZER": _registry("optim", "OPTIMIZERS"), "LR_SCHEDULE": _registry("optim", "SCHEDULES"),
    "RECIPE": lambda v: None if v in RECIPES else f"must be one of {', '.join(RECIPES)}",
    "DEVICE": lambda v: None if v in ("auto", "cpu", "cuda") else "must be one of auto, cpu, cuda",
    "AMP": lambda v: None if v in ("auto", "bf16", "off") else "must be one of auto, bf16, off",
    "IMAGE_SIZE": lambda v: None if v >= 8 else "must be >= 8", "STAGES": _stages,
    "EPOCHS": lambda v: None if len(v) == 3 and all(e > 0 for e in v) else "must be one or three integers > 0",
    "LR": lambda v: None if len(v) == 3 and not any(map(POSITIVE, v)) else "must be one or three finite numbers > 0",
    "LR_MILESTONES": lambda v: None if all(0 < m < 1 for m in v) else "must be fractions between 0 and 1",
    "BATCH_SIZE": POSITIVE, "BIAS_LR_SCALE": POSITIVE, "TEMPERATURE": POSITIVE, "LSKD_TEMPERATURE": POSITIVE,
    "VAL_SIZE": NON_NEGATIVE, "WEIGHT_DECAY": NON_NEGATIVE, "CROP_PADDING": NON_NEGATIVE, "SEED": NON_NEGATIVE,
    "DKD_ALPHA": NON_NEGATIVE, "DKD_BETA": NON_NEGATIVE, "LSKD_WEIGHT": NON_NEGATIVE, "FITNET_WEIGHT": NON_NEGATIVE,
    "AT_WEIGHT": NON_NEGATIVE, "THREADS": NON_NEGATIVE,
    "ADAM_BETAS": lambda v: None if len(v) == 2 and all(0 <= b < 1 for b in v) else "must be two numbers in [0, 1)",
    "MOMENTUM": _in(0, 1), "WARMUP": _in(0, 1), "LABEL_SMOOTHING": _in(0, 1), "DROPOUT": _in(0, 1),
    "ALPHA": _in(0, 1, closed=True), "DKD_WARMUP": _in(0, 1, closed=True),
}  # fmt: skip


def defaults():
    """The constants of this module's knobs block, by name."""
    return {k: v for k, v in globals().items() if re.fullmatch(r"[A-Z][A-Z0-9_]*", k) and k not in _NOT_KNOBS}


def flag(name):
    return name.lower().replace("_", "-")


def typed(name, value):
    """A setting as the user would type it on the command line."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{flag(name)}"
    shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return f"--{flag(name)} {shown or chr(34) * 2}"  # an empty string shows as ""


def fail(flag_name, message, prog=None):
    """Print a one-line configuration error naming the flag, and exit with 2."""
    sys.stderr.write(f"{prog or Path(sys.argv[0]).name}: error: argument --{flag_name}: {message}\n")
    raise SystemExit(2)


def how_to_train(dataset, out_dir):
    """The train.py command that writes OUT_DIR/<dataset>/distilled.pt, the
    default checkpoint of predict.py and export.py, for their message on a
    missing one. train.py takes only the names of data.DATASETS, reads a
    folder dataset from --data-dir, and writes under its own default OUT_DIR
    unless told."""
    datasets = importlib.import_module("data").DATASETS
    if dataset not in datasets:
        return (f"{dataset!r} is not a dataset train.py trains ({', '.join(datasets)}; a tree of your own "
                f"images is 'folder'): give one of these to --dataset, or --checkpoint PATH")  # fmt: skip
    command = f"python3 train.py --dataset {dataset}"
    if dataset == "folder":
        command += " --data-dir <folder holding train/<class>/ and test/<class>/>"
    if Path(out_dir) != Path(OUT_DIR):
        command += f" --out-dir {shlex.quote(str(out_dir))}"
    return f"train one with: {command}"


def _tuple_type(name, default):
    """'a,b,c' -> a tuple of the default's element type; for per-stage constants one number stands for all three."""
    kind = type(default[0])

    def parse(text):
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: give comma-separated {kind.__name__}s") from None
        return values * 3 if len(values) == 1 and name in PER_STAGE else values

    return parse


def parse(argv=None, description=None, names=None, extra=None):
    """Parse the command line into a dict of every constant, validated.

    names: the constants this program takes as flags (all by default). extra:
    a function that adds program-specific arguments to the parser; their
    values come back under their lowercase dest names. Precedence: typed
    flags, then the recipe's settings for the chosen networks, then its
    settings for the dataset, then the recipe, then the constants above."""
    values = defaults()
    comments = dict(re.findall(r"^([A-Z][A-Z0-9_]*) = .*?  # (.*)$", Path(__file__).read_text(), flags=re.M))
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    for name in values if names is None else names:
        default, shown = values[name], typed(name, values[name]).split(" ", 1)[-1]
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {
            "type": _tuple_type(name, default) if isinstance(default, tuple) else type(default),
            "metavar": "A,B,..." if isinstance(default, tuple) else type(default).__name__.upper()}  # fmt: skip
        # no default: only typed flags reach the namespace, so that they win over a recipe
        parser.add_argument(f"--{flag(name)}", dest=name, default=argparse.SUPPRESS, **kind,
                            help=f"{comments.get(name, '')} (default: {shown})")  # fmt: skip
    if extra:
        extra(parser)
    given = vars(parser.parse_args(argv))
    recipe = RECIPES.get(given.get("RECIPE", values["RECIPE"]), {})
    cfg = {**values, **{k: v for k, v in recipe.items() if k not in ("DATASETS", "NETWORKS")}, **given}
    by_dataset, by_networks = recipe.get("DATASETS", {}), recipe.get("NETWORKS", {})
    for settings in (
        by_dataset.get(cfg["DATASET"], {}),
        by_networks.get((cfg["TEACHER"], cfg["STUDENT"]), {}),
        by_networks.get(cfg["STUDENT"], {}),
    ):
        cfg.update({k: v for k, v in settings.items() if k not in given})
    for name, check in RULES.items():
        problem = check(cfg[name])
        if problem:
            fail(flag(name), f"{problem} (got {cfg[name]!r})", parser.prog)
    return cfg


_NOT_KNOBS = {"RECIPES", "RUNTIME_SETTINGS", "DISTILLATION_SETTINGS", "STAGE_NAMES", "PER_STAGE", "POSITIVE",
              "NON_NEGATIVE", "RULES"}  # fmt: skip
