"""Train a teacher, a small student alone, and the same student distilled from the
frozen teacher; then compare the three.

    python3 train.py                       # all three stages, defaults from config.py
    python3 train.py --stages distilled --method kd --temperature 2
    python3 train.py --help                # every constant of config.py as a flag
    torchrun --nproc-per-node 8 train.py   # one process per GPU (or --nnodes, for several machines)

Each stage writes OUT_DIR/<dataset>/<stage>.pt (checkpoint) and <stage>.jsonl
(one JSON line per epoch; <stage>.last.jsonl while it trains, so that a stage
retrained with --fresh keeps its finished log until it finishes again); the
run ends with results.md and results.json.
"""

import contextlib
import datetime
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import config
import data
import datafiles
import distill
import models
import optim
import pretrained
import report
import runtime

STAGES = config.STAGE_NAMES
# The code that trains: its commit as this process starts, recorded with the
# run and with each stage it trains (a commit made while it trains is not its code).
GIT_STATE = report.git_commit()  # (commit, dirty, digest of the uncommitted changes)
THIS_CODE = dict(zip(("git_commit", "git_dirty", "git_diff"), GIT_STATE))
UNKNOWN_CODE = dict.fromkeys(THIS_CODE)  # outside a checkout, or saved before records named it
# the code fields of a stage's metrics where its code is unknown: a brought teacher, or saved before metrics named it
UNKNOWN_STAGE_CODE = {**UNKNOWN_CODE, "earlier_code": None}

# ---------------------------------------------------------------- distributed (torchrun)
# torchrun starts one process per GPU (on one or several machines) and tells
# each its rank. Every process trains on its share of each batch and DDP
# averages the gradients, so BATCH_SIZE and LR mean the same whatever the
# number of processes; the master process alone evaluates, prints and writes.

ddp_rank = int(os.environ.get("RANK", 0))
ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
ddp = ddp_world_size > 1
master_process = ddp_rank == 0


def ddp_init(device):
    """Join the torchrun job, if there is one; returns this process's device."""
    if not ddp:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ddp_local_rank)
        torch.cuda.set_device(device)
    # the others wait for the master while it downloads or decodes the data: longer than NCCL's 10-minute default
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(hours=1),
        device_id=device if device.type == "cuda" else None,
    )
    return device


@contextlib.contextmanager
def in_turns():
    """Run the block (a download, a cache to build) first on the master, then on
    the first process of every other machine, then on the rest: each finds the
    files the ones before it wrote, where they share a folder."""
    turn = 0 if master_process else 1 if ddp_local_rank == 0 else 2
    for _ in range(turn if ddp else 0):
        torch.distributed.barrier()
    yield
    for _ in range(2 - turn if ddp else 0):
        torch.distributed.barrier()


def ddp_sum(sums):
    """An epoch's running sums over every process, in place; the first
    non-finite step is the earliest any process saw (DDP spreads a non-finite
    gradient to every process one step later)."""
    never = torch.iinfo(torch.int64).max
    seen = torch.tensor(sums.seen, device=sums.correct.device)
    first_bad = torch.where(sums.first_bad < 0, never, sums.first_bad)
    for tensor, op in ((sums.loss_sum, "SUM"), (sums.correct, "SUM"), (seen, "SUM"), (first_bad, "MIN")):
        torch.distributed.all_reduce(tensor, getattr(torch.distributed.ReduceOp, op))
    sums.first_bad = torch.where(first_bad == never, -1, first_bad)
    sums.loss_sum /= ddp_world_size
    sums.seen = int(seen)


def ddp_agreed_stop(device):
    """The signal that asked to stop, as every process hears it: a signal may
    reach the processes at different steps, so they agree at the end of each epoch."""
    if not ddp:
        return STOP["signal"]
    stop = torch.tensor(STOP["signal"] or 0, device=device)
    torch.distributed.all_reduce(stop, torch.distributed.ReduceOp.MAX)
    return int(stop) or None


# ---------------------------------------------------------------- interruption


class TrainingError(Exception):
    """Training cannot go on (the loss diverged, a checkpoint is in the way...)."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step. `saved` says whether
    the progress was saved (it is not when the loss had already diverged)."""

    def __init__(self, signum, saved=True):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved


# set by the signal handler, read by the training loop after every step. "held": what is finished before a
# signal is obeyed (None: nothing, it stops at once); "trained": whether a stage began training in this run;
# "retrain": the stages a --fresh run has still to retrain
STOP = {"signal": None, "held": None, "trained": False, "retrain": []}


