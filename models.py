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

import copy
import functools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

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
    """Base class of every model: a stem, a list of stages, an optional block
    before pooling (`final`), global pooling, dropout and a linear head.

    Subclasses call super().__init__(dropout), set self.stages (an
    nn.ModuleList) and self.head, and replace self.stem, self.final or
    self.pool where they differ. `feature_stages` picks which stage outputs
    are reported as features (all by default)."""

    feature_stages = None

    def __init__(self, dropout=0.0):
        super().__init__()
        self.stem = nn.Identity()
        self.final = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)

    def forward_features(self, x):
        x = self.stem(x)
        stages = []
        for stage in self.stages:
            x = stage(x)
            stages.append(x)
        pooled = self.pool(self.final(x)).flatten(1)
        if self.feature_stages is not None:
            stages = [stages[i] for i in self.feature_stages]
        return {"stages": stages, "pooled": pooled, "logits": self.head(self.dropout(pooled))}

    def forward(self, x):
        return self.forward_features(x)["logits"]

    def init_from_data(self, images):
        """Data-dependent initialisation from a batch of normalised training
        images, called once before training. Most models need none."""


def fold_batch_norm(model):
    """An inference copy of `model` (in eval mode) in which every batch norm
    that follows a convolution is folded into it: one convolution with a bias
    instead of a convolution and a norm, with the same outputs, features
    included, to float rounding. `model` itself is left as it is.

    The pairs are a convolution then a norm in an nn.Sequential, a
    convolution, a max-pool and a norm in one (AirNet's order: the max-pool
    commutes with the norm's per-channel affine map when every channel's scale
    is positive; a layer with a scale <= 0 keeps its norm), and the pairs that
    a block names in its `folds` attribute."""
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for conv_name, norm_name in foldable_pairs(module):
            conv, norm = getattr(module, conv_name), getattr(module, norm_name)
            setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
            setattr(module, norm_name, nn.Identity())
    return model


def foldable_pairs(module):
    """(convolution, batch norm) attribute names of `module` that fold_batch_norm may fold."""
    if not isinstance(module, nn.Sequential):
        return getattr(module, "folds", ())
    names, layers = list(module._modules), list(module)
    pairs = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Conv2d):
            continue
        after = layers[i + 1 : i + 3]
        if after[:1] and isinstance(after[0], nn.BatchNorm2d):
            pairs.append((names[i], names[i + 1]))
        elif len(after) == 2 and isinstance(after[0], nn.MaxPool2d) and isinstance(after[1], nn.BatchNorm2d):
            if (norm_scale(after[1]) > 0).all():
                pairs.append((names[i], names[i + 2]))
    return pairs


def norm_scale(norm):
    """The per-channel factor by which a batch norm in eval mode multiplies its input."""
    weight = torch.ones_like(norm.running_var) if norm.weight is None else norm.weight
    return weight / torch.sqrt(norm.running_var + norm.eps)


