"""One stage being trained: what it is made of, and where it stands.

A Stage holds the network and objective of the teacher, the student or the
distilled student, what optimises them, the generator of the data order and
augmentation, and where its files go; the one loop of train.py trains every
stage, and only the objective differs. Progress says where a stage stands
(epoch, step, log, best weights, the running sums of an epoch stopped
part-way). Both give their state as plain dicts, which checkpoint.py writes
to <stage>.last.pt, and Stage.finished makes the content of <stage>.pt.
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import checkpoint
import config
import data
import distill
import models
import optim
import runtime
from distributed import ddp


@torch.no_grad()
def evaluate(model, images, labels, mean, std, tta=False, channels_last=True, batch_size=256):
    """Top-1 and top-5 accuracy of `model` on uint8 images, in float32 and in
    batches as predict.py runs it, so that the two agree on every machine
    (bf16 would move the reported accuracy with the CPU's kind). With tta,
    the softmax of each image and of its mirror are averaged. One host sync."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.int64, device=images.device)
    for start in range(0, len(labels), batch_size):
        batch = data.normalize(images[start : start + batch_size], mean, std, channels_last)
        probs = models.probabilities(model, batch, tta)
        hits = probs.topk(min(5, probs.shape[1]), dim=1).indices == labels[start : start + batch_size, None]
        correct += torch.stack([hits[:, 0].sum(), hits.any(1).sum()])
    model.train(was_training)
    top1, top5 = (hits / max(1, len(labels)) for hits in correct.tolist())
    return top1, top5


@dataclass
class Stage:
    """One stage being trained: its network and objective, what optimises
    them, and where its files go. The same loop trains every stage; only the
    objective differs (cross-entropy, or a distillation method against the
    frozen teacher)."""

    name: str
    model_name: str
    cfg: dict
    dataset: data.Data
    device: torch.device
    out_dir: Path
    teacher_digest: str | None  # which teacher.pt a distilled stage learns from
    epochs: int
    steps: int  # per epoch
    objective: torch.nn.Module
    forward: torch.nn.Module  # the objective as the step calls it: wrapped by DDP, compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    lookahead: optim.Lookahead | None
    generator: torch.Generator  # the data order and augmentation
    autocast: object  # a zero-argument context factory
    amp_on: bool

    @property
    def model(self):
        return self.objective.model

    def path(self, suffix=".pt"):
        return self.out_dir / f"{self.name}{suffix}"

    def evaluate(self, images, labels):
        """Top-1 and top-5 accuracy, in float32."""
        mean, std = self.dataset.mean, self.dataset.std
        return evaluate(self.model, images, labels, mean, std, self.cfg["TTA"], self.cfg["CHANNELS_LAST"])

    def state_dict(self):
        """What a resumed run needs besides the Progress: the settings, device
        and teacher it must match, and the state of the trainable part of the
        objective (not the frozen teacher), optimizer, scheduler, lookahead and
        random generators."""
        return {
            "stage": self.name,
            "config": checkpoint.json_safe(self.cfg),
            "device": self.device.type,
            "teacher": self.teacher_digest,
            "trainable": {k: v for k, v in self.objective.state_dict().items() if not k.startswith("teacher.")},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "lookahead": None if self.lookahead is None else self.lookahead.state_dict(),
            "rng": checkpoint.rng_states(self.generator),
        }

    def load_state_dict(self, state):
        """Load a state_dict() into the freshly built stage. RuntimeError when
        the weights no longer fit the objective."""
        self.objective.load_state_dict({**self.objective.state_dict(), **state["trainable"]})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        checkpoint.restore_rng_states(state["rng"], self.generator)

    def finished(self, state_dict, metrics, anchors=()):
        """The content of <stage>.pt: the weights and what it takes to use them
        (predict.py and export.py read it), the settings, the metrics, for the
        teacher its `anchors` (see anchor_epochs) and, for the distilled stage,
        the digest of the teacher file it learnt from."""
        cfg, dataset = self.cfg, self.dataset
        return {
            "stage": self.name,
            "dataset": cfg["DATASET"],
            "model": self.model_name,
            "num_classes": len(dataset.classes),
            "in_channels": dataset.in_channels,
            "image_size": dataset.image_size,
            "classes": list(dataset.classes),
            "mean": list(dataset.mean),
            "std": list(dataset.std),
            "tta": cfg["TTA"],
            "state_dict": state_dict,
            "config": checkpoint.json_safe(cfg),
            "metrics": metrics,
            "teacher_digest": self.teacher_digest,
            **({"anchors": list(anchors)} if self.name == "teacher" else {}),
        }


ANCHORS = 3  # weights the teacher keeps during its training, for route-constrained distillation (ROUTE)


def anchor_epochs(epochs):
    """The epochs of a teacher's training at whose end it keeps its weights:
    ANCHORS evenly spaced ones before the last (fewer in a short training)."""
    return sorted({math.ceil(k * epochs / (ANCHORS + 1)) for k in range(1, ANCHORS + 1)} - {epochs})


def build(name, cfg, dataset, device, out_dir, teacher=None, teacher_digest=None, route=()):
    """Stage `name`, freshly built: a new network (seeded with SEED), its objective, optimizer and generator;
    a distilled stage learns from `teacher`, along `route` (see distill.FrozenTeacher)."""
    index = config.STAGE_NAMES.index(name)
    epochs, steps = cfg["EPOCHS"][index], data.steps_per_epoch(dataset, cfg["BATCH_SIZE"])
    model_name = cfg["TEACHER"] if name == "teacher" else cfg["STUDENT"]
    objective = distill.build_objective(cfg, model_name, dataset, device, teacher, route)
    optimizer, scheduler, lookahead = optim.build(objective, cfg, cfg["LR"][index], epochs * steps)
    forward = torch.nn.parallel.DistributedDataParallel(objective) if ddp else objective
    autocast, amp_on = runtime.autocast(device, cfg["AMP"])
    return Stage(
        name,
        model_name,
        cfg,
        dataset,
        device,
        out_dir,
        teacher_digest,
        epochs,
        steps,
        objective,
        torch.compile(forward) if cfg["COMPILE"] else forward,
        optimizer,
        scheduler,
        lookahead,
        torch.Generator(device=device).manual_seed(cfg["SEED"]),
        autocast,
        amp_on,
    )


@dataclass
class EpochSums:
    """Running sums of the epoch in progress, kept on the device and read once
    at its end (no host sync per step)."""

    order: torch.Tensor  # this epoch's permutation of the training set
    loss_sum: torch.Tensor
    correct: torch.Tensor
    first_bad: torch.Tensor  # the first step whose loss was not finite; -1 while there is none
    code: dict  # the commit of the run that began the epoch
    seen: int = 0
    seconds: float = 0.0
    lr: float = 0.0  # the learning rate of the epoch's last step (the scheduler's next one ends at 0)

    def add(self, step, loss, logits, labels):
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)
        self.loss_sum += loss
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)