def request_stop(signum, frame):
    """While a stage trains, stop it after the current step with its progress
    saved. A second signal, or one outside training (loading data, the
    compression report), stops at once: what is saved is kept either way, and
    datafiles.download_whole leaves no download cut short."""
    if STOP["signal"] is not None or STOP["held"] is None:
        STOP["signal"] = STOP["signal"] or signum
        raise KeyboardInterrupt
    STOP["signal"] = signum
    tqdm.write(f"\n{signal.Signals(signum).name}: {STOP['held']}, then stopping (send it again to stop at once)")


@contextlib.contextmanager
def signals_held(what, device):
    """Hold SIGINT and SIGTERM until the block ends (`what` says what it
    finishes), then stop if one came; the training loop within also stops
    at its own safe points."""
    STOP["held"] = what
    try:
        yield
    finally:
        STOP["held"] = None
    stop = ddp_agreed_stop(device)
    if stop is not None:
        raise Interrupted(stop)


def command(args):
    return shlex.join(["python3", Path(sys.argv[0]).name, *args]) + (
        " (through the same torchrun command)" if ddp else ""
    )


def resume_command(retrain=()):
    """This run's command with --resume (unfinished stages continue from their
    .last.pt); with `retrain`, only those stages, with --fresh as well: a
    --fresh run's stages retrained where their retraining stopped, not their
    old checkpoints kept."""
    args, value_of_stages = [], False
    for arg in sys.argv[1:]:
        if not (value_of_stages or arg in ("--resume", "--fresh") or retrain and arg.startswith("--stages")):
            args.append(arg)
        value_of_stages = bool(retrain) and arg == "--stages"
    return command([*args, *(["--stages", ",".join(retrain), "--fresh"] if retrain else []), "--resume"])


def how_to_go_on():
    """After a stop, what to run: --resume once a stage has trained in this
    run (see resume_command for a --fresh run); before that, the command as
    typed, which has done nothing yet."""
    if STOP["trained"]:
        return f"progress is saved. Continue with: {resume_command(STOP['retrain'])}"
    return f"nothing was trained yet. Run it again with: {command(sys.argv[1:])}"


# ---------------------------------------------------------------- one stage


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


def percent(fraction):
    """A fraction as a percentage, or 'n/a' when there is none (no validation split)."""
    return "n/a" if fraction is None else f"{fraction:.2%}"


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


def build_stage(name, cfg, dataset, device, out_dir, teacher=None, teacher_digest=None):
    index = STAGES.index(name)
    epochs, steps = cfg["EPOCHS"][index], data.steps_per_epoch(dataset, cfg["BATCH_SIZE"])
    model_name = cfg["TEACHER"] if name == "teacher" else cfg["STUDENT"]
    objective = distill.build_objective(cfg, model_name, dataset, device, teacher)
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
    seen: int = 0
    seconds: float = 0.0
    code: dict | None = None  # the commit of the run that began the epoch (None: saved before sums named it)

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
        }

    @classmethod
    def from_state(cls, state):
        sums = None if state["sums"] is None else EpochSums(**state["sums"])
        return cls(state["epoch"], state["step"], state["log"], state["best"], state["elapsed"], sums)


def save_progress(stage, progress):
    if master_process:
        checkpoint.save_progress(stage.path(".last.pt"), progress.state_dict(), stage)


def train_stage(name, cfg, dataset, device, out_dir, teacher=None, teacher_digest=None, resume=None):
    """Train one network (teacher, student, or distilled student) and save it;
    `resume` is the saved progress of an earlier run of it. Returns the
    stage's metrics on the master process, None on the others."""
    stage = build_stage(name, cfg, dataset, device, out_dir, teacher, teacher_digest)
    progress = Progress() if resume is None else restore(stage, resume)
    print(
        f"\n== {name}: {stage.model_name} ({models.count_params(stage.model):,} params) on {device}"
        f"{', bf16' if stage.amp_on else ''}, {stage.epochs} epochs of {stage.steps} steps, "
        f"{len(dataset.train_y):,} train / {len(dataset.val_y):,} val images"
        + (f"; resuming at epoch {progress.epoch}, step {progress.step}" if resume is not None else "")
    )
    bar = tqdm(
        total=stage.epochs * stage.steps,
        initial=(progress.epoch - 1) * stage.steps + progress.step,
        desc=name,
        unit="step",
        dynamic_ncols=True,
        leave=False,
        disable=None if master_process else True,
    )
    STOP["trained"] = True
    with signals_held(f"finishing the current {'epoch' if ddp else 'step'} and saving progress", device):
        while progress.epoch <= stage.epochs:  # a torchrun job stops between epochs, a single process after a step
            sums = train_epoch(stage, progress, bar)
            end_epoch(stage, progress, sums, bar)
            stop = ddp_agreed_stop(device)
            if stop is not None:
                bar.close()
                raise Interrupted(stop)
        bar.close()
        metrics = finish_stage(stage, progress)  # a signal while it is tested and saved stops the run once saved
        STOP["retrain"] = [s for s in STOP["retrain"] if s != name]
        return metrics


