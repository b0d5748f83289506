"""Training objectives (plain cross-entropy, and distillation from a frozen
teacher) and how they are optimised.

An objective is an nn.Module whose forward(images, labels) returns
(loss, student logits). The training loop optimises whatever parameters of the
objective require gradients, so a method's trainable adapters train with the
student while the frozen teacher never does. The loop needs no special case
for any method.

Distillation methods live in METHODS, keyed by name. A method is an nn.Module
built from the config (its own constants carry its name as prefix) that
returns the student's loss from the two networks' outputs:
`loss(student_out, teacher_out, labels)`, where each output is the dict of
`models.Classifier.forward_features` (logits, stage features, pooled feature).
"""

import torch
import torch.nn.functional as F
from torch import nn

import models

METHODS = {}  # name -> class(config, student, teacher, sample), see Method


def register(name):
    def add(cls):
        METHODS[name] = cls
        return cls

    return add


class FrozenTeacher(nn.Module):
    """A trained network that only gives targets.

    Its weights never require gradients, it stays in eval mode whatever
    `.train()` is called on it (so batch-norm statistics and dropout are
    those of inference), and it runs under no_grad."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def train(self, mode=True):
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images):
        """The teacher's outputs: the dict of models.Classifier.forward_features."""
        return self.model.forward_features(images)


