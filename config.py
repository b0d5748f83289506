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
STAGES = "teacher,student,distilled"  # stages to run, in this order
FRESH = False  # retrain stages whose checkpoint already exists, and start unfinished ones over
RESUME = False  # continue unfinished stages from their <stage>.last.pt
METHOD = "kd"  # distillation method, a name from distill.METHODS

# optimisation
RECIPE = "fast"  # fast (the constants below) | paper (the CIFAR-100 benchmark recipe; explicit flags still win)
EPOCHS = (11, 5, 5)  # epochs of the teacher, student and distilled stages (one number sets all three)
BATCH_SIZE = 256  # images per step (in all, under torchrun)
OPTIMIZER = "sgd"  # sgd (Nesterov momentum) | adamw (try --lr 4e-3 --weight-decay 0.05 --bias-lr-scale 1 --no-lookahead)
LR = 0.375  # peak learning rate (of the teacher stage)
STUDENT_LR = 0.0  # peak learning rate of the student and distilled stages (0: LR; a typed --lr alone sets both)
LR_SCHEDULE = "linear"  # linear (warm-up, then linear decay to zero) | step (warm-up, then x0.1 at LR_MILESTONES)
LR_MILESTONES = (0.625, 0.75, 0.875)  # step schedule: fractions of a stage's epochs where the rate drops tenfold
MOMENTUM = 0.85  # SGD momentum
WEIGHT_DECAY = 1.33e-3  # decoupled for adamw, L2 for sgd; never applied to biases and norm weights
BIAS_LR_SCALE = 64.0  # learning-rate multiplier of the shifts of norms that have a fixed scale (AirNet)
LOOKAHEAD = True  # airbench's lookahead: weights pulled towards their moving average, which they end as
WARMUP = 0.23  # fraction of the steps with a linear warm-up; the learning rate then decays linearly to zero
LABEL_SMOOTHING = 0.2  # label smoothing of every cross-entropy term
DROPOUT = 0.1  # dropout before the classifier of both networks
CROP_PADDING = 2  # random translation by up to this many pixels, reflection-padded (0 disables)
FLIP = True  # random horizontal flips
ALTERNATE_FLIP = True  # with FLIP: flip a fixed random half of the images in odd epochs, the other half in even ones
TTA = True  # evaluate on each image and its mirror, averaging the predictions

# distillation
TEMPERATURE = 4.0  # softmax temperature T of the distillation term
ALPHA = 0.9  # weight of the distillation term; CE gets 1 - ALPHA (some repos use the opposite convention)
DKD_ALPHA = 1.0  # dkd: weight of the target-class term (TCKD)
DKD_BETA = 8.0  # dkd: weight of the non-target term (NCKD); the paper tunes it per pair
DKD_WARMUP = 0.1  # dkd: fraction of training over which its distillation term ramps up (paper: 20 of 240 epochs)
LSKD_TEMPERATURE = 2.0  # lskd: temperature applied to the standardised logits
LSKD_WEIGHT = 9.0  # lskd: weight of its distillation term (the paper's 9); CE keeps 1 - ALPHA
FITNET_WEIGHT = 100.0  # fitnet: weight of the hint regression (MSE) term
AT_WEIGHT = 10.0  # at: weight of the attention-transfer term (paper recipe: 1000, set for maps of 32x32 to 8x8)

# runtime
SEED = 0  # seed of initialisation, data order, augmentation and the validation split
DETERMINISTIC = False  # deterministic kernels: identical results for identical runs (slower on GPU)
DEVICE = "auto"  # auto | cpu | cuda
AMP = "auto"  # bf16 autocast: auto (on where the hardware does bf16 natively) | bf16 | off
CHANNELS_LAST = True  # channels_last memory format, faster for convolutions on CPU and GPU
COMPILE = False  # torch.compile the training step
THREADS = 0  # CPU threads for torch (0: torch's default)


# ---------------------------------------------------------------------------
# Recipes: named sets of overrides. 'paper' is the standard CIFAR-100
# distillation benchmark (CRD/RepDistiller, DKD/mdistiller): SGD with momentum
# 0.9 and weight decay 5e-4, lr 0.05 (0.01 for MobileNetV2 and ShuffleNet
# students, see models.LIGHTWEIGHT), divided by 10 at epochs 150, 180 and
# 210 of 240, batch 64, T = 4, CE / KD weights 0.1 / 0.9, no label smoothing,
# dropout, lookahead, faster norm shifts or test-time flips, random crops with
# 4 pixels of padding (reflected here, zeros in those repos), the last epoch
# on the full training set, DKD's beta per pair (distill.DKD_PAPER_BETA) and
# AT's weight of 1000.
RECIPES = {
    "fast": {},
    "paper": {"DATASET": "cifar100", "TEACHER": "resnet32x4", "STUDENT": "resnet8x4", "VAL_SIZE": 0,
              "EPOCHS": (240, 240, 240), "BATCH_SIZE": 64, "OPTIMIZER": "sgd", "LR": 0.05, "STUDENT_LR": 0.0, "MOMENTUM": 0.9,
              "WEIGHT_DECAY": 5e-4, "BIAS_LR_SCALE": 1.0, "LOOKAHEAD": False, "CROP_PADDING": 4,
              "LR_SCHEDULE": "step", "LR_MILESTONES": (0.625, 0.75, 0.875), "WARMUP": 0.0,
              "LABEL_SMOOTHING": 0.0, "DROPOUT": 0.0, "TTA": False, "TEMPERATURE": 4.0, "ALPHA": 0.9,
              "DKD_WARMUP": 20 / 240, "AT_WEIGHT": 1000.0},
}