def restore(stage, state):
    """The Progress of a resumed stage, its training state loaded into `stage`."""
    try:
        checkpoint.restore_progress(state, stage)
    except RuntimeError:
        raise TrainingError(
            f"{stage.path('.last.pt')}: its weights do not fit {stage.model_name} as this version "
            f"of models.py builds it; pass --fresh to start the stage over",
            exit_code=2,
        ) from None
    return Progress.from_state(state["progress"])


def start_epoch(stage, progress):
    """The running sums of the epoch about to run: fresh ones with a new order,
    or those of the epoch a resumed run stopped in."""
    if progress.step > 0:
        sums = EpochSums(**{k: v.to(stage.device) if torch.is_tensor(v) else v for k, v in vars(progress.sums).items()})
        if not master_process:  # the sums so far are counted once, by the master
            sums.loss_sum, sums.correct, sums.seen = sums.loss_sum.zero_(), sums.correct.zero_(), 0
        return sums
    device = stage.device
    order = torch.randperm(len(stage.dataset.train_y), device=device, generator=stage.generator)
    if ddp:  # one order for the whole job, even where GPUs of another kind would draw another
        torch.distributed.broadcast(order, 0)
    return EpochSums(
        order,
        torch.zeros((), device=device),
        torch.zeros((), dtype=torch.int64, device=device),
        torch.full((), -1, device=device),
        code=THIS_CODE,
    )


def train_epoch(stage, progress, bar):
    """Train one epoch, or the rest of one; returns its running sums."""
    cfg, epoch_start = stage.cfg, time.perf_counter()
    sums = start_epoch(stage, progress)
    if ddp:  # each process its own dropout masks, the same again when the job resumes at this epoch
        torch.manual_seed(cfg["SEED"] + 1000 * progress.epoch + ddp_rank)
    stage.objective.train()
    stage.objective.set_progress(progress.epoch / stage.epochs)  # the fraction of training done when this epoch ends
    flip = cfg["FLIP"]
    if cfg["FLIP"] and cfg["ALTERNATE_FLIP"]:
        flip = data.alternating_flips(len(stage.dataset.train_y), progress.epoch, cfg["SEED"], stage.device)
    batches = data.train_batches(
        stage.dataset,
        sums.order,
        cfg["BATCH_SIZE"],
        cfg["CROP_PADDING"],
        flip,
        stage.generator,
        cfg["CHANNELS_LAST"],
        start=progress.step,
        shard=(ddp_rank, ddp_world_size),
    )
    for images, labels in batches:
        with stage.autocast():
            loss, logits = stage.forward(images, labels)
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stage.optimizer.step()
        stage.scheduler.step()
        sums.add(progress.step, loss.detach(), logits, labels)
        progress.step += 1
        if stage.lookahead is not None:
            stage.lookahead.step((progress.epoch - 1) * stage.steps + progress.step)
        bar.update()
        if STOP["signal"] is not None and progress.step < stage.steps and not ddp:  # a job stops at the epoch's end
            sums.seconds += time.perf_counter() - epoch_start
            stop_mid_epoch(stage, progress, sums, bar)
    sums.seconds += time.perf_counter() - epoch_start
    return sums


def stop_mid_epoch(stage, progress, sums, bar):
    """Save the progress (unless the loss has diverged: never save a diverged
    state over a good one) and stop."""
    healthy = int(sums.first_bad) < 0
    if healthy:
        progress.sums = sums
        save_progress(stage, progress)
    bar.close()
    raise Interrupted(STOP["signal"], saved=healthy)