def kd_loss(student_logits, teacher_logits, temperature):
    """Hinton et al. (2015): T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    KL is summed over classes and averaged over the batch, in float32 even
    under bf16 autocast. The T^2 factor keeps the gradient scale independent
    of the temperature."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature ** 2


class Method(nn.Module):
    """Base for distillation methods.

    Constructed from the config, the two networks and `sample`, a small batch
    of training images with which feature methods size their adapters.
    `progress`, the fraction of training done at the end of the current epoch
    (1/epochs in the first, 1 in the last), is set each epoch, for methods that
    warm up. It is a 0-d tensor, not a float, so that torch.compile does not
    recompile the loss when it changes."""

    def __init__(self, config, student, teacher, sample=None):
        super().__init__()
        self.label_smoothing = config["LABEL_SMOOTHING"]
        self.register_buffer("progress", torch.zeros(()), persistent=False)

    def set_progress(self, progress):
        self.progress.fill_(progress)

    def cross_entropy(self, logits, labels):
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def loss(self, student_out, teacher_out, labels):
        raise NotImplementedError


@register("kd")
class KD(Method):
    """loss = (1 - ALPHA) * CE(student, labels) + ALPHA * T^2 * KL(teacher || student).

    ALPHA weighs the distillation term (some repos weigh CE with alpha instead)."""

    def __init__(self, config, student, teacher, sample=None):
        super().__init__(config, student, teacher, sample)
        self.ce_weight, self.soft_weight = 1 - config["ALPHA"], config["ALPHA"]
        self.temperature = config["TEMPERATURE"]

    def soft_targets_loss(self, student_logits, teacher_logits):
        return kd_loss(student_logits, teacher_logits, self.temperature)

    def loss(self, student_out, teacher_out, labels):
        hard = self.cross_entropy(student_out["logits"], labels)
        soft = self.soft_targets_loss(student_out["logits"], teacher_out["logits"])
        return self.ce_weight * hard + self.soft_weight * soft


def standardize(logits, eps=1e-7):
    """Z-score each row of logits (zero mean, unit standard deviation)."""
    logits = logits.float()
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + eps)


@register("lskd")
class LSKD(KD):
    """KD on standardised logits (Sun et al., CVPR 2024, "Logit standardization
    in knowledge distillation"): both networks' logits are z-scored before the
    temperature, so that the student matches the teacher's logit relations
    rather than their scale. CE keeps its weight 1 - ALPHA; the distillation
    term gets LSKD_WEIGHT (the paper's 9, not ALPHA: the KL of standardised
    logits is small, so the paper weighs it ten times more than plain KD)."""

    def __init__(self, config, student, teacher, sample=None):
        super().__init__(config, student, teacher, sample)
        self.temperature, self.soft_weight = config["LSKD_TEMPERATURE"], config["LSKD_WEIGHT"]

    def soft_targets_loss(self, student_logits, teacher_logits):
        return kd_loss(standardize(student_logits), standardize(teacher_logits), self.temperature)


def dkd_parts(student_logits, teacher_logits, labels, temperature):
    """Decoupled KD (Zhao et al., CVPR 2022): the target-class part (TCKD,
    binary KL of target vs the rest) and the non-target part (NCKD, KL among
    the non-target classes), each times T^2 and averaged over the batch. KD
    itself is TCKD + (1 - p_teacher(target)) * NCKD, sample by sample."""
    student, teacher = student_logits.float() / temperature, teacher_logits.float() / temperature
    target = F.one_hot(labels, student.shape[1]).bool()
    p_student, p_teacher = student.softmax(1), teacher.softmax(1)
    binary_student = torch.stack([p_student[target], 1 - p_student[target]], 1).clamp_min(1e-12)
    binary_teacher = torch.stack([p_teacher[target], 1 - p_teacher[target]], 1).clamp_min(1e-12)
    tckd = (binary_teacher * (binary_teacher.log() - binary_student.log())).sum(1).mean()
    masked = torch.finfo(torch.float32).min
    log_student_rest = student.masked_fill(target, masked).log_softmax(1)
    log_teacher_rest = teacher.masked_fill(target, masked).log_softmax(1)
    nckd = (log_teacher_rest.exp() * (log_teacher_rest - log_student_rest)).masked_fill(target, 0).sum(1).mean()
    return tckd * temperature ** 2, nckd * temperature ** 2


@register("dkd")
class DKD(Method):
    """loss = CE + warm-up * (DKD_ALPHA * TCKD + DKD_BETA * NCKD); the
    distillation term ramps up linearly, epoch by epoch, over the first
    DKD_WARMUP of training (the paper's min(epoch / 20, 1) for 240 epochs)."""

    def __init__(self, config, student, teacher, sample=None):
        super().__init__(config, student, teacher, sample)
        self.alpha, self.beta = config["DKD_ALPHA"], config["DKD_BETA"]
        self.warmup, self.temperature = config["DKD_WARMUP"], config["TEMPERATURE"]

    def loss(self, student_out, teacher_out, labels):
        tckd, nckd = dkd_parts(student_out["logits"], teacher_out["logits"], labels, self.temperature)
        ramp = (self.progress / self.warmup).clamp(max=1.0) if self.warmup > 0 else 1.0
        return self.cross_entropy(student_out["logits"], labels) + ramp * (self.alpha * tckd + self.beta * nckd)


@torch.no_grad()
def feature_shapes(model, sample):
    """Shapes of a model's stage features for `sample`, without touching its
    batch-norm statistics."""
    was_training = model.training
    model.eval()
    shapes = [tuple(f.shape[1:]) for f in model.forward_features(sample)["stages"]]
    model.train(was_training)
    return shapes


def match_size(features, size):
    """Average-pool a feature map down to `size` (height, width) if it is larger."""
    return F.adaptive_avg_pool2d(features, size) if tuple(features.shape[-2:]) != tuple(size) else features


@register("fitnet")
class FitNet(Method):
    """FitNets hints (Romero et al. 2015): the middle stage of the student,
    through a trainable 1x1 convolution and batch norm, regresses the middle
    stage of the teacher. loss = CE + FITNET_WEIGHT * MSE. The adapter trains
    with the student and is not part of the student's checkpoint."""

    def __init__(self, config, student, teacher, sample=None):
        super().__init__(config, student, teacher, sample)
        self.weight = config["FITNET_WEIGHT"]
        student_shapes, teacher_shapes = feature_shapes(student, sample), feature_shapes(teacher, sample)
        self.student_stage, self.teacher_stage = len(student_shapes) // 2, len(teacher_shapes) // 2
        (s_channels, *s_size), (t_channels, *t_size) = student_shapes[self.student_stage], teacher_shapes[self.teacher_stage]
        self.size = (min(s_size[0], t_size[0]), min(s_size[1], t_size[1]))
        self.adapter = nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels))

    def loss(self, student_out, teacher_out, labels):
        hint = match_size(self.adapter(student_out["stages"][self.student_stage]), self.size)
        target = match_size(teacher_out["stages"][self.teacher_stage], self.size)
        return self.cross_entropy(student_out["logits"], labels) + self.weight * F.mse_loss(hint.float(), target.float())