# ---------------------------------------------------------------------------
# Everything below turns the constants above into a validated command line.

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def _positive(value):
    return None if value > 0 else "must be > 0"


def _non_negative(value):
    return None if value >= 0 else "must be >= 0"


def _fraction(value):
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _unit(value):
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def _epochs(value):
    return None if len(value) == 3 and all(v > 0 for v in value) else "must be one or three integers > 0"


def _milestones(value):
    return None if all(0 < v < 1 for v in value) else "must be fractions between 0 and 1"


def _stages(value):
    names = [s for s in value.split(",") if s]
    known = ("teacher", "student", "distilled")
    if not names or any(name not in known for name in names):
        return f"must be a comma-separated list of {', '.join(known)}"
    return None


def _choice(*allowed):
    return lambda value: None if value in allowed else f"must be one of {', '.join(allowed)}"


_RULES = {  # constant -> check(value) returning an error or None
    "IMAGE_SIZE": lambda v: None if v >= 8 else "must be >= 8",
    "VAL_SIZE": _non_negative, "STAGES": _stages, "EPOCHS": _epochs, "BATCH_SIZE": _positive,
    "LR": _positive, "BIAS_LR_SCALE": _positive, "MOMENTUM": _fraction, "WEIGHT_DECAY": _non_negative, "WARMUP": _fraction,
    "LABEL_SMOOTHING": _fraction, "DROPOUT": _fraction, "CROP_PADDING": _non_negative,
    "TEMPERATURE": _positive, "DKD_ALPHA": _non_negative, "DKD_BETA": _non_negative, "DKD_WARMUP": _unit,
    "LSKD_TEMPERATURE": _positive, "LSKD_WEIGHT": _non_negative, "FITNET_WEIGHT": _non_negative,
    "AT_WEIGHT": _non_negative, "ALPHA": _unit, "SEED": _non_negative,
    "STUDENT_LR": _non_negative, "LR_SCHEDULE": _choice("linear", "step"), "LR_MILESTONES": _milestones,
    "RECIPE": lambda v: None if v in RECIPES else f"must be one of {', '.join(RECIPES)}",
    "DEVICE": _choice("auto", "cpu", "cuda"), "AMP": _choice("auto", "bf16", "off"), "THREADS": _non_negative,
}


def defaults():
    """The constants of this module, by name."""
    return {name: value for name, value in globals().items() if re.fullmatch(r"[A-Z][A-Z0-9_]*", name)
            and not callable(value) and name != "RECIPES"}


def _comments():
    """The comment after each constant, for --help."""
    text = Path(__file__).read_text()
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*) = .*?  # (.*)$", text, flags=re.M))


def _tuple_parser(default):
    """Parse 'a,b,c' into a tuple of the default's element type; for EPOCHS,
    one number stands for all three stages."""
    kind = type(default[0])

    def parse(text):
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: give comma-separated {kind.__name__}s")
        return values * len(default) if len(values) == 1 and kind is int else values

    return parse


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line (no usage block) and exits with 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(flag, message, prog=None):
    """Print a one-line configuration error naming the flag, and exit with 2."""
    prog = prog or Path(sys.argv[0]).name
    sys.stderr.write(f"{prog}: error: argument --{flag}: {message}\n")
    raise SystemExit(2)


def device(choice, prog=None):
    """The torch device for DEVICE (auto: CUDA when there is one)."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        fail("device", "cuda was asked for but torch sees no CUDA device; use --device cpu", prog)
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def flag(name):
    return name.lower().replace("_", "-")


def parse(argv=None, description=None, names=None, choices=None, extra=None, derived=None):
    """Parse the command line into a dict of constants, validated.

    names: the constants this program takes (all by default). choices: extra
    allowed-name checks, e.g. {"TEACHER": models.MODELS}. extra: a function
    that adds program-specific arguments to the parser; their values come back
    under their lowercase dest names. derived: a function of the parsed
    values that returns further defaults (a recipe's per-model settings, say);
    like a recipe, they never replace a value the user typed.
    """
    values = defaults()
    names = list(values) if names is None else names
    comments = _comments()
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for name in names:
        default = values[name]
        help_text = comments.get(name, "")
        option = f"--{flag(name)}"
        if isinstance(default, bool):
            parser.add_argument(option, dest=name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(option, dest=name, default=default, type=_tuple_parser(default), metavar="A,B,...",
                                help=help_text)
        else:
            parser.add_argument(option, dest=name, default=default, type=type(default), metavar=type(default).__name__.upper(),
                                help=help_text)
    if extra:
        extra(parser)
    args = vars(parser.parse_args(argv))
    typed = {token.split("=")[0] for token in (sys.argv[1:] if argv is None else argv) if token.startswith("--")}
    was_typed = lambda name: bool(typed & {f"--{flag(name)}", f"--no-{flag(name)}"})  # noqa: E731
    if "RECIPE" in names:  # a recipe replaces defaults, not what the user typed
        args.update({k: v for k, v in RECIPES.get(args["RECIPE"], {}).items() if not was_typed(k)})
    if derived:
        args.update({k: v for k, v in derived(args).items() if not was_typed(k)})
    if "STUDENT_LR" in names and was_typed("LR") and not was_typed("STUDENT_LR"):
        args["STUDENT_LR"] = 0.0  # a typed --lr alone sets the rate of every stage
    for name in names:
        check = _RULES.get(name)
        problem = check(args[name]) if check else None
        if problem is None and choices and name in choices and args[name] not in choices[name]:
            problem = f"unknown name {args[name]!r}; choose one of {', '.join(sorted(choices[name]))}"
        if problem:
            fail(flag(name), f"{problem} (got {args[name]!r})", parser.prog)
    return {**values, **args}