def end_epoch(stage, progress, sums, bar):
    """Check the loss, validate, log, keep the best weights and save the progress."""
    if ddp:
        ddp_sum(sums)
    first_bad = int(sums.first_bad)
    if first_bad >= 0:
        bar.close()
        last = stage.path(".last.pt")
        raise TrainingError(
            f"{stage.name}: the loss became non-finite in epoch {progress.epoch}, step "
            f"{first_bad + 1} of {stage.steps}; start it over with --fresh and a lower --lr (now "
            f"{stage.optimizer.defaults['lr']}), or turn off mixed precision with --amp off"
            + (f"; the last good epoch is kept in {last}" if last.exists() else "")
        )
    train_loss = sums.loss_sum.item() / stage.steps
    dataset = stage.dataset
    val_acc = stage.evaluate(dataset.val_x, dataset.val_y)[0] if len(dataset.val_y) and master_process else None
    record = {
        "epoch": progress.epoch,
        "loss": round(train_loss, 5),
        "train_acc": round(sums.correct.item() / sums.seen, 5),
        "val_acc": None if val_acc is None else round(val_acc, 5),
        "lr": stage.scheduler.get_last_lr()[0],
        "images": sums.seen,
        "seconds": round(sums.seconds, 2),
        **THIS_CODE,  # a resumed stage may have epochs from other code
    }
    if code_of(sums.code) != THIS_CODE:  # stopped part-way by other code, and resumed by this
        record["begun_by"] = sums.code
    progress.log.append(record)
    if master_process:
        checkpoint.write_text(stage.path(".last.jsonl"), log_text(progress.log))
    if master_process and (val_acc is None or val_acc > progress.best["acc"]):  # no validation split: the last epoch
        state = {k: v.detach().cpu().clone() for k, v in stage.model.state_dict().items()}
        progress.best = {"acc": val_acc, "epoch": progress.epoch, "state": state}
    bar.write(
        f"{stage.name} epoch {progress.epoch:3d}/{stage.epochs}  loss {train_loss:.4f}  train "
        f"{record['train_acc']:.2%}  val {percent(val_acc)}  lr {record['lr']:.2e}  {record['seconds']:.1f}s"
    )
    progress.epoch, progress.step, progress.sums = progress.epoch + 1, 0, None
    save_progress(stage, progress)


def finish_stage(stage, progress):
    """Test the best epoch's weights and save the checkpoint."""
    train_seconds = progress.seconds()
    if not master_process:  # the master tests and saves the model; the others wait until it has
        torch.distributed.barrier()
        return None
    model, dataset, cfg = stage.model, stage.dataset, stage.cfg
    model.load_state_dict(progress.best["state"])
    test_acc, test_top5 = stage.evaluate(dataset.test_x, dataset.test_y)
    metrics = {
        "model": stage.model_name,
        "params": models.count_params(model),
        "test_acc": test_acc,
        "test_top5": test_top5,
        "best_val_acc": progress.best["acc"],
        "best_epoch": progress.best["epoch"],
        "epochs": stage.epochs,
        "train_seconds": round(train_seconds, 1),
        "device": str(stage.device),
        "tta": cfg["TTA"],
        "method": cfg["METHOD"] if stage.name == "distilled" else "cross-entropy",
        "data": datafiles.origin(dataset.source),
        **THIS_CODE,
        "earlier_code": earlier_code(progress.log),
    }
    checkpoint.save(stage.path(), stage.name, cfg, dataset, stage.model_name, progress.best["state"], metrics,
                    stage.teacher_digest)  # fmt: skip
    checkpoint.write_text(stage.path(".jsonl"), log_text(progress.log))  # the log of the stage as saved
    stage.path(".last.jsonl").unlink(missing_ok=True)
    stage.path(".last.pt").unlink(missing_ok=True)
    print(
        f"{stage.name}: test accuracy {test_acc:.2%} (best epoch {progress.best['epoch']}, val "
        f"{percent(progress.best['acc'])}), {train_seconds:.0f}s, saved {stage.path()}"
    )
    if ddp:
        torch.distributed.barrier()
    return metrics


def log_text(log):
    return "".join(json.dumps(record) + "\n" for record in log)


def code_of(record):
    """The code that a log record or an epoch's sums name, with None for what
    older ones do not say (all of it for None)."""
    return {key: (record or {}).get(key) for key in UNKNOWN_CODE}


def earlier_code(log):
    """Runs of consecutive epochs of a resumed stage trained by code other than
    this run's, as [{git_commit, git_dirty, git_diff, first_epoch, last_epoch}].
    An epoch stopped part-way counts for the code on either side of the stop.
    Records logged before they named their code count as commit None, and
    before they named their uncommitted changes' digest, as digest None."""
    epochs = []  # (epoch, code), in training order
    for record in log:
        if "begun_by" in record:
            epochs.append((record["epoch"], code_of(record["begun_by"])))
        epochs.append((record["epoch"], code_of(record)))
    runs = []
    for epoch, code in epochs:
        if runs and runs[-1][0] == code:
            runs[-1][2] = epoch
        else:
            runs.append([code, epoch, epoch])
    return [{**code, "first_epoch": first, "last_epoch": last} for code, first, last in runs if code != THIS_CODE]


# ---------------------------------------------------------------- the pipeline