def gelu(x):
    """GELU, by oneDNN's kernel also for channels_last maps: torch hands only
    tensors contiguous in the default layout to oneDNN, and its own kernel is
    1.5 to 1.9 times slower on the channels_last maps of these nets forward,
    1.2 to 1.5 times forward and backward together (bf16 and float32, on a CPU
    with AMX). The channels_last storage, viewed as (N, H, W, C), is such a
    tensor; the results differ from the other kernel's by float rounding."""
    exporting = torch.compiler.is_exporting()  # an exported graph stays free of layouts
    if x.dim() == 4 and not exporting and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return nn.functional.gelu(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return nn.functional.gelu(x)


class GELU(nn.Module):
    def forward(self, x):
        return gelu(x)


def conv_bn_act(in_channels, out_channels, pool=False):
    """3x3 convolution (then 2x2 max-pool if asked), batch norm and GELU, as
    in airbench.

    Pooling before the norm halves the cost of the norm and activation. The
    convolution starts as the identity on its first channels (Dirac init), so
    that a fresh network passes its input through; the norm learns a shift
    only (its scale stays 1: the convolution's weights already set it)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:in_channels])
    norm = nn.BatchNorm2d(out_channels, eps=1e-12, momentum=0.4)
    norm.weight.requires_grad_(False)
    layers = [conv, nn.MaxPool2d(2)] if pool else [conv]
    return nn.Sequential(*layers, norm, GELU())


class Scale(nn.Module):
    """Multiplies its input by a constant, kept in the state dict (so that a
    checkpoint of a network without it does not load silently)."""

    def __init__(self, factor):
        super().__init__()
        self.register_buffer("factor", torch.tensor(float(factor)))

    def forward(self, x):
        return x * self.factor


class GlobalMaxPool(nn.Module):
    """The maximum over height and width, as a 1x1 map: nn.AdaptiveMaxPool2d(1)
    written as a max-pool whose window is the whole map, which exports to ONNX
    on every torch (torch 2.11's exporter cannot convert adaptive_max_pool2d).
    It costs 0.1 to 0.4 ms more per training step than the adaptive pool on 2
    cores of a CPU with native bf16 (under half a percent of the step); amax,
    which also exports, costs more."""

    def forward(self, x):
        return nn.functional.max_pool2d(x, x.shape[-2:])


class AirNet(Classifier):
    """A VGG-like net built for accuracy per FLOP on 32x32 images.

    A whitening stem, then three stages of two 3x3 convolutions each, with a
    2x2 max-pool after the first convolution of every stage, then a global
    max-pool, dropout, one linear layer and a fixed scale of 1/9 on the
    logits. This is the network behind the CIFAR-10 speed records (Keller
    Jordan's airbench), which trains to good accuracy in few epochs; `widths`
    sets the three stage widths. The small logit scale lets the linear layer
    learn at the rate of the rest of the net (airbench's choice).

    The stem is a fixed 2x2 convolution that whitens image patches: its
    filters are the eigenvectors of the patch covariance of training images
    (set by init_from_data), with both signs, followed by GELU; the two signs
    keep the whitened patch whole. It gives the network a good first layer
    from the first step and costs less than a learned stem with batch norm at
    full resolution. Nothing in it trains (airbench trains its bias for the
    first epochs), so no gradient flows back through its full-resolution
    output, the largest tensor of the net: the backward pass skips the stem
    and the input gradient of the first convolution.
    """

    def __init__(self, num_classes, in_channels=3, dropout=0.0, widths=(64, 256, 256)):
        super().__init__(dropout)
        previous = 8 * in_channels  # 4 * in_channels eigenvectors of the 2x2 patches, both signs
        self.whiten = nn.Conv2d(in_channels, previous, 2, bias=False).requires_grad_(False)
        self.stages = nn.ModuleList()
        for width in widths:
            self.stages.append(nn.Sequential(conv_bn_act(previous, width, pool=True), conv_bn_act(width, width)))
            previous = width
        self.pool = GlobalMaxPool()
        self.head = nn.Sequential(nn.Linear(previous, num_classes), Scale(1 / 9))

    @torch.no_grad()
    def init_from_data(self, images, eps=5e-4):
        """Directions in which the patches do not vary at all (grey images
        stored as RGB have 8 of 12) get zero filters: scaled by 1/sqrt(eps),
        they would turn bf16's rounding of the input into features 45 times
        its size, which training sees and float32 evaluation does not."""
        patches = nn.functional.unfold(images.float(), kernel_size=2).transpose(1, 2).flatten(0, 1)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        rank_tolerance = eigenvalues.max() * len(eigenvalues) * torch.finfo(torch.float32).eps  # as matrix_rank's
        filters = eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()
        filters = filters.where(eigenvalues[:, None] > rank_tolerance, 0.0).float()
        filters = filters.view(-1, *self.whiten.weight.shape[1:])
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def stem(self, x):  # a method, so that the whitening layer keeps its own name in checkpoints
        return gelu(self.whiten(x))


AIRNET_WIDTHS = {  # name -> widths of the three stages
    "airnet_xs": (16, 32, 40),
    "airnet_s": (32, 48, 56),
    "airnet_m": (32, 128, 128),
    "airnet_l": (48, 192, 192),
    "airnet_xl": (64, 256, 256),
}
for _name, _widths in AIRNET_WIDTHS.items():
    register(_name)(
        lambda num_classes, in_channels=3, dropout=0.0, _w=_widths: AirNet(num_classes, in_channels, dropout, _w)
    )


# ---------------------------------------------------------------- the standard CIFAR zoo
# The architectures of the CIFAR-100 distillation benchmark (as in RepDistiller
# and mdistiller), at their standard depths and widths. Their stages are the
# outputs of the residual groups (or VGG blocks, or MobileNet/ShuffleNet stages).


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016)."""

    folds = (("conv1", "bn1"), ("conv2", "bn2"))  # for fold_batch_norm

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(Classifier):
    """ResNet for 32x32 images: a 3x3 stem and three groups of (depth - 2) / 6
    basic blocks, the last two halving the resolution. widths = (stem, group 1,
    group 2, group 3): (16, 16, 32, 64) for resnet20 and kin, four times that
    after the stem for the 'x4' variants."""

    def __init__(self, num_classes, in_channels=3, dropout=0.0, depth=20, widths=(16, 16, 32, 64)):
        super().__init__(dropout)
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.ModuleList()
        previous = widths[0]
        for index, width in enumerate(widths[1:]):
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(previous, width, stride=2 if index > 0 and block == 0 else 1))
                previous = width
            self.stages.append(nn.Sequential(*layers))
        self.head = nn.Linear(previous, num_classes)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register(f"resnet{_depth}")(
        lambda num_classes, in_channels=3, dropout=0.0, _d=_depth: CifarResNet(
            num_classes, in_channels, dropout, _d, (16, 16, 32, 64)
        )
    )
for _depth in (8, 32):
    register(f"resnet{_depth}x4")(
        lambda num_classes, in_channels=3, dropout=0.0, _d=_depth: CifarResNet(
            num_classes, in_channels, dropout, _d, (32, 64, 128, 256)
        )
    )


class WideBlock(nn.Module):
    """Pre-activation residual block of wide ResNets (Zagoruyko & Komodakis 2016)."""

    folds = (("conv1", "bn2"),)  # for fold_batch_norm; bn1 comes before its convolution

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        activated = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(Classifier):
    """WRN-depth-k: three groups of (depth - 4) / 6 pre-activation blocks of
    widths 16k, 32k and 64k."""

    def __init__(self, num_classes, in_channels=3, dropout=0.0, depth=16, widen=1):
        super().__init__(dropout)
        blocks = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.stages = nn.ModuleList()
        previous = 16
        for index, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            layers = []
            for block in range(blocks):
                layers.append(WideBlock(previous, width, stride=2 if index > 0 and block == 0 else 1))
                previous = width
            self.stages.append(nn.Sequential(*layers))
        self.final = nn.Sequential(nn.BatchNorm2d(previous), nn.ReLU(inplace=True))
        self.head = nn.Linear(previous, num_classes)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register(f"wrn_{_depth}_{_widen}")(
        lambda num_classes, in_channels=3, dropout=0.0, _d=_depth, _k=_widen: WideResNet(
            num_classes, in_channels, dropout, _d, _k
        )
    )


class VGG(Classifier):
    """VGG with batch norm for 32x32 images: five blocks of 3x3 convolutions,
    each but the last followed by a 2x2 max-pool, then global average pooling
    and one linear layer (as in RepDistiller)."""

    def __init__(self, num_classes, in_channels=3, dropout=0.0, blocks=((64,), (128,), (256,), (512,), (512,))):
        super().__init__(dropout)
        self.stages = nn.ModuleList()
        previous = in_channels
        for index, widths in enumerate(blocks):
            layers = [nn.MaxPool2d(2)] if index > 0 else []
            for width in widths:
                layers += [
                    nn.Conv2d(previous, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                previous = width
            self.stages.append(nn.Sequential(*layers))
        self.head = nn.Linear(previous, num_classes)


VGG_BLOCKS = {  # name -> convolutions per block (widths 64, 128, 256, 512, 512)
    "vgg8": (1, 1, 1, 1, 1),
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
for _name, _counts in VGG_BLOCKS.items():
    register(_name)(
        lambda num_classes, in_channels=3, dropout=0.0, _c=_counts: VGG(
            num_classes, in_channels, dropout, tuple((w,) * n for w, n in zip((64, 128, 256, 512, 512), _c))
        )
    )


def conv_bn(in_channels, out_channels, kernel=1, stride=1, groups=1, relu=True):
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.body = nn.Sequential(
            conv_bn(in_channels, hidden),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_channels, relu=False),
        )

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(Classifier):
    """MobileNetV2 for 32x32 images (Sandler et al. 2018) as used by the CIFAR
    distillation benchmark: expansion 6, width multiplier 0.5, strides adapted
    to small inputs."""

    feature_stages = (1, 2, 4, 6)  # the stages that change resolution or end the network

    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )  # expansion, width, blocks, stride of the first block

    def __init__(self, num_classes, in_channels=3, dropout=0.0, width=0.5):
        super().__init__(dropout)
        previous = int(32 * width)
        self.stem = conv_bn(in_channels, previous, 3, 1)
        self.stages = nn.ModuleList()
        for expansion, channels, blocks, stride in self.SETTINGS:
            layers = []
            for block in range(blocks):
                layers.append(InvertedResidual(previous, int(channels * width), stride if block == 0 else 1, expansion))
                previous = int(channels * width)
            self.stages.append(nn.Sequential(*layers))
        self.final = conv_bn(previous, 1280)
        self.head = nn.Linear(1280, num_classes)


register("mobilenetv2")(lambda num_classes, in_channels=3, dropout=0.0: MobileNetV2(num_classes, in_channels, dropout))


def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """ShuffleNet unit (Zhang et al. 2018): grouped 1x1, shuffle, depthwise 3x3,
    grouped 1x1; stride 2 units concatenate an average-pooled shortcut."""

    def __init__(self, in_channels, out_channels, stride, groups, first_groups=True):
        super().__init__()
        self.stride = stride
        if stride == 2:
            out_channels -= in_channels
        hidden = out_channels // 4
        self.groups = groups if first_groups else 1
        self.reduce = conv_bn(in_channels, hidden, groups=self.groups)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden, relu=False)
        self.expand = conv_bn(hidden, out_channels, groups=groups, relu=False)

    def forward(self, x):
        out = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.groups)))
        if self.stride == 2:
            return torch.relu(torch.cat([out, nn.functional.avg_pool2d(x, 3, 2, 1)], 1))
        return torch.relu(out + x)


