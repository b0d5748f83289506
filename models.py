"""Image classifiers for small images, in a registry keyed by name.

Every model is a `Classifier`: `model(x)` returns logits, and
`model.forward_features(x)` returns a dict with the logits, the outputs of each
stage (`stages`, a list of feature maps, shallow to deep) and the pooled
pre-logit feature (`pooled`). Feature-based distillation methods use the dict;
nothing else needs to know a model's internals.

This file knows nothing of data or training. Constructors take
`(num_classes, in_channels, dropout=...)` and work for any input size the
architecture allows.
"""

import torch
from torch import nn

MODELS = {}  # name -> constructor(num_classes, in_channels, dropout=0.0)


def register(name):
    """Add a constructor to MODELS under `name`."""

    def add(constructor):
        MODELS[name] = constructor
        return constructor

    return add


def build(name, num_classes, in_channels=3, dropout=0.0):
    """Construct the model registered as `name`."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes, in_channels, dropout=dropout)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


class Classifier(nn.Module):
    """Base class: subclasses implement forward_features, forward follows."""

    def forward_features(self, x):
        raise NotImplementedError

    def forward(self, x):
        return self.forward_features(x)["logits"]


def conv_bn_act(in_channels, out_channels, pool=False):
    """3x3 convolution (then 2x2 max-pool if asked), batch norm and ReLU.

    Pooling before the norm halves the cost of the norm and activation, as in
    the fast CIFAR-10 trainers (airbench)."""
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class AirNet(Classifier):
    """A VGG-like net built for accuracy per FLOP on 32x32 images.

    A 3x3 stem, then three stages of two convolutions each, with a 2x2
    max-pool after the first convolution of every stage, then a global max-pool,
    dropout and one linear layer. This is the shape of the network behind the
    CIFAR-10 speed records (Keller Jordan's airbench), which trains to high
    accuracy in few epochs. `widths` sets the stem and stage widths.
    """

    def __init__(self, num_classes, in_channels=3, dropout=0.0, widths=(24, 64, 256, 256)):
        super().__init__()
        stem, *stage_widths = widths
        self.stem = conv_bn_act(in_channels, stem)
        self.stages = nn.ModuleList()
        previous = stem
        for width in stage_widths:
            self.stages.append(nn.Sequential(conv_bn_act(previous, width, pool=True), conv_bn_act(width, width)))
            previous = width
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(previous, num_classes)

    def forward_features(self, x):
        x = self.stem(x)
        stages = []
        for stage in self.stages:
            x = stage(x)
            stages.append(x)
        pooled = self.pool(x).flatten(1)
        return {"stages": stages, "pooled": pooled, "logits": self.head(self.dropout(pooled))}


AIRNET_WIDTHS = {  # name -> (stem, stage 1, stage 2, stage 3) widths
    "airnet_xs": (16, 16, 32, 40),
    "airnet_s": (16, 32, 48, 56),
    "airnet_m": (24, 32, 128, 128),
    "airnet_l": (24, 48, 192, 192),
    "airnet_xl": (24, 64, 256, 256),
}
for _name, _widths in AIRNET_WIDTHS.items():
    register(_name)(lambda num_classes, in_channels=3, dropout=0.0, _w=_widths: AirNet(num_classes, in_channels, dropout, _w))


def checkpoint_model(checkpoint):
    """Rebuild the model a checkpoint describes and load its weights.

    Raises ValueError with a readable reason when the checkpoint does not fit
    (unknown model, weights of another shape)."""
    try:
        model = build(checkpoint["model"], checkpoint["num_classes"], checkpoint["in_channels"])
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        reason = first[1].strip() if len(first) > 1 else first[0]
        raise ValueError(f"its weights do not fit model {checkpoint['model']!r} with "
                         f"{checkpoint['num_classes']} classes ({reason})") from None
    return model


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict safely (weights_only) and check its keys.

    Raises ValueError with a one-line reason for anything that is not one of
    our checkpoints."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # truncated zip, pickle refused by weights_only, not a torch file...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"not a readable checkpoint ({reason[:200]})") from None
    required = ("model", "state_dict", "num_classes", "in_channels", "classes")
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        raise ValueError("not a checkpoint of this repo (keys model, state_dict, num_classes, ... are missing)")
    return checkpoint
