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

    def init_from_data(self, images):
        """Data-dependent initialisation from a batch of normalised training
        images, called once before training. Most models need none."""


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

    A whitening stem, then three stages of two 3x3 convolutions each, with a
    2x2 max-pool after the first convolution of every stage, then a global
    max-pool, dropout and one linear layer. This is the shape of the network
    behind the CIFAR-10 speed records (Keller Jordan's airbench), which trains
    to good accuracy in few epochs; `widths` sets the three stage widths.

    The stem is a frozen 2x2 convolution that whitens image patches: its
    filters are the eigenvectors of the patch covariance of training images
    (set by init_from_data), with both signs, followed by ReLU. It gives the
    network a good first layer from the first step, and it costs less than a
    learned stem with batch norm at full resolution.
    """

    def __init__(self, num_classes, in_channels=3, dropout=0.0, widths=(64, 256, 256)):
        super().__init__()
        previous = 8 * in_channels  # 4 * in_channels eigenvectors of the 2x2 patches, both signs
        self.whiten = nn.Conv2d(in_channels, previous, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.stages = nn.ModuleList()
        for width in widths:
            self.stages.append(nn.Sequential(conv_bn_act(previous, width, pool=True), conv_bn_act(width, width)))
            previous = width
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(previous, num_classes)

    @torch.no_grad()
    def init_from_data(self, images, eps=5e-4):
        patches = nn.functional.unfold(images.float(), kernel_size=2).transpose(1, 2).flatten(0, 1)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).float()
        filters = filters.view(-1, *self.whiten.weight.shape[1:])
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def forward_features(self, x):
        x = nn.functional.relu(self.whiten(x))
        stages = []
        for stage in self.stages:
            x = stage(x)
            stages.append(x)
        pooled = self.pool(x).flatten(1)
        return {"stages": stages, "pooled": pooled, "logits": self.head(self.dropout(pooled))}


AIRNET_WIDTHS = {  # name -> widths of the three stages
    "airnet_xs": (16, 32, 40),
    "airnet_s": (32, 48, 56),
    "airnet_m": (32, 128, 128),
    "airnet_l": (48, 192, 192),
    "airnet_xl": (64, 256, 256),
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