def attention_map(features, size):
    """Spatial attention of Zagoruyko & Komodakis: mean over channels of the
    squared activations, at `size`, flattened and L2-normalised."""
    return F.normalize(match_size(features.float().pow(2).mean(1, keepdim=True), size).flatten(1), dim=1)


@register("at")
class AT(Method):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): the student's
    spatial attention maps match the teacher's at every pair of stages (the
    last k stages of each, k the smaller stage count; maps pooled to the smaller
    size). loss = CE + AT_WEIGHT * sum of mean squared differences."""

    def __init__(self, config, student, teacher, sample=None):
        super().__init__(config, student, teacher, sample)
        self.weight = config["AT_WEIGHT"]
        student_shapes, teacher_shapes = feature_shapes(student, sample), feature_shapes(teacher, sample)
        self.pairs = min(len(student_shapes), len(teacher_shapes))
        self.sizes = [(min(s[1], t[1]), min(s[2], t[2]))
                      for s, t in zip(student_shapes[-self.pairs:], teacher_shapes[-self.pairs:])]

    def loss(self, student_out, teacher_out, labels):
        transfer = sum((attention_map(s, size) - attention_map(t, size)).pow(2).mean()
                       for s, t, size in zip(student_out["stages"][-self.pairs:], teacher_out["stages"][-self.pairs:],
                                             self.sizes))
        return self.cross_entropy(student_out["logits"], labels) + self.weight * transfer


class Supervised(nn.Module):
    """Cross-entropy training of one network (the teacher and the baseline student)."""

    def __init__(self, model, label_smoothing=0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def set_progress(self, progress):
        pass

    def forward(self, images, labels):
        logits = self.model(images)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing), logits


class Distillation(nn.Module):
    """A student trained against a frozen teacher with one of METHODS."""

    def __init__(self, student, teacher, method):
        super().__init__()
        self.model = student
        self.teacher = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        self.method = method

    def set_progress(self, progress):
        self.method.set_progress(progress)

    def forward(self, images, labels):
        teacher_out = self.teacher(images)
        student_out = self.model.forward_features(images)
        return self.method.loss(student_out, teacher_out, labels), student_out["logits"]


# DKD's beta for the standard CIFAR-100 pairs, from the DKD paper's released configurations
DKD_PAPER_BETA = {("resnet32x4", "resnet8x4"): 8.0, ("wrn_40_2", "wrn_16_2"): 6.0, ("resnet56", "resnet20"): 2.0,
                  ("resnet110", "resnet32"): 2.0, ("vgg13", "vgg8"): 6.0}


def paper_pair_settings(cfg):
    """The paper recipe's settings that depend on the networks: lr 0.01 for
    MobileNet and ShuffleNet students, and DKD's beta for the pair."""
    if cfg["RECIPE"] != "paper":
        return {}
    settings = {"DKD_BETA": DKD_PAPER_BETA.get((cfg["TEACHER"], cfg["STUDENT"]), cfg["DKD_BETA"])}
    if cfg["STUDENT"] in models.LIGHTWEIGHT:
        settings["STUDENT_LR"] = 0.01
    return settings


