"""Defaults for train.py and predict.py. Edit them here, or override any of them
on the command line: NAME becomes --name, with dashes (DATA_DIR -> --data-dir).
Write them as Python: one number for a per-stage constant, a tuple or a list of
numbers where a tuple is shown, an int or a float for a number, True or False
(not 1 or 0) for a switch.
"""

# data
DATASET = "cifar10"  # cifar10 | cifar100 | fashion-mnist | folder
DATA_DIR = "data"  # where the dataset is read from (and downloaded to, if it is missing)
DOWNLOAD = True  # download cifar10, cifar100 or fashion-mnist into DATA_DIR when it is not there
IMAGE_SIZE = 32  # side of the square images that a 'folder' dataset is resized to
VAL_SIZE = 5000  # training images held out (stratified) to pick the best epoch; shrinks for small datasets
TEST_FRACTION = 0.2  # share of a single <class>/ folder held out for testing, stratified, by SEED
OUT_DIR = "checkpoints"  # outputs go to OUT_DIR/<dataset>/ (a folder dataset: OUT_DIR/<its folder's name>/)

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
STUDENT_INIT = "auto"  # the distilled student starts from: teacher (its weights) | random | auto (teacher where able)
ROUTE = False  # learn from the teacher's weights kept during its training, early to final, in equal legs (RCO)
TEACHER_MIRROR = False  # average the teacher's logits over each image and its mirror (a second forward pass)

# runtime
SEED = 0  # seed of initialisation, data order, augmentation and the validation split
DETERMINISTIC = False  # deterministic kernels: identical results for identical runs (slower on GPU)
DEVICE = "auto"  # auto | cpu | cuda
AMP = "auto"  # bf16 autocast: auto (on where the hardware does bf16 natively) | bf16 | off
CHANNELS_LAST = True  # channels_last memory format, faster for convolutions on CPU and GPU
COMPILE = False  # torch.compile the training step
THREADS = 0  # CPU threads for torch (0: torch's default)
COMPRESSION_REPORT = True  # end with each network exported to ONNX and timed (7 to 9 s on 2 Xeon AMX cores)


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
        "DKD_WARMUP": 20 / 240, "AT_WEIGHT": 1000.0, "STUDENT_INIT": "random",
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
# teacher file's digest is checked, wherever it comes from). DISTILLATION_SETTINGS holds names and prefixes.
RUNTIME_SETTINGS = {"DATA_DIR", "DOWNLOAD", "OUT_DIR", "STAGES", "FRESH", "RESUME", "DEVICE", "AMP", "CHANNELS_LAST",
                    "COMPILE", "THREADS", "COMPRESSION_REPORT", "DETERMINISTIC", "RECIPE",
                    "TEACHER_CHECKPOINT"}  # fmt: skip
DISTILLATION_SETTINGS = ("METHOD", "TEMPERATURE", "ALPHA", "DKD_", "LSKD_", "FITNET_", "AT_", "STUDENT_INIT",
                         "ROUTE", "TEACHER_MIRROR")  # fmt: skip
STAGE_NAMES = ("teacher", "student", "distilled")
# Settings added after files of the current checkpoint format were first written: a file without one was made as
# this value makes it, so that it is not taken for a stage of other settings.
ADDED_SETTINGS = {"STUDENT_INIT": "random", "ROUTE": False, "TEACHER_MIRROR": False}

# ---------------------------------------------------------------------------
# Everything below turns the constants above into a validated command line.

import argparse  # noqa: E402
import difflib  # noqa: E402
import importlib  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

