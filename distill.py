"""Training objectives: plain cross-entropy, and distillation from a frozen teacher.

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

METHODS = {}  # name -> class(config, student, teacher), see Method


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
    def forward_features(self, images):
        return self.model.forward_features(images)

    def forward(self, images):
        return self.forward_features(images)["logits"]


def kd_loss(student_logits, teacher_logits, temperature):
    """Hinton et al. (2015): T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    KL is summed over classes and averaged over the batch, in float32 even
    under bf16 autocast. The T^2 factor keeps the gradient scale independent
    of the temperature."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature ** 2


class Method(nn.Module):
    """Base for distillation methods. `progress` (0 at the start of training,
    1 at the end) is set each epoch, for methods that warm up."""

    def __init__(self, config, student, teacher):
        super().__init__()
        self.label_smoothing = config["LABEL_SMOOTHING"]
        self.progress = 0.0

    def cross_entropy(self, logits, labels):
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def loss(self, student_out, teacher_out, labels):
        raise NotImplementedError


@register("kd")
class KD(Method):
    """loss = (1 - ALPHA) * CE(student, labels) + ALPHA * T^2 * KL(teacher || student).

    ALPHA weighs the distillation term (some repos weigh CE with alpha instead)."""

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        self.alpha = config["ALPHA"]
        self.temperature = config["TEMPERATURE"]

    def loss(self, student_out, teacher_out, labels):
        hard = self.cross_entropy(student_out["logits"], labels)
        soft = kd_loss(student_out["logits"], teacher_out["logits"], self.temperature)
        return (1 - self.alpha) * hard + self.alpha * soft


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
        self.method.progress = progress

    def forward(self, images, labels):
        teacher_out = self.teacher.forward_features(images)
        student_out = self.model.forward_features(images)
        return self.method.loss(student_out, teacher_out, labels), student_out["logits"]


def build_method(name, config, student, teacher):
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](config, student, teacher)