def load_finished(out_dir, stage, cfg, dataset, teacher_digest=None):
    """The checkpoint of a finished stage (None when there is none), and what
    differs between the settings that made it and this run's (a stage may be
    reused only when nothing does). For the distilled stage, the teacher is
    part of its settings: `teacher_digest` is that of the teacher.pt it would
    be distilled from now (None: the teacher is retrained)."""
    path = out_dir / f"{stage}.pt"
    if not path.exists():
        return None, []
    try:
        saved = checkpoint.load(path)
    except ValueError as error:
        fix = "" if isinstance(error, checkpoint.Unreadable) else "; delete it or pass --fresh to retrain"
        raise TrainingError(f"{path}: {error}{fix}") from None
    if "metrics" not in saved:
        raise TrainingError(f"{path} is not a finished stage of train.py (no metrics); pass --fresh to retrain it")
    changed = config.differences(saved["config"], cfg, stage)
    if saved["classes"] != dataset.classes:
        changed.append("the dataset's classes")
    if stage == "distilled" and saved.get("teacher_digest") != teacher_digest:
        changed.append("the teacher (another teacher.pt)")
    return saved, changed


def kept_metrics(saved):
    """The metrics of a finished stage reused by this run, in this code's
    layout: older checkpoints lack the code fields, and carry a CPU speed
    measured with the stage that the compression report now measures instead."""
    metrics = {**UNKNOWN_STAGE_CODE, **saved["metrics"]}
    return {key: value for key, value in metrics.items() if key not in ("cpu_latency_ms", "cpu_throughput")}


def load_unfinished(out_dir, stage, cfg, device, teacher_digest=None):
    """The saved progress of an unfinished stage (its .last.pt), or None.

    It is used only with --resume (also with --fresh: a retrain stopped
    part-way), and must come from the same settings (and the same teacher,
    see load_finished); with --fresh alone it is ignored and later
    overwritten; otherwise it stops the run, so that no progress is lost by
    accident."""
    path = out_dir / f"{stage}.last.pt"
    if not path.exists() and cfg["RESUME"]:
        print(f"nothing to resume for {stage} (no {path}); training it from the start")
    if not path.exists() or cfg["FRESH"] and not cfg["RESUME"]:
        return None
    if not cfg["RESUME"]:
        raise TrainingError(
            f"{path} holds an unfinished {stage} run; continue it with: {resume_command()}  "
            f"(or pass --fresh to start the stage over)",
            exit_code=2,
        )
    over = "leave out --resume to start it over" if cfg["FRESH"] else "pass --fresh"
    try:
        state = checkpoint.load_progress(path)
    except ValueError as error:
        fix = "" if isinstance(error, checkpoint.Unreadable) else f"; delete it or {over}"
        raise TrainingError(f"{path}: {error}{fix}", exit_code=2) from None
    changed = config.differences(state["config"], cfg, stage)
    if stage == "distilled" and state["teacher"] != teacher_digest:
        changed.append("the teacher (another teacher.pt)")
    if changed:
        raise TrainingError(f"{path} was started with other settings ({'; '.join(changed)}); resume with those, "
                            f"or {over}", exit_code=2)  # fmt: skip
    if state["device"] != device.type:  # the data generator's state belongs to its device
        raise TrainingError(
            f"{path} was started on {state['device']}; resume it with --device {state['device']}, or {over}",
            exit_code=2,
        )
    return state


def saved_teacher(out_dir, saved):
    """The network of the teacher saved in out_dir, and the digest of its file."""
    path = out_dir / "teacher.pt"
    try:
        return checkpoint.build_model(saved), checkpoint.file_digest(path)
    except ValueError as error:
        raise TrainingError(f"{path}: {error}; pass --fresh to retrain the teacher") from None


def results_table(rows, num_classes):
    """The stages side by side (with top-5 accuracy for more than 10 classes), then the distillation's gain."""
    top5 = num_classes > 10
    lines = [
        f"| stage | model | method | params | test accuracy |{' top-5 |' if top5 else ''} train time |",
        f"|---|---|---|---:|---:|{'---:|' if top5 else ''}---:|",
    ]
    for stage, m in rows.items():
        top5_cell = f" {m['test_top5']:.2%} |" if top5 else ""
        trained = "not trained here" if m["train_seconds"] is None else f"{m['train_seconds']:.0f} s"
        lines.append(
            f"| {stage} | {m['model']} | {m['method']} | {m['params']:,} | {m['test_acc']:.2%} |{top5_cell} {trained} |"
        )
    gain = distillation_gain(rows)
    if gain is not None:
        lines.append(f"\nDistillation gain: {gain:+.2f} points of test accuracy (distilled against student alone).")
    return "\n".join(lines) + "\n"