PER_STAGE = {"EPOCHS", "LR"}  # one number sets the teacher, student and distilled stages alike
FOLDER_ONLY = {"IMAGE_SIZE", "TEST_FRACTION"}  # what resizes and splits a folder dataset: no other dataset's concern
KINDS = {  # constant -> the type the code sees; (type,) for a tuple of them, comma-separated on the command line
    **dict.fromkeys(("DATASET", "DATA_DIR", "OUT_DIR", "TEACHER", "STUDENT", "TEACHER_CHECKPOINT", "STAGES", "METHOD",
                     "RECIPE", "OPTIMIZER", "LR_SCHEDULE", "DEVICE", "AMP", "STUDENT_INIT"), str),
    **dict.fromkeys(("DOWNLOAD", "FRESH", "RESUME", "LOOKAHEAD", "FLIP", "ALTERNATE_FLIP", "TTA", "DETERMINISTIC",
                     "CHANNELS_LAST", "COMPILE", "COMPRESSION_REPORT", "ROUTE", "TEACHER_MIRROR"), bool),
    **dict.fromkeys(("IMAGE_SIZE", "VAL_SIZE", "BATCH_SIZE", "CROP_PADDING", "SEED", "THREADS"), int),
    **dict.fromkeys(("WEIGHT_DECAY", "WARMUP", "LABEL_SMOOTHING", "MOMENTUM", "BIAS_LR_SCALE", "DROPOUT", "TEMPERATURE",
                     "ALPHA", "DKD_ALPHA", "DKD_BETA", "DKD_WARMUP", "LSKD_TEMPERATURE", "LSKD_WEIGHT", "FITNET_WEIGHT",
                     "AT_WEIGHT", "TEST_FRACTION"), float),
    "EPOCHS": (int,), "LR": (float,), "ADAM_BETAS": (float,), "LR_MILESTONES": (float,),
}  # fmt: skip
KIND_WORDS = {str: "a string, in quotes", bool: "True or False", int: "an integer", float: "a number"}
SHAPES = {"EPOCHS": "one or three integers > 0", "LR": "one or three finite numbers > 0",
          "ADAM_BETAS": "two numbers in [0, 1)", "LR_MILESTONES": "fractions between 0 and 1"}  # fmt: skip


def shaping(cfg, stage):
    """The settings that shape `stage`'s result, by name: all but the runtime
    ones, with this stage's entry of the per-stage ones; the distillation
    settings and the teacher's name count for the distilled stage alone, the
    student's name for the two student stages; FOLDER_ONLY for a folder
    dataset alone."""
    index, shaped = STAGE_NAMES.index(stage), {}
    for name, value in cfg.items():
        if name in RUNTIME_SETTINGS or not name.isupper():
            continue
        if stage != "distilled" and (name.startswith(DISTILLATION_SETTINGS) or name == "TEACHER" and index > 0):
            continue
        if stage == "teacher" and name == "STUDENT" or name in FOLDER_ONLY and cfg.get("DATASET") != "folder":
            continue
        shaped[name] = value[index] if name in PER_STAGE else list(value) if isinstance(value, tuple) else value
    return shaped


def differences(was, now, stage):
    """The settings that shape `stage` and differ between two configs, as 'flag: then -> now'."""
    was, now = shaping({**ADDED_SETTINGS, **was}, stage), shaping(now, stage)
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


def _holds(name, valid):
    """A rule of a tuple constant, refusing with what it accepts: the words a value of the wrong type gets too."""
    return lambda v: None if valid(v) else f"must be {SHAPES[name]}"


def stage_list(value):
    """The stages a STAGES value names, written as a person writes them ("teacher, student") or as a flag."""
    return [s.strip() for s in value.split(",") if s.strip()]


def _stages(value):
    names = stage_list(value)
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
    "STUDENT_INIT": lambda v: None if v in ("auto", "teacher", "random") else "must be one of auto, teacher, random",
    "IMAGE_SIZE": lambda v: None if v >= 8 else "must be >= 8", "STAGES": _stages,
    "EPOCHS": _holds("EPOCHS", lambda v: len(v) == 3 and all(e > 0 for e in v)),
    "LR": _holds("LR", lambda v: len(v) == 3 and not any(map(POSITIVE, v))),
    "LR_MILESTONES": _holds("LR_MILESTONES", lambda v: all(0 < m < 1 for m in v)),
    "BATCH_SIZE": POSITIVE, "BIAS_LR_SCALE": POSITIVE, "TEMPERATURE": POSITIVE, "LSKD_TEMPERATURE": POSITIVE,
    "VAL_SIZE": NON_NEGATIVE, "WEIGHT_DECAY": NON_NEGATIVE, "CROP_PADDING": NON_NEGATIVE, "SEED": NON_NEGATIVE,
    "DKD_ALPHA": NON_NEGATIVE, "DKD_BETA": NON_NEGATIVE, "LSKD_WEIGHT": NON_NEGATIVE, "FITNET_WEIGHT": NON_NEGATIVE,
    "AT_WEIGHT": NON_NEGATIVE, "THREADS": NON_NEGATIVE,
    "ADAM_BETAS": _holds("ADAM_BETAS", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)),
    "MOMENTUM": _in(0, 1), "WARMUP": _in(0, 1), "LABEL_SMOOTHING": _in(0, 1), "DROPOUT": _in(0, 1),
    "TEST_FRACTION": _in(0, 1),
    "ALPHA": _in(0, 1, closed=True), "DKD_WARMUP": _in(0, 1, closed=True),
}  # fmt: skip


def _constants():
    """The constants of this module's knobs block, by name, as written."""
    return {k: v for k, v in globals().items() if re.fullmatch(r"[A-Z][A-Z0-9_]*", k) and k not in _NOT_KNOBS}


