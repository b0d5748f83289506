"""Teachers trained elsewhere, for train.py --teacher-checkpoint.

A teacher file is one of:
- a checkpoint that this repo's train.py wrote (<stage>.pt);
- a bare state dict of a zoo model;
- {"model": state_dict, ...}, the layout of the CIFAR teachers that
  RepDistiller and mdistiller publish (with "epoch", "best_acc", ...).

State dicts may use this repo's parameter names or those of RepDistiller's and
mdistiller's model code (the two share it), which name the same layers
differently (conv1, layer1.0.bn1, fc... for our stem.0, stages.0.0.bn1,
head...). Only architectures that compute the same function in both are
mapped: the CIFAR ResNets, the WRNs and ShuffleNetV2. Their VGG, MobileNetV2
and ShuffleNetV1 are other networks than ours (see FOREIGN_DIFFERS), so their
weights are refused rather than loaded into a network they were not trained
for.
"""

import re

import torch

import checkpoint
import models

TEACHER_FILES = "pass a .pt of this repo, a state dict, or {'model': state_dict} as RepDistiller and mdistiller save"


def _renamer(*rules):
    """A function from a foreign parameter name to ours. Each rule is a regular
    expression for the whole name and a template for ours, filled with the
    named groups; their groups count from 1 (layer1, block1) and our stages
    from 0, so {stage} is the group's number minus one. A template may also
    be a function of the match. Names that no rule matches stay as they are."""
    compiled = [(re.compile(pattern), template) for pattern, template in rules]

    def rename(name):
        for pattern, template in compiled:
            match = pattern.fullmatch(name)
            if match:
                if callable(template):
                    return template(match)
                fields = match.groupdict()
                return template.format(stage=int(fields.get("group", 1)) - 1, **fields)
        return name

    return rename


# RepDistiller's resnet.py: conv1/bn1 stem, layer1-3 of BasicBlocks (conv1, bn1,
# conv2, bn2, downsample = 1x1 conv + BN), fc.
_RESNET = _renamer(
    (r"conv1\.(?P<rest>.+)", "stem.0.{rest}"),
    (r"bn1\.(?P<rest>.+)", "stem.1.{rest}"),
    (r"layer(?P<group>\d)\.(?P<block>\d+)\.downsample\.(?P<rest>.+)", "stages.{stage}.{block}.shortcut.{rest}"),
    (r"layer(?P<group>\d)\.(?P<block>\d+)\.(?P<rest>(conv|bn)[12]\..+)", "stages.{stage}.{block}.{rest}"),
    (r"fc\.(?P<rest>.+)", "head.{rest}"),
)

# RepDistiller's wrn.py: conv1 stem, block1-3 each holding .layer of
# pre-activation blocks (bn1, conv1, bn2, conv2, convShortcut), the final bn1, fc.
_WRN = _renamer(
    (r"conv1\.(?P<rest>.+)", "stem.{rest}"),
    (
        r"block(?P<group>\d)\.layer\.(?P<block>\d+)\.convShortcut\.(?P<rest>.+)",
        "stages.{stage}.{block}.shortcut.{rest}",
    ),
    (r"block(?P<group>\d)\.layer\.(?P<block>\d+)\.(?P<rest>(conv|bn)[12]\..+)", "stages.{stage}.{block}.{rest}"),
    (r"bn1\.(?P<rest>.+)", "final.0.{rest}"),
    (r"fc\.(?P<rest>.+)", "head.{rest}"),
)

# RepDistiller's ShuffleNetv2.py: conv1/bn1 stem; each layer is a DownBlock
# (left branch: conv1/bn1 depthwise, conv2/bn2; right branch: conv3-5/bn3-5)
# then BasicBlocks (conv1-3/bn1-3 on half the channels); conv2/bn2, linear.
# Our stride-2 unit calls the left branch `side` and the right one `main`.
_DOWN_BLOCK = {"1": "side.0", "2": "side.1", "3": "main.0", "4": "main.1", "5": "main.2"}
_BASIC_BLOCK = {"1": "main.0", "2": "main.1", "3": "main.2"}


def _shuffle_unit(match):
    layer = (_DOWN_BLOCK if match["block"] == "0" else _BASIC_BLOCK).get(match["index"])
    if layer is None:  # no such layer in their unit either: left for the fit check to report
        return match.string
    part = "0" if match["kind"] == "conv" else "1"  # conv_bn's convolution, then its norm
    return f"stages.{int(match['group']) - 1}.{match['block']}.{layer}.{part}.{match['rest']}"