def distillation_gain(rows):
    """Test accuracy points the distilled student gains over the student alone, or None without both."""
    if "student" in rows and "distilled" in rows:
        return round(100 * (rows["distilled"]["test_acc"] - rows["student"]["test_acc"]), 2)
    return None


def set_up(cfg):
    """Check the settings that need no data, join the torchrun job and set up
    the device; returns the device and the output folder."""
    device = ddp_init(runtime.device(cfg["DEVICE"]))
    if cfg["BATCH_SIZE"] % ddp_world_size:  # DDP averages the processes' gradients with equal weights
        config.fail(
            "batch-size",
            f"{cfg['BATCH_SIZE']} does not split evenly over the {ddp_world_size} processes "
            f"of this torchrun job; give a multiple of {ddp_world_size}",
        )
    if not master_process:  # one process of a torchrun job speaks for all
        sys.stdout = open(os.devnull, "w")
    if cfg["THREADS"]:
        torch.set_num_threads(cfg["THREADS"])
    out_dir = Path(cfg["OUT_DIR"]) / cfg["DATASET"]
    if reason := checkpoint.unwritable(out_dir):  # fail now, not after an hour of training
        config.fail("out-dir", f"cannot write to {out_dir} ({reason}); choose a writable --out-dir")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg["DETERMINISTIC"]:
        runtime.make_deterministic()
    return device, out_dir


def load_data(cfg, device, out_dir):
    if Path(cfg["DATA_DIR"]).is_file():
        config.fail("data-dir", f"{cfg['DATA_DIR']} is a file, but the flag takes a folder: for {cfg['DATASET']} "
                    f"it looks there for {datafiles.expected_contents(cfg['DATASET'])}")  # fmt: skip
    # The bundled CIFAR-10 and the system Fashion-MNIST stand in for the default folder alone: a folder the
    # user names is meant to hold the data or to receive its download, and one that does not exist is most
    # likely a typo, refused here unless something will be downloaded into it.
    folder, default = cfg["DATA_DIR"], Path(cfg["DATA_DIR"]) == Path(config.DATA_DIR)
    if not Path(folder).is_dir():
        if cfg["DATASET"] == "folder":
            config.fail("data-dir", f"{folder} does not exist; point it at the image tree of --dataset folder")
        if not cfg["DOWNLOAD"] and (cfg["DATASET"] == "cifar100" or not default):
            config.fail("data-dir", f"{folder} does not exist; point it at the {cfg['DATASET']} data, or pass "
                        f"--download to download it into {folder}")  # fmt: skip
    with in_turns():
        dataset = data.load(
            cfg["DATASET"],
            cfg["DATA_DIR"],
            cache_dirs=[out_dir],
            image_size=cfg["IMAGE_SIZE"],
            val_size=cfg["VAL_SIZE"],
            seed=cfg["SEED"],
            device=device,
            download=cfg["DOWNLOAD"],
            fallback=default,
        )
    print(
        f"data: {cfg['DATASET']} from {dataset.source}: {len(dataset.classes)} classes, "
        f"{dataset.in_channels}x{dataset.image_size}x{dataset.image_size}, {len(dataset.train_y):,} train, "
        f"{len(dataset.val_y):,} val, {len(dataset.test_y):,} test"
    )
    if cfg["CROP_PADDING"] >= min(dataset.train_x.shape[-2:]):  # reflection cannot reach further than the image
        config.fail(
            "crop-padding",
            f"{cfg['CROP_PADDING']} pixels is not less than the {dataset.image_size}-pixel "
            f"images; give a smaller value (0 turns translation off)",
        )
    return dataset


