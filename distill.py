"""Training objectives: plain cross-entropy, and distillation from a frozen
teacher with one of several methods.

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

import math

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
    """A trained network that only gives targets, in inference form.

    It runs `model` as models.fold_batch_norm gives it, each batch norm
    folded into its convolution (fewer passes over memory per step; the same
    outputs to float rounding). Its weights never require gradients, it
    stays in eval mode whatever `.train()` is called on it (so batch-norm
    statistics and dropout are those of inference), and it runs under
    no_grad (not inference_mode: the losses keep its outputs for the
    student's backward pass).

    `route`, the teacher's weights kept during its training (early to late),
    makes it teach route-constrained (Jin et al., ICCV 2019, "Knowledge
    distillation via route constrained optimization"): the student's training
    is cut into equal legs, one per set of weights and the final ones last,
    and each leg learns from the next set, so that the student follows the
    path the teacher took rather than aiming at its end from the start.
    `mirror` averages the teacher's logits over each image and its mirror, an
    ensemble of two views at the cost of a second forward pass."""

    def __init__(self, model, route=(), mirror=False):
        super().__init__()
        self.network = model.eval()  # as trained: the route's weights load into it
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)
        self.model = models.fold_batch_norm(self.network)
        final = [{k: v.detach().cpu().clone() for k, v in model.state_dict().items()}] if route else []
        self.route = [*route, *final]
        self.leg = len(self.route) - 1  # the set of weights the network holds now
        self.mirror = mirror

    def train(self, mode=True):
        super().train(False)
        return self

    def set_progress(self, progress):
        """Load the weights of the leg in which `progress` falls (the fraction of training done at the end of the
        current epoch; a boundary counts toward the earlier leg), when it changes. With fewer epochs than legs, the
        earliest legs are skipped, and the final weights always teach the last epoch."""
        if not self.route:
            return
        legs = len(self.route)
        leg = min(legs - 1, max(0, math.ceil(round(progress * legs, 6)) - 1))
        if leg != self.leg:
            self.network.load_state_dict(self.route[leg])
            folded = models.fold_batch_norm(self.network)
            try:  # into the same module, which a compiled or DDP-wrapped objective holds
                self.model.load_state_dict(folded.state_dict())
            except RuntimeError:  # these weights fold other layers (a norm's scale changed sign)
                self.model = folded
            self.leg = leg

    @torch.no_grad()
    def forward(self, images):
        """The teacher's outputs: the dict of models.Classifier.forward_features
        (with mirror, the logits of the two views averaged)."""
        if not self.mirror:
            return self.model.forward_features(images)
        out, n = self.model.forward_features(torch.cat([images, images.flip(3)])), len(images)
        return {"stages": [s[:n] for s in out["stages"]], "pooled": out["pooled"][:n],
                "logits": (out["logits"][:n] + out["logits"][n:]) / 2}  # fmt: skip


def kd_loss(student_logits, teacher_logits, temperature):
    """Hinton et al. (2015): T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    KL is summed over classes and averaged over the batch, in float32 even
    under bf16 autocast. The T^2 factor keeps the gradient scale independent
    of the temperature."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


class Method(nn.Module):
    """Base for distillation methods.

    Constructed from the config, the two networks and `sample`, a small batch
    of training images with which feature methods size their adapters.
    `progress`, the fraction of training done at the end of the current epoch
    (1/epochs in the first, 1 in the last), is set each epoch, for methods that
    warm up. It is a 0-d tensor, not a float, so that torch.compile does not
    recompile the loss when it changes."""

    uses_logits = True  # it learns from the teacher's logits (False: from its features alone)

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
    return tckd * temperature**2, nckd * temperature**2


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

    uses_logits = False

    def __init__(self, config, student, teacher, sample=None):
        super().__init__(config, student, teacher, sample)
        self.weight = config["FITNET_WEIGHT"]
        student_shapes, teacher_shapes = feature_shapes(student, sample), feature_shapes(teacher, sample)
        self.student_stage, self.teacher_stage = len(student_shapes) // 2, len(teacher_shapes) // 2
        (s_channels, *s_size), (t_channels, *t_size) = (
            student_shapes[self.student_stage],
            teacher_shapes[self.teacher_stage],
        )
        self.size = (min(s_size[0], t_size[0]), min(s_size[1], t_size[1]))
        self.adapter = nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels))

    def loss(self, student_out, teacher_out, labels):
        hint = match_size(self.adapter(student_out["stages"][self.student_stage]), self.size)
        target = match_size(teacher_out["stages"][self.teacher_stage], self.size)
        return self.cross_entropy(student_out["logits"], labels) + self.weight * F.mse_loss(
            hint.float(), target.float()
        )


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

    uses_logits = False

    def __init__(self, config, student, teacher, sample=None):
        super().__init__(config, student, teacher, sample)
        self.weight = config["AT_WEIGHT"]
        student_shapes, teacher_shapes = feature_shapes(student, sample), feature_shapes(teacher, sample)
        self.pairs = min(len(student_shapes), len(teacher_shapes))
        self.sizes = [
            (min(s[1], t[1]), min(s[2], t[2]))
            for s, t in zip(student_shapes[-self.pairs :], teacher_shapes[-self.pairs :])
        ]

    def loss(self, student_out, teacher_out, labels):
        transfer = sum(
            (attention_map(s, size) - attention_map(t, size)).pow(2).mean()
            for s, t, size in zip(
                student_out["stages"][-self.pairs :], teacher_out["stages"][-self.pairs :], self.sizes
            )
        )
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
        self.teacher.set_progress(progress)

    def forward(self, images, labels):
        teacher_out = self.teacher(images)
        student_out = self.model.forward_features(images)
        return self.method.loss(student_out, teacher_out, labels), student_out["logits"]