_SHUFFLENETV2 = _renamer(
    (r"conv1\.(?P<rest>.+)", "stem.0.{rest}"),
    (r"bn1\.(?P<rest>.+)", "stem.1.{rest}"),
    (r"layer(?P<group>\d)\.(?P<block>\d+)\.(?P<kind>conv|bn)(?P<index>[1-5])\.(?P<rest>.+)", _shuffle_unit),
    (r"conv2\.(?P<rest>.+)", "final.0.{rest}"),
    (r"bn2\.(?P<rest>.+)", "final.1.{rest}"),
    (r"linear\.(?P<rest>.+)", "head.{rest}"),
)

FOREIGN_NAMES = {models.CifarResNet: _RESNET, models.WideResNet: _WRN, models.ShuffleNetV2: _SHUFFLENETV2}

FOREIGN_DIFFERS = {  # architectures whose RepDistiller/mdistiller version is another network than ours
    models.VGG: "RepDistiller's and mdistiller's vgg has conv biases and one max-pool fewer on 32x32 images",
    models.MobileNetV2: "RepDistiller's and mdistiller's MobileNetV2 (mobile_half) starts with a stride-2 "
    "convolution, ours with stride 1",
    models.ShuffleNetV1: "RepDistiller's and mdistiller's ShuffleV1 has a ReLU after the depthwise convolution, "
    "ours none",
}


def _state_dict_of(content):
    """The state dict inside a loaded teacher file, and what layout it had."""
    if isinstance(content, dict) and content and all(torch.is_tensor(v) for v in content.values()):
        return content, "a state dict"
    if (
        isinstance(content, dict)
        and isinstance(content.get("model"), dict)
        and content["model"]
        and all(torch.is_tensor(v) for v in content["model"].values())
    ):
        return content["model"], "a {'model': state_dict} file"
    return None, None


def fit_problem(model, state):
    """Why `state` does not fit `model`, in one line, or None when it does."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    reshaped = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )
    if reshaped:
        key = reshaped[0]
        shape = lambda t: "x".join(map(str, t.shape)) or "scalar"  # noqa: E731
        problems.append(
            f"{len(reshaped)} of another shape ({key}: {shape(state[key])} in the file, {shape(ours[key])} here)"
        )
    return "; ".join(problems) or None


def load_teacher(path, name, classes, in_channels):
    """The teacher network in `path`, for --teacher `name`, in eval mode on the
    CPU, a few words on what the file held, and the file's content.

    Raises ValueError with a one-line reason when the file is not a teacher
    file or its weights do not fit `name` for these classes."""
    try:
        content = checkpoint.read(path, "a teacher checkpoint")
    except FileNotFoundError:
        raise ValueError("no such file; check the path") from None
    except checkpoint.Unreadable:
        raise
    except ValueError as error:
        raise ValueError(f"{error}; {TEACHER_FILES}") from None
    checkpoint.refuse_unfinished(content)
    if isinstance(content, dict) and isinstance(content.get("model"), str) and "state_dict" in content:
        checkpoint.check_format(content)
        if content["model"] != name:
            raise ValueError(f"holds a {content['model']}, not the --teacher {name}; pass --teacher {content['model']}")
        if content.get("classes") != list(classes):
            theirs = [str(c) for c in content.get("classes") or []]
            raise ValueError(
                f"was trained on other classes ({', '.join(theirs[:3])}, ...) than this dataset's "
                f"({', '.join(classes[:3])}, ...); pass the --dataset it was trained on"
            )
        state, kind = content["state_dict"], f"a {content.get('stage', 'train.py')} checkpoint of this repo"
    else:
        state, kind = _state_dict_of(content)
        if state is None:
            raise ValueError(f"not a teacher checkpoint; {TEACHER_FILES}")
    model = models.build(name, len(classes), in_channels)
    ours = model.state_dict().keys()
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    rename = FOREIGN_NAMES.get(type(model))
    if rename is not None:  # our names or RepDistiller's, whichever the file uses (ours on a tie)
        renamed = {rename(k): v for k, v in state.items()}
        if len(renamed.keys() & ours) > len(state.keys() & ours):
            state, kind = renamed, kind + " with RepDistiller's parameter names"
    problem = fit_problem(model, state)
    if problem:
        foreign = len(state.keys() & ours) < len(state) / 2  # mostly names that are not ours
        differs = FOREIGN_DIFFERS.get(type(model)) if foreign else None
        fix = (
            f" ({differs}); train this teacher here instead"
            if differs
            else "; pass the --teacher it was trained as, on a dataset with the same classes"
        )
        raise ValueError(f"its weights do not fit {name} with {len(classes)} classes: {problem}{fix}")
    model.load_state_dict(state)
    return model.eval(), kind, content