def plan(cfg, dataset, device, out_dir):
    """What to run: the stages to train (each with its saved progress, or
    None), the finished checkpoints to reuse, and the saved stages left out
    with what differs. A saved stage whose settings differ from this run's is
    never reused: it stops the run when it is asked for (or needed as the
    teacher), and is left out of the results otherwise."""
    brought = cfg["TEACHER_CHECKPOINT"]  # a teacher brought along is not trained
    if brought and not Path(brought).is_file():
        config.fail("teacher-checkpoint", f"{brought}: no such file; give the path of a teacher checkpoint")
    stages = [s for s in STAGES if not (brought and s == "teacher")]
    requested = [s for s in stages if s in cfg["STAGES"].split(",")]
    finished, stale = {}, {}
    teacher_file = Path(brought) if brought else out_dir / "teacher.pt"
    for stage in stages:
        if cfg["FRESH"] and stage in requested:
            continue
        digest = checkpoint.file_digest(teacher_file) if brought or "teacher" in finished else None
        saved, changed = load_finished(out_dir, stage, cfg, dataset, digest)
        if saved is not None:
            (stale if changed else finished)[stage] = changed or saved
    needs_teacher = "distilled" in requested and "distilled" not in finished and not brought
    if needs_teacher and "teacher" not in [*finished, *requested]:
        if "teacher" not in stale:
            print("distilled needs a teacher and none is saved: training the teacher first")
        requested.insert(0, "teacher")
    for stage in STAGES:
        path = out_dir / f"{stage}.pt"
        if stage in stale and stage in requested and not cfg["FRESH"]:  # with --fresh it is retrained
            raise TrainingError(f"{path} was made with other settings ({'; '.join(stale[stage])}); pass --fresh to "
                                f"retrain it, or choose another --out-dir", exit_code=2)  # fmt: skip
        if stage in stale and stage in requested:  # with --fresh (a teacher the distilled stage needs)
            print(f"{stage}: {path} was made with other settings; retraining it (--fresh)")
        elif stage in stale:
            print(f"{stage}: {path} was made with other settings; left out of the results")
        elif stage in finished and stage in requested:
            print(f"{stage}: {path} exists (test accuracy {finished[stage]['metrics']['test_acc']:.2%}); "
                  f"skipping it (--fresh retrains)")  # fmt: skip
    teacher_digest = checkpoint.file_digest(teacher_file) if brought or "teacher" in finished else None
    todo = {stage: load_unfinished(out_dir, stage, cfg, device, teacher_digest if stage == "distilled" else None)
            for stage in requested if stage not in finished}  # fmt: skip
    return todo, finished, {stage: changed for stage, changed in stale.items() if stage not in todo}


def data_sources(rows):
    """Where the stages' data came from, for results.md: one source, or one per
    stage when they differ (a stage kept from a run on another copy of the data)."""
    sources = {stage: m["data"] for stage, m in rows.items()}
    if len(set(sources.values())) == 1:
        return f"data: {next(iter(sources.values()))}\n"
    return "data: " + "; ".join(f"{stage} from {source}" for stage, source in sources.items()) + "\n"


def provenance_lines(rows):
    """For results.md: the stages kept from earlier runs, each with the commit
    that trained it (which may not be this run's code), and the stages resumed
    under other code than the code that finished them; or ""."""

    def code(m):
        return report.commit_text(m["git_commit"], m["git_dirty"], m["git_diff"])

    def epochs(m):
        return ", ".join(f"{r['first_epoch']}-{r['last_epoch']} at {code(r)}" for r in m["earlier_code"])

    kept = [f"{stage} (trained at {code(m)})" for stage, m in rows.items() if m["kept"]]
    resumed = [f"{stage} (epochs {epochs(m)}, the rest at {code(m)})" for stage, m in rows.items() if m["earlier_code"]]
    return (f"kept from earlier runs: {', '.join(kept)}\n" if kept else "") + (
        f"resumed under other code: {', '.join(resumed)}\n" if resumed else ""
    )


def left_out_line(left_out):
    """For results.md: the saved stages that the table leaves out, being of
    other settings, with what differs; or ""."""
    stages = "; ".join(f"{stage}.pt ({', '.join(changed)})" for stage, changed in left_out.items())
    return f"left out, saved with other settings: {stages}\n" if stages else ""


def brought_teacher(cfg, dataset, device):
    """The teacher of --teacher-checkpoint, its file's digest and its metrics
    (test accuracy measured here, by the master process alone: the others get
    None), or a one-line error for a file that is not a teacher checkpoint or
    whose weights do not fit --teacher."""
    path = cfg["TEACHER_CHECKPOINT"]
    try:
        model, kind = pretrained.load_teacher(path, cfg["TEACHER"], dataset.classes, dataset.in_channels)
    except ValueError as error:
        raise TrainingError(f"argument --teacher-checkpoint: {path}: {error}", exit_code=2) from None
    model = model.to(device, memory_format=torch.channels_last if cfg["CHANNELS_LAST"] else torch.contiguous_format)
    if not master_process:  # only the master reports; the others need the network and its digest
        return model, checkpoint.file_digest(path), None
    test_acc, test_top5 = evaluate(model, dataset.test_x, dataset.test_y, dataset.mean, dataset.std, cfg["TTA"],
                                   cfg["CHANNELS_LAST"])  # fmt: skip
    params = models.count_params(model)
    print(f"teacher: {cfg['TEACHER']} ({params:,} params) from {path} ({kind}), not trained by this run: "
          f"test accuracy {test_acc:.2%}")  # fmt: skip
    metrics = {"model": cfg["TEACHER"], "params": params, "test_acc": test_acc, "test_top5": test_top5,
               "best_val_acc": None, "best_epoch": None, "epochs": 0, "train_seconds": None, "device": str(device),
               "tta": cfg["TTA"], "method": "brought", "data": str(path), "checkpoint": str(path),
               **UNKNOWN_STAGE_CODE}  # fmt: skip
    return model, checkpoint.file_digest(path), metrics