def build_method(name, config, student, teacher, sample=None):
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](config, student, teacher, sample)


# ---------------------------------------------------------------- optimisation

def sgd(params, lr, cfg):
    return torch.optim.SGD(params, lr=lr, momentum=cfg["MOMENTUM"], nesterov=True)


def adamw(params, lr, cfg):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99))


OPTIMIZERS = {"sgd": sgd, "adamw": adamw}  # name -> constructor(param groups, lr, config)


def make_optimizer(objective, cfg, lr):
    """The optimizer over every trainable parameter of the objective (the
    student and any adapters of the method), without weight decay on biases
    and norm parameters. The shift of a norm whose scale is fixed (as in
    AirNet) learns BIAS_LR_SCALE times faster, as in airbench: those shifts are
    the only thing such a norm learns, and they move far too slowly at the
    weights' rate."""
    trainable = [p for p in objective.parameters() if p.requires_grad]
    shifts = {id(m.bias) for m in objective.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
              and m.affine and not m.weight.requires_grad}
    groups = [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": cfg["WEIGHT_DECAY"]},
              {"params": [p for p in trainable if p.ndim <= 1 and id(p) not in shifts], "weight_decay": 0.0},
              {"params": [p for p in trainable if id(p) in shifts], "weight_decay": 0.0, "lr": lr * cfg["BIAS_LR_SCALE"]}]
    return OPTIMIZERS[cfg["OPTIMIZER"]]([group for group in groups if group["params"]], lr, cfg)


class Lookahead:
    """Airbench's lookahead: every `every` steps, and after the last one, the
    model's weights (and batch-norm statistics) move to an exponential moving
    average of themselves, whose decay rises from 0 to 0.95^5 as progress^3,
    so the model ends as that average. Late in training this averages out the
    noise of the last steps, which a short schedule has no time to anneal
    away. A run gets at least 20 of these pulls (`every` shrinks for short
    runs), so that the average never lags far behind. Its state goes into the
    resume file."""

    def __init__(self, model, total_steps, every):
        self.model, self.total_steps = model, total_steps
        self.every = max(1, min(every, total_steps // 20))
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def step(self, step):
        """Call after optimizer step number `step` (counted from 1)."""
        if step % self.every and step < self.total_steps:
            return
        decay = 0.95 ** 5 * (step / self.total_steps) ** 3
        current = self.model.state_dict()
        for name, average in self.average.items():
            average.lerp_(current[name], 1 - decay)
            current[name].copy_(average)

    def state_dict(self):
        return self.average

    def load_state_dict(self, state):
        for name, average in self.average.items():
            average.copy_(state[name])


def linear_decay(step, total_steps, warmup, milestones):
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def step_decay(step, total_steps, warmup, milestones):
    return 0.1 ** sum(step >= round(m * total_steps) for m in milestones)


SCHEDULES = {"linear": linear_decay, "step": step_decay}  # name -> lr multiplier after the warm-up


def lr_multiplier(total_steps, warmup_fraction, schedule="linear", milestones=()):
    """LR multiplier per step: a linear warm-up over `warmup_fraction` of the
    steps (at least one), then the schedule: linear decay to zero, or x0.1 at
    each milestone (fractions of the steps)."""
    warmup = max(1, round(total_steps * warmup_fraction))
    after = SCHEDULES[schedule]

    def multiplier(step):
        return (step + 1) / warmup if step < warmup else after(step, total_steps, warmup, milestones)

    return multiplier


def autocast_for(device, amp):
    """A zero-argument context factory: bf16 autocast where asked and useful.

    'auto' turns bf16 on for CUDA and for CPUs with native bf16 (AVX512-BF16 or
    AMX); on other CPUs bf16 convolutions fall back to slow reference kernels."""
    if amp == "auto":
        if device.type == "cuda":
            enabled = torch.cuda.is_bf16_supported()
        else:
            enabled = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    else:
        enabled = amp == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled), enabled