def build_method(name, config, student, teacher, sample=None):
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](config, student, teacher, sample)


def starts_from_teacher(cfg):
    """Whether the distilled student starts from the teacher's weights:
    STUDENT_INIT teacher, or auto where the student is a narrower or shallower
    version of the teacher (see models.select_weights)."""
    init = cfg["STUDENT_INIT"]
    return init == "teacher" or init == "auto" and models.selection_problem(cfg["STUDENT"], cfg["TEACHER"]) is None


def build_objective(cfg, model_name, dataset, device, teacher=None, route=()):
    """The objective of one stage, on `device`: a fresh `model_name` network
    (seeded with SEED and initialised from the training images), trained with
    cross-entropy, or against `teacher` with cfg's METHOD. A distilled student
    may start from the teacher's weights (STUDENT_INIT), and the teacher may
    follow `route`, the weights kept during its training (ROUTE), and see
    each image mirrored too (TEACHER_MIRROR); see FrozenTeacher. `dataset` (a
    data.Data) normalises its own images, so this module needs no data code."""
    torch.manual_seed(cfg["SEED"])
    memory_format = torch.channels_last if cfg["CHANNELS_LAST"] else torch.contiguous_format
    model = models.build(model_name, len(dataset.classes), dataset.in_channels, dropout=cfg["DROPOUT"])
    model = model.to(device, memory_format=memory_format)
    model.init_from_data(dataset.normalize(dataset.train_x[:5000], cfg["CHANNELS_LAST"]))
    if teacher is None:
        return Supervised(model, cfg["LABEL_SMOOTHING"])
    teacher = teacher.to(device, memory_format=memory_format)
    if starts_from_teacher(cfg):  # on a route, from where the route starts
        start = route[0] if cfg["ROUTE"] and route else teacher.state_dict()
        model.load_state_dict(models.select_weights(model.state_dict(), start))
    sample = dataset.normalize(dataset.train_x[:8], cfg["CHANNELS_LAST"])
    method = build_method(cfg["METHOD"], cfg, model, teacher, sample)
    frozen = FrozenTeacher(teacher, route if cfg["ROUTE"] else (), cfg["TEACHER_MIRROR"])
    return Distillation(model, frozen, method).to(device, memory_format=memory_format)