def defaults(prog=None):
    """The constants of this module's knobs block, by name, in the types the code expects (see _coerce)."""
    return {name: _normalised(name, name, value, prog) for name, value in _constants().items()}


def _scalar(kind, value):
    """`value` as a `kind`: an int does for a float, and nothing else is converted (True is no number, 1 no switch,
    "3" no integer), so that a mistyped constant is refused rather than read some other way."""
    if isinstance(value, bool) == (kind is bool) and isinstance(value, (int, float) if kind is float else kind):
        return kind(value)
    raise ValueError(value)


def _coerce(name, value):
    """`value` of constant `name` in the type the code expects: a tuple constant takes a tuple, a list or one
    number, and one number (or a list of one) sets every stage of a per-stage constant."""
    kind = KINDS[name]
    if not isinstance(kind, tuple):
        return _scalar(kind, value)
    items = [_scalar(kind[0], v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return tuple(items * 3 if len(items) == 1 and name in PER_STAGE else items)


def _normalised(where, name, value, prog=None):
    """_coerce(name, value), or a one-line exit naming `where` config.py sets the value and what `name` accepts."""
    try:
        return _coerce(name, value)
    except ValueError:
        kind = KINDS[name]
        _refuse(where, value, f"must be {SHAPES[name] if isinstance(kind, tuple) else KIND_WORDS[kind]}", prog)


def _refuse(where, value, problem, prog=None):
    """Print a one-line error naming a value as config.py sets it, and exit with 2."""
    sys.stderr.write(f"{prog or Path(sys.argv[0]).name}: error: config.py: {where} = {value!r}: {problem}\n")
    raise SystemExit(2)


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


def output_name(dataset, data_dir):
    """The folder under OUT_DIR of a run: the dataset's name, or for a folder
    dataset the name of the data folder, so that two projects of one's own
    images do not share (and refuse each other's) checkpoints."""
    return (Path(data_dir).resolve().name or dataset) if dataset == "folder" else dataset


def how_to_train(dataset, out_dir):
    """The train.py command that writes OUT_DIR/<dataset>/distilled.pt, the
    default checkpoint of predict.py and export.py, for their message on a
    missing one. train.py takes only the names of data.DATASETS, reads a
    folder dataset from --data-dir, and writes under its own default OUT_DIR
    unless told."""
    datasets = importlib.import_module("data").DATASETS
    if dataset not in datasets:
        command = f"python3 train.py --dataset folder --data-dir <path to {dataset}/>"
        return (f"{dataset!r} is not a dataset train.py trains ({', '.join(datasets)}); if it is a folder of your own "
                f"images, train one with: {command}" + (f" --out-dir {shlex.quote(str(out_dir))}"
                if Path(out_dir) != Path(OUT_DIR) else "") + "; else give --checkpoint PATH")  # fmt: skip
    command = f"python3 train.py --dataset {dataset}"
    if dataset == "folder":
        command += " --data-dir <folder of <class>/ folders, or of train/ and test/>"
    if Path(out_dir) != Path(OUT_DIR):
        command += f" --out-dir {shlex.quote(str(out_dir))}"
    return f"train one with: {command}; or, where train.py wrote elsewhere, give its --out-dir, or --checkpoint PATH"


def _tuple_type(name, kind):
    """'a,b,c' -> a tuple of `kind`s; for per-stage constants one number stands for all three."""

    def parse(text):
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: give comma-separated {kind.__name__}s") from None
        return values * 3 if len(values) == 1 and name in PER_STAGE else values

    return parse


def _option(name):
    """The add_argument keywords of a constant's flag, from its kind: a switch is --name/--no-name."""
    kind = KINDS[name]
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if not isinstance(kind, tuple):
        return {"type": kind, "metavar": kind.__name__.upper()}
    word = kind[0].__name__.upper()
    metavar = f"{word}[,{word},{word}]" if name in PER_STAGE else f"{word},..."
    return {"type": _tuple_type(name, kind[0]), "metavar": metavar}


def parse(argv=None, description=None, names=None, extra=None):
    """Parse the command line into a dict of every constant, validated.

    names: the constants this program takes as flags (all by default). extra:
    a function that adds program-specific arguments to the parser; their
    values come back under their lowercase dest names. --help shows each
    default as config.py writes it, in the form typed on the command line."""
    written = _constants()
    _check_constants(written)
    values = defaults()
    comments = dict(re.findall(r"^([A-Z][A-Z0-9_]*) = .*?  # (.*)$", Path(__file__).read_text(), flags=re.M))
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    for name in values if names is None else names:
        shown = typed(name, written[name]).split(" ", 1)[-1]
        # no default: only typed flags reach the namespace, so that they win over a recipe
        parser.add_argument(f"--{flag(name)}", dest=name, default=argparse.SUPPRESS, **_option(name),
                            help=f"{comments.get(name, '')} (default: {shown})")  # fmt: skip
    if extra:
        extra(parser)
    return _settings(values, written, vars(parser.parse_args(argv)), parser.prog)


def _settings(values, written, given, prog):
    """The settings in force, each checked against RULES. Precedence: typed
    flags, then the recipe's settings for the chosen networks, then its
    settings for the dataset, then the recipe, then the constants above. A
    value that breaks a rule is refused naming its flag where it was typed,
    else where config.py sets it."""
    cfg, source = {**values, **given}, {name: (name, value) for name, value in written.items()}

    def apply(where, settings):
        for name, value in settings.items():
            if name not in given:
                source[name] = (f"{where}[{name!r}]", value)
                cfg[name] = _normalised(source[name][0], name, value, prog)

    top, recipe = f"RECIPES[{cfg['RECIPE']!r}]", RECIPES.get(cfg["RECIPE"], {})
    _check_recipe(top, recipe, values, prog)
    apply(top, {k: v for k, v in recipe.items() if k not in ("DATASETS", "NETWORKS")})
    by_dataset, by_networks = recipe.get("DATASETS", {}), recipe.get("NETWORKS", {})
    pair = (cfg["TEACHER"], cfg["STUDENT"])
    for where, settings in (
        (f"{top}['DATASETS'][{cfg['DATASET']!r}]", by_dataset.get(cfg["DATASET"], {})),
        (f"{top}['NETWORKS'][{pair!r}]", by_networks.get(pair, {})),
        (f"{top}['NETWORKS'][{cfg['STUDENT']!r}]", by_networks.get(cfg["STUDENT"], {})),
    ):
        apply(where, settings)
    for name, check in RULES.items():
        problem = check(cfg[name])
        if problem and name in given:
            fail(flag(name), f"{problem} (got {cfg[name]!r})", prog)
        if problem:
            _refuse(*source[name], problem, prog)
    return cfg


def _check_constants(written):
    """Refuse a constant that names no setting (misspelt, it would be ignored
    without a word) and a setting whose constant is gone (renamed or deleted),
    in one line each: KINDS lists every setting."""
    for name in sorted(written.keys() - KINDS.keys()):
        _no_such_setting(
            name, name, written[name], KINDS, "a new setting needs its type in KINDS (a helper: _NOT_KNOBS)"
        )
    if missing := sorted(KINDS.keys() - written.keys()):
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: config.py sets no {', '.join(missing)} (renamed "
                         f"or deleted?); put the line back (git diff config.py shows it)\n")  # fmt: skip
        raise SystemExit(2)


def _no_such_setting(where, name, value, names, otherwise, prog=None):
    """Refuse `name`, set in config.py at `where` and none of `names`, with the nearest of them (any case) or
    `otherwise`."""
    close = difflib.get_close_matches(str(name).upper(), names, n=1)
    _refuse(where, value, f"no such setting; {f'did you mean {close[0]}?' if close else otherwise}", prog)


def _check_recipe(top, recipe, known, prog):
    """Refuse a key of the recipe that names no setting, dataset or network: misspelt, it would be ignored
    without a word."""

    def settings(where, names, groups=()):
        for name, value in names.items():
            if name not in known and name not in groups:
                _no_such_setting(f"{where}[{name!r}]", name, value, [*known, *groups],
                                 "the settings are the constants of config.py", prog)  # fmt: skip

    settings(top, recipe, groups=("DATASETS", "NETWORKS"))
    for group, rule in (("DATASETS", RULES["DATASET"]), ("NETWORKS", RULES["STUDENT"])):
        for key, names in recipe.get(group, {}).items():
            where = f"{top}[{group!r}][{key!r}]"
            pair = group == "NETWORKS" and isinstance(key, tuple)
            if pair and len(key) != 2:
                _refuse(where, names, "must be keyed by a student's name or a (teacher, student) pair", prog)
            problem = next(filter(None, map(rule, key if pair else [key])), None)
            if problem:
                _refuse(where, names, problem, prog)
            settings(where, names)


_NOT_KNOBS = {"RECIPES", "RUNTIME_SETTINGS", "DISTILLATION_SETTINGS", "ADDED_SETTINGS", "STAGE_NAMES", "PER_STAGE",
              "FOLDER_ONLY", "KINDS", "KIND_WORDS", "SHAPES", "POSITIVE", "NON_NEGATIVE", "RULES"}  # fmt: skip