@dataclass
class Progress:
    """Where a stage stands. It goes to <stage>.last.pt after every epoch and
    when a signal stops training mid-epoch (then with the epoch's running
    sums), so that --resume goes on exactly where it stopped."""

    epoch: int = 1
    step: int = 0  # steps done in this epoch
    log: list = field(default_factory=list)  # one record per finished epoch
    best: dict = field(default_factory=lambda: {"acc": -1.0, "epoch": 0, "state": None})
    elapsed: float = 0.0  # seconds trained before this run started
    sums: EpochSums | None = None  # of a stage stopped mid-epoch
    anchors: list = field(default_factory=list)  # the teacher's weights at ANCHORS epochs: {"epoch", "state"}
    started: float = field(default_factory=time.perf_counter)

    def seconds(self):
        """Seconds trained so far, over every run of the stage."""
        return self.elapsed + time.perf_counter() - self.started

    def state_dict(self):
        return {
            "epoch": self.epoch,
            "step": self.step,
            "log": self.log,
            "best": self.best,
            "elapsed": self.seconds(),
            "sums": None if self.sums is None else vars(self.sums),
            "anchors": self.anchors,
        }

    @classmethod
    def from_state(cls, state):
        sums = None if state["sums"] is None else EpochSums(**state["sums"])
        return cls(state["epoch"], state["step"], state["log"], state["best"], state["elapsed"], sums,
                   state.get("anchors", []))  # fmt: skip


def collapse_warning(stage, epoch, train_acc, val_acc, num_classes, amp_on):
    """One line when validation accuracy is near chance while training accuracy
    is high (None otherwise): the network that evaluates is not the one that
    trains, and the best epoch, then the test accuracy, would quietly pay."""
    chance = 1 / num_classes
    if val_acc is None or val_acc > chance + 0.1 * (1 - chance) or train_acc < chance + 0.5 * (1 - chance):
        return None
    cause = (
        "the likely cause is bf16 mixed precision: start the stage over with --fresh --amp off, or try --threads 1"
        if amp_on
        else "its batch-norm statistics do not fit the validation images: check that they are prepared as the "
        "training images are"
    )
    return (f"warning: {stage} epoch {epoch}: validation accuracy {val_acc:.2%} is near chance ({chance:.0%}) while "
            f"training accuracy is {train_acc:.2%}; {cause}")  # fmt: skip
