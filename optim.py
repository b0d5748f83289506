"""How a stage's parameters are optimised: the optimiser, the learning-rate
schedule (stepped per batch) and airbench's lookahead of the weights."""

import torch
from torch import nn


def sgd(params, lr, cfg):
    return torch.optim.SGD(params, lr=lr, momentum=cfg["MOMENTUM"], nesterov=True)


def adamw(params, lr, cfg):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg["ADAM_BETAS"]))


OPTIMIZERS = {"sgd": sgd, "adamw": adamw}  # name -> constructor(param groups, lr, config)


def make_optimizer(objective, cfg, lr):
    """The optimizer over every trainable parameter of the objective (the
    student and any adapters of the method), without weight decay on biases
    and norm parameters. The shift of a norm whose scale is fixed (as in
    AirNet) learns BIAS_LR_SCALE times faster, as in airbench: those shifts are
    the only thing such a norm learns, and they move far too slowly at the
    weights' rate."""
    trainable = [p for p in objective.parameters() if p.requires_grad]
    shifts = {
        id(m.bias)
        for m in objective.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.affine and not m.weight.requires_grad
    }
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": cfg["WEIGHT_DECAY"]},
        {"params": [p for p in trainable if p.ndim <= 1 and id(p) not in shifts], "weight_decay": 0.0},
        {"params": [p for p in trainable if id(p) in shifts], "weight_decay": 0.0, "lr": lr * cfg["BIAS_LR_SCALE"]},
    ]
    return OPTIMIZERS[cfg["OPTIMIZER"]]([group for group in groups if group["params"]], lr, cfg)


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


class Lookahead:
    """Airbench's lookahead: every 5,120 images, and after the last step, the
    model's weights (and batch-norm statistics) move to an exponential moving
    average of themselves, whose decay rises from 0 to 0.95^5 as progress^3,
    so the model ends as that average. Late in training this averages out the
    noise of the last steps, which a short schedule has no time to anneal
    away. A run gets at least 20 of these pulls (the interval shrinks for short
    runs), so that the average never lags far behind."""

    def __init__(self, model, total_steps, batch_size):
        self.model, self.total_steps = model, total_steps
        self.every = max(1, min(round(5120 / batch_size), total_steps // 20))  # airbench: 5 steps of 1,024
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def step(self, step):
        """Call after optimizer step number `step` (counted from 1)."""
        if step % self.every and step < self.total_steps:
            return
        decay = 0.95**5 * (step / self.total_steps) ** 3
        current = self.model.state_dict()
        for name, average in self.average.items():
            average.lerp_(current[name], 1 - decay)
            current[name].copy_(average)

    def state_dict(self):
        return self.average

    def load_state_dict(self, state):
        for name, average in self.average.items():
            average.copy_(state[name])


def build(objective, cfg, lr, total_steps):
    """The optimizer, its per-step LR scheduler and the lookahead (None when
    LOOKAHEAD is off) of a stage of `total_steps` steps."""
    optimizer = make_optimizer(objective, cfg, lr)
    schedule = lr_multiplier(total_steps, cfg["WARMUP"], cfg["LR_SCHEDULE"], cfg["LR_MILESTONES"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    lookahead = Lookahead(objective.model, total_steps, cfg["BATCH_SIZE"]) if cfg["LOOKAHEAD"] else None
    return optimizer, scheduler, lookahead