def write_results(cfg, results, kept, left_out, out_dir, dataset, run, teacher):
    """results.md and results.json: the stages side by side (`kept`: those
    reused from earlier runs; `left_out`: saved stages of other settings, with
    what differs, named so that a row missing from the table is explained),
    the distillation's gain, the compression report, the curves and `run`
    (report.run_info)."""
    rows = {stage: {**results[stage], "kept": stage in kept} for stage in STAGES if stage in results}
    table = results_table(rows, len(dataset.classes))
    sources = data_sources(rows) + provenance_lines(rows) + left_out_line(left_out)
    print(f"\nresults ({cfg['DATASET']}, test accuracy{' with flip TTA' if cfg['TTA'] else ''}):\n{table}\n"
          f"{sources}")  # fmt: skip
    summary = {"dataset": cfg["DATASET"], "stages": rows, "distillation_gain": distillation_gain(rows),
               "left_out": left_out, "run": run}  # fmt: skip
    brought = cfg["TEACHER_CHECKPOINT"]
    files = {stage: Path(brought) if stage == "teacher" and brought else out_dir / f"{stage}.pt" for stage in rows}
    report.write_results(out_dir, cfg["DATASET"], f"{table}\n{sources}", summary, files,
                         dataset.in_channels, dataset.image_size, {"teacher": teacher} if brought else {})  # fmt: skip


def main(argv=None):
    cfg = config.parse(argv, description=__doc__.split("\n\n")[0])
    device, out_dir = set_up(cfg)
    run = report.run_info(cfg["SEED"], device, runtime.autocast(device, cfg["AMP"])[1], GIT_STATE)
    dataset = load_data(cfg, device, out_dir)
    todo, finished, left_out = plan(cfg, dataset, device, out_dir)
    results = {stage: kept_metrics(saved) for stage, saved in finished.items()}
    teacher = digest = None
    if cfg["TEACHER_CHECKPOINT"]:
        teacher, digest, results["teacher"] = brought_teacher(cfg, dataset, device)
    elif "distilled" in todo and "teacher" in finished:  # check the saved teacher now, not after the other stages
        teacher, digest = saved_teacher(out_dir, finished["teacher"])
    STOP["retrain"] = list(todo) if cfg["FRESH"] else []
    for stage, resume in todo.items():
        distilled = stage == "distilled"
        try:
            results[stage] = train_stage(stage, cfg, dataset, device, out_dir, teacher if distilled else None,
                                         digest if distilled else None, resume)  # fmt: skip
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"{stage}: out of GPU memory with --batch-size {cfg['BATCH_SIZE']}; try a smaller --batch-size"
            ) from None
        if stage == "teacher":  # distil from the teacher as saved (in a torchrun job, every process reads it)
            teacher, digest = saved_teacher(out_dir, checkpoint.load(out_dir / "teacher.pt"))
        if master_process:
            report.draw_curves(out_dir, [s for s in STAGES if s in results])
    if master_process:
        report.draw_curves(out_dir, [s for s in STAGES if s in results])
        write_results(cfg, results, finished, left_out, out_dir, dataset, run, teacher)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    prog = Path(sys.argv[0]).name
    try:
        main()
    except Interrupted as stop:
        saved = (
            how_to_go_on()
            if stop.saved
            else "the loss had diverged, so nothing was saved over earlier progress; start the stage over with "
            "--fresh and a lower --lr"
        )
        if master_process:  # in a torchrun job, the master tells the user how to go on
            sys.stderr.write(f"{prog}: stopped by {stop}; {saved}\n")
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:  # see request_stop; a .last.pt is from the end of an epoch or earlier
        signum = STOP["signal"] or signal.SIGINT
        if master_process:
            sys.stderr.write(f"{prog}: stopped at once by {signal.Signals(signum).name}; {how_to_go_on()}\n")
        sys.exit(128 + signum)
    except (datafiles.DataError, TrainingError) as error:
        sys.stderr.write(f"{prog}: error: {error}\n")
        sys.exit(getattr(error, "exit_code", 1))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