class ShuffleNetV1(Classifier):
    """ShuffleNet V1 for 32x32 images, 3 groups, widths (240, 480, 960), as in RepDistiller."""

    def __init__(self, num_classes, in_channels=3, dropout=0.0, widths=(240, 480, 960), blocks=(4, 8, 4), groups=3):
        super().__init__(dropout)
        self.stem = conv_bn(in_channels, 24)
        self.stages = nn.ModuleList()
        previous = 24
        for index, (width, count) in enumerate(zip(widths, blocks)):
            layers = []
            for block in range(count):
                layers.append(
                    ShuffleV1Block(
                        previous, width, 2 if block == 0 else 1, groups, first_groups=not (index == 0 and block == 0)
                    )
                )
                previous = width
            self.stages.append(nn.Sequential(*layers))
        self.head = nn.Linear(previous, num_classes)


class ShuffleV2Block(nn.Module):
    """ShuffleNet V2 unit (Ma et al. 2018): split, one branch of 1x1, depthwise
    3x3, 1x1, concatenate, shuffle. Stride-2 units convolve both branches."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.stride = stride
        branch = out_channels // 2
        main_in = in_channels if stride == 2 else in_channels // 2
        self.main = nn.Sequential(
            conv_bn(main_in, branch),
            conv_bn(branch, branch, 3, stride, groups=branch, relu=False),
            conv_bn(branch, branch),
        )
        self.side = None
        if stride == 2:
            self.side = nn.Sequential(
                conv_bn(in_channels, in_channels, 3, 2, groups=in_channels, relu=False), conv_bn(in_channels, branch)
            )

    def forward(self, x):
        if self.side is None:
            kept, x = x.chunk(2, dim=1)
            return channel_shuffle(torch.cat([kept, self.main(x)], 1), 2)
        return channel_shuffle(torch.cat([self.side(x), self.main(x)], 1), 2)


class ShuffleNetV2(Classifier):
    """ShuffleNet V2 for 32x32 images, widths (116, 232, 464), as in RepDistiller."""

    def __init__(self, num_classes, in_channels=3, dropout=0.0, widths=(116, 232, 464), blocks=(4, 8, 4)):
        super().__init__(dropout)
        self.stem = conv_bn(in_channels, 24)
        self.stages = nn.ModuleList()
        previous = 24
        for width, count in zip(widths, blocks):
            layers = []
            for block in range(count):
                layers.append(ShuffleV2Block(previous, width, 2 if block == 0 else 1))
                previous = width
            self.stages.append(nn.Sequential(*layers))
        self.final = conv_bn(previous, 1024)
        self.head = nn.Linear(1024, num_classes)


register("shufflenetv1")(
    lambda num_classes, in_channels=3, dropout=0.0: ShuffleNetV1(num_classes, in_channels, dropout)
)
register("shufflenetv2")(
    lambda num_classes, in_channels=3, dropout=0.0: ShuffleNetV2(num_classes, in_channels, dropout)
)


@functools.lru_cache
def selection_problem(student_name, teacher_name):
    """Why a `student_name` network cannot start from a `teacher_name`'s
    weights by select_weights, in a few words, or None when it can (the
    classes and input channels change no tensor's presence or rank)."""
    try:
        select_weights(build(student_name, 10).state_dict(), build(teacher_name, 10).state_dict())
    except ValueError as error:
        return str(error)
    return None


def evenly_spaced(size, larger):
    """`size` indices of `larger`, evenly spread from 0; the same two sizes always give the same indices."""
    return torch.arange(size) * larger // size


def select_weights(student_state, teacher_state):
    """Weight selection (Xu et al., ICLR 2024, "Initializing models with larger
    ones"): each of the student's tensors takes the teacher's tensor of the
    same name, at evenly spaced indices along every dimension. As the same
    sizes always pick the same indices, the channels a layer keeps as outputs
    are those the next layer keeps as inputs, so a student as wide as the
    teacher starts as the teacher itself. A shallower student of the same
    family (resnet8x4 of resnet32x4) takes the first blocks of each stage,
    which bear the same names. (Networks that shuffle, split or group their
    channels keep this only in part.) Returns the student's new state dict;
    raises ValueError naming the first tensor that has no counterpart or is
    larger than it."""
    selected = {}
    shape = lambda t: "x".join(map(str, t.shape)) or "scalar"  # noqa: E731
    for name, tensor in student_state.items():
        source = teacher_state.get(name)
        if source is None:
            raise ValueError(f"the teacher has no tensor {name}")
        if source.dim() != tensor.dim():
            raise ValueError(f"{name} is {shape(tensor)} in the student, {shape(source)} in the teacher")
        if any(s > t for s, t in zip(tensor.shape, source.shape)):
            raise ValueError(f"{name} is {shape(tensor)} in the student, larger than the teacher's {shape(source)}")
        for dim, (size, larger) in enumerate(zip(tensor.shape, source.shape)):
            source = source.index_select(dim, evenly_spaced(size, larger).to(source.device))
        selected[name] = source.to(tensor.dtype)
    return selected


def probabilities(model, images, tta=False):
    """Softmax of the model's logits, in float32; with tta, averaged with the
    softmax of the mirrored images (test-time flip)."""
    probs = model(images).float().softmax(1)
    if tta:
        probs = (probs + model(images.flip(-1)).float().softmax(1)) / 2
    return probs
