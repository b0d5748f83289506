"""Train a teacher, a small student alone, and the same student distilled from the
frozen teacher; then compare the three.

    python3 train.py                       # all three stages, defaults from config.py
    python3 train.py --stages distilled --method kd --temperature 2
    python3 train.py --help                # every constant of config.py as a flag
    torchrun --nproc-per-node 8 train.py   # one process per GPU (or --nnodes, for several machines)

Each stage writes OUT_DIR/<dataset>/<stage>.pt (checkpoint) and <stage>.jsonl
(one JSON line per epoch); the run ends with results.md and results.json.
"""

import contextlib
import datetime
import hashlib
import json
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import distill
import models

STAGES = ("teacher", "student", "distilled")


# ---------------------------------------------------------------- small helpers

def save_text(path, text):
    data.atomic_write(path, lambda p: p.write_text(text))


@torch.no_grad()
def evaluate(model, images, labels, mean, std, batch_size=1024, tta=False, autocast=contextlib.nullcontext,
             channels_last=True):
    """Top-1 accuracy of `model` on uint8 images. With tta, the softmax of each
    image and of its mirror are averaged. One host sync, at the end."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for start in range(0, len(labels), batch_size):
        batch = data.normalize(images[start:start + batch_size], mean, std, channels_last)
        with autocast():
            probs = models.probabilities(model, batch, tta)
        correct += (probs.argmax(1) == labels[start:start + batch_size]).sum()
    model.train(was_training)
    return correct.item() / max(1, len(labels))


def percent(fraction):
    """A fraction as a percentage, or 'n/a' when there is none (no validation split)."""
    return "n/a" if fraction is None else f"{fraction:.2%}"


def stage_path(out_dir, stage, suffix=".pt"):
    return Path(out_dir) / f"{stage}{suffix}"


# ---------------------------------------------------------------- interruption and resume

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


STOP = {"signal": None}  # set by the signal handler, read by the training loop after every step


def request_stop(signum, frame):
    if STOP["signal"] is not None:  # a second signal: stop now
        raise KeyboardInterrupt
    STOP["signal"] = signum
    unit = "epoch" if job_size() > 1 else "step"  # a torchrun job stops between epochs
    tqdm.write(f"\n{signal.Signals(signum).name}: finishing the current {unit}, then saving progress "
               f"(send it again to stop at once)")


def rng_states(generator):
    """Every random state that training draws from, in a weights_only-safe form."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, gauss],
            "torch": torch.get_rng_state(), "data": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states, generator):
    random.setstate(states["python"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    generator.set_state(states["data"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# Settings that may change between a run and its resumption: where things are,
# what runs, and how fast. Every other setting must be the same.
RUNTIME_KEYS = {"DATA_DIR", "DOWNLOAD", "OUT_DIR", "STAGES", "FRESH", "RESUME", "DEVICE", "AMP", "CHANNELS_LAST",
                "COMPILE", "THREADS", "DETERMINISTIC", "RECIPE"}


def json_safe(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def trainable_state(objective):
    """The objective's state without the frozen teacher: the network being
    trained and any adapters of the method."""
    return {k: v for k, v in objective.state_dict().items() if not k.startswith("teacher.")}


# ---------------------------------------------------------------- several processes (torchrun)

def job_size():
    """The number of processes of the torchrun job this process belongs to (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_job(device):
    """(rank, world size, device) of this process in the torchrun job that
    started it, or (0, 1, device) when it runs alone. Each process of a job
    trains on its own part of every batch (data.train_batches) and DDP averages
    the gradients, so BATCH_SIZE and LR mean the same whatever the number of
    processes; rank 0 alone evaluates, prints and writes files."""
    world = job_size()
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # the others wait for rank 0 while it downloads or decodes the data: longer than NCCL's 10-minute default
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1),
                                         device_id=device if device.type == "cuda" else None)
    return torch.distributed.get_rank(), world, device


@contextlib.contextmanager
def in_turns(rank, world):
    """Run the block (a download, a cache to build) first on rank 0, then on
    the first process of every other machine, then on the rest: each finds
    the files the ones before it wrote, where they share a folder."""
    if world == 1:
        yield
        return
    turn = 0 if rank == 0 else 1 if int(os.environ.get("LOCAL_RANK", "0")) == 0 else 2
    for _ in range(turn):
        torch.distributed.barrier()
    yield
    for _ in range(2 - turn):
        torch.distributed.barrier()


def sum_over_processes(partial, world):
    """An epoch's running sums over every process of the job, in place; the
    first non-finite step is the earliest any process saw (DDP spreads a
    non-finite gradient to every process one step later)."""
    if world == 1:
        return
    never = torch.iinfo(torch.int64).max
    partial["seen"] = torch.tensor(partial["seen"], device=partial["correct"].device)
    partial["first_bad"] = torch.where(partial["first_bad"] < 0, never, partial["first_bad"])
    for key, op in (("loss_sum", "SUM"), ("correct", "SUM"), ("seen", "SUM"), ("first_bad", "MIN")):
        torch.distributed.all_reduce(partial[key], getattr(torch.distributed.ReduceOp, op))
    partial["first_bad"] = torch.where(partial["first_bad"] == never, -1, partial["first_bad"])
    partial["loss_sum"] /= world
    partial["seen"] = int(partial["seen"])


def check_replicas(model, world):
    """Stop if the processes' copies of the trained weights differ: DDP keeps
    them identical, so a difference means the job did not train one model."""
    if world == 1:
        return
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    totals = [torch.zeros_like(total) for _ in range(world)]
    torch.distributed.all_gather(totals, total)
    if any(t != totals[0] for t in totals):
        raise TrainingError(f"the {world} processes ended with different weights ({[float(t) for t in totals]}); "
                            f"this is a bug, please report it")


def agreed_stop(world, device):
    """The signal that asked to stop, as every process of the job hears it: a
    signal may reach the processes at different steps, so they agree at the
    end of each epoch."""
    if world == 1:
        return STOP["signal"]
    flag = torch.tensor(STOP["signal"] or 0, device=device)
    torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
    return int(flag) or None


# ---------------------------------------------------------------- one stage

def train_stage(stage, cfg, dataset, device, out_dir, teacher=None, teacher_digest=None, resume=None, part=(0, 1)):
    """Train one network (teacher, student, or distilled student) and save it.

    The same loop serves every stage: only the objective differs (cross-entropy,
    or a distillation method against the frozen teacher). After every epoch,
    and when a signal asks to stop, the whole training state goes to
    <stage>.last.pt, from which `resume` (that file's contents) continues.
    `teacher_digest` identifies the teacher's checkpoint, so that a distilled
    run is never resumed against another teacher. part = (rank, world): this
    process in a torchrun job (see join_job). Returns the stage's metrics on
    rank 0, and None on the others once rank 0 has saved the checkpoint."""
    rank, world = part
    epochs = cfg["EPOCHS"][STAGES.index(stage)]
    model_name = cfg["TEACHER"] if stage == "teacher" else cfg["STUDENT"]
    torch.manual_seed(cfg["SEED"])
    model = models.build(model_name, len(dataset.classes), dataset.in_channels, dropout=cfg["DROPOUT"])
    memory_format = torch.channels_last if cfg["CHANNELS_LAST"] else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    model.init_from_data(data.normalize(dataset.train_x[:5000], dataset.mean, dataset.std, cfg["CHANNELS_LAST"]))
    if teacher is None:
        objective = distill.Supervised(model, cfg["LABEL_SMOOTHING"])
    else:
        teacher = teacher.to(device, memory_format=memory_format)
        sample = data.normalize(dataset.train_x[:8], dataset.mean, dataset.std, cfg["CHANNELS_LAST"])
        method = distill.build_method(cfg["METHOD"], cfg, model, teacher, sample)
        objective = distill.Distillation(model, teacher, method).to(device, memory_format=memory_format)
    lr = cfg["LR"] if stage == "teacher" else cfg["STUDENT_LR"] or cfg["LR"]
    optimizer = distill.make_optimizer(objective, cfg, lr)
    steps = data.steps_per_epoch(dataset, cfg["BATCH_SIZE"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, distill.lr_multiplier(
        epochs * steps, cfg["WARMUP"], cfg["LR_SCHEDULE"], cfg["LR_MILESTONES"]))
    lookahead = (distill.Lookahead(model, epochs * steps, every=max(1, round(5120 / cfg["BATCH_SIZE"])))
                 if cfg["LOOKAHEAD"] else None)  # every 5,120 images: airbench's 5 steps of 1,024
    autocast, amp_on = distill.autocast_for(device, cfg["AMP"])
    trained = objective if world == 1 else torch.nn.parallel.DistributedDataParallel(objective)
    step_fn = torch.compile(trained) if cfg["COMPILE"] else trained
    generator = torch.Generator(device=device).manual_seed(cfg["SEED"])
    params = models.count_params(model)
    last_path = stage_path(out_dir, stage, ".last.pt")

    epoch, step, log, elapsed = 1, 0, [], 0.0
    best = {"acc": -1.0, "epoch": 0, "state": None}
    if resume is not None:
        try:
            objective.load_state_dict({**objective.state_dict(), **resume["trainable"]})
        except RuntimeError:
            raise TrainingError(f"{last_path}: its weights do not fit {model_name} as this version of models.py builds "
                                f"it (saved by an older version?); pass --fresh to start the stage over",
                                exit_code=2) from None
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if lookahead is not None:  # a file from before lookahead has no average: it starts at the resumed weights
            lookahead.load_state_dict(resume.get("lookahead") or model.state_dict())
        restore_rng_states(resume["rng"], generator)
        epoch, step, log, elapsed, best = resume["epoch"], resume["step"], resume["log"], resume["elapsed"], resume["best"]
        partial = resume["partial"]
    print(f"\n== {stage}: {model_name} ({params:,} params) on {device}{', bf16' if amp_on else ''}, "
          f"{epochs} epochs of {steps} steps, {len(dataset.train_y):,} train / {len(dataset.val_y):,} val images"
          + (f"; resuming at epoch {epoch}, step {step}" if resume is not None else ""))

    def save_progress(next_epoch, next_step, partial):
        if rank > 0:
            return
        state = {"stage": stage, "config": json_safe(cfg), "device": device.type, "teacher": teacher_digest,
                 "epoch": next_epoch, "step": next_step,
                 "trainable": trainable_state(objective), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng_states(generator), "log": log,
                 "lookahead": None if lookahead is None else lookahead.state_dict(),
                 "elapsed": elapsed + time.perf_counter() - started, "best": best, "partial": partial}
        data.atomic_write(last_path, lambda p: torch.save(state, p))

    started = time.perf_counter()
    bar = tqdm(total=epochs * steps, initial=(epoch - 1) * steps + step, desc=stage, unit="step", dynamic_ncols=True,
               leave=False, disable=None if rank == 0 else True)  # none when stderr is not a terminal
    while epoch <= epochs:
        if step == 0:  # a new epoch: new order, fresh running sums
            partial = {"order": torch.randperm(len(dataset.train_y), device=device, generator=generator),
                       "loss_sum": torch.zeros((), device=device), "first_bad": torch.full((), -1, device=device),
                       "correct": torch.zeros((), dtype=torch.int64, device=device), "seen": 0, "seconds": 0.0}
            if world > 1:  # one order for the whole job, even where GPUs of another kind would draw another
                torch.distributed.broadcast(partial["order"], 0)
        elif rank > 0:  # a resumed epoch's running sums so far are counted once, by rank 0
            partial.update(loss_sum=torch.zeros(()), correct=torch.zeros((), dtype=torch.int64), seen=0)
        partial = {k: v.to(device) if torch.is_tensor(v) else v for k, v in partial.items()}
        if world > 1:  # each process its own dropout masks, the same again when the job resumes at this epoch
            torch.manual_seed(cfg["SEED"] + 1000 * epoch + rank)
        epoch_start = time.perf_counter()
        objective.train()
        objective.set_progress(epoch / epochs)  # the fraction of training done when this epoch ends
        flip = (data.alternating_flips(len(dataset.train_y), epoch, cfg["SEED"], device)
                if cfg["FLIP"] and cfg["ALTERNATE_FLIP"] else cfg["FLIP"])
        for images, labels in data.train_batches(dataset, partial["order"], cfg["BATCH_SIZE"], cfg["CROP_PADDING"],
                                                 flip, generator, cfg["CHANNELS_LAST"], start=step, part=part):
            with autocast():
                loss, logits = step_fn(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss = loss.detach()
            # remember the first non-finite step without a host sync; checked once per epoch
            partial["first_bad"] = torch.where((partial["first_bad"] < 0) & ~torch.isfinite(loss), step, partial["first_bad"])
            partial["loss_sum"] += loss
            partial["correct"] += (logits.argmax(1) == labels).sum()
            partial["seen"] += len(labels)
            step += 1
            if lookahead is not None:
                lookahead.step((epoch - 1) * steps + step)
            bar.update()
            if STOP["signal"] is not None and step < steps and world == 1:  # a job stops at the epoch's end
                healthy = int(partial["first_bad"]) < 0  # never save a diverged state over a good one
                if healthy:
                    partial["seconds"] += time.perf_counter() - epoch_start
                    save_progress(epoch, step, partial)
                bar.close()
                raise Interrupted(STOP["signal"], saved=healthy)
        sum_over_processes(partial, world)
        first_bad = int(partial["first_bad"])
        if first_bad >= 0:
            bar.close()
            raise TrainingError(f"{stage}: the loss became non-finite in epoch {epoch}, step {first_bad + 1} of {steps}; "
                                f"start it over with --fresh and a lower --lr (now {lr}), or turn off mixed precision "
                                f"with --amp off"
                                + (f"; the last good epoch is kept in {last_path}" if last_path.exists() else ""))
        train_loss = partial["loss_sum"].item() / steps
        val_acc = (evaluate(model, dataset.val_x, dataset.val_y, dataset.mean, dataset.std, tta=cfg["TTA"],
                            autocast=autocast, channels_last=cfg["CHANNELS_LAST"]) if len(dataset.val_y) and rank == 0
                   else None)
        record = {"epoch": epoch, "loss": round(train_loss, 5), "train_acc": round(partial["correct"].item() / partial["seen"], 5),
                  "val_acc": None if val_acc is None else round(val_acc, 5), "lr": scheduler.get_last_lr()[0],
                  "images": partial["seen"], "seconds": round(partial["seconds"] + time.perf_counter() - epoch_start, 2)}
        log.append(record)
        if rank == 0:
            save_text(stage_path(out_dir, stage, ".jsonl"), "".join(json.dumps(r) + "\n" for r in log))
        if rank == 0 and (val_acc is None or val_acc > best["acc"]):  # without a validation split, the last epoch
            best = {"acc": val_acc, "epoch": epoch, "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        bar.write(f"{stage} epoch {epoch:3d}/{epochs}  loss {train_loss:.4f}  train {record['train_acc']:.2%}  "
                  f"val {percent(val_acc)}  lr {record['lr']:.2e}  {record['seconds']:.1f}s")
        epoch, step = epoch + 1, 0
        save_progress(epoch, step, {})
        stop = agreed_stop(world, device)
        if stop is not None:
            bar.close()
            raise Interrupted(stop)
    bar.close()
    train_seconds = elapsed + time.perf_counter() - started
    check_replicas(model, world)
    if rank > 0:  # rank 0 tests, measures and saves the model; the others wait until it has
        torch.distributed.barrier()
        return None

    model.load_state_dict(best["state"])
    test_acc = evaluate(model, dataset.test_x, dataset.test_y, dataset.mean, dataset.std, tta=cfg["TTA"],
                        autocast=autocast, channels_last=cfg["CHANNELS_LAST"])
    latency_ms, throughput = models.cpu_speed(model, dataset.in_channels, dataset.image_size)
    metrics = {"model": model_name, "params": params, "test_acc": test_acc, "best_val_acc": best["acc"],
               "best_epoch": best["epoch"], "epochs": epochs, "train_seconds": round(train_seconds, 1),
               "cpu_latency_ms": round(latency_ms, 3), "cpu_throughput": round(throughput, 1),
               "device": str(device), "tta": cfg["TTA"], "data": data.origin(dataset.source)}
    if teacher is not None:
        metrics["method"] = cfg["METHOD"]
    checkpoint = {"stage": stage, "dataset": cfg["DATASET"], "model": model_name,
                  "num_classes": len(dataset.classes), "in_channels": dataset.in_channels,
                  "image_size": dataset.image_size, "classes": list(dataset.classes),
                  "mean": list(dataset.mean), "std": list(dataset.std), "tta": cfg["TTA"],
                  "state_dict": best["state"], "config": json_safe(cfg), "metrics": metrics}
    data.atomic_write(stage_path(out_dir, stage), lambda p: torch.save(checkpoint, p))
    last_path.unlink(missing_ok=True)
    print(f"{stage}: test accuracy {test_acc:.2%} (best epoch {best['epoch']}, val {percent(best['acc'])}), "
          f"{train_seconds:.0f}s, saved {stage_path(out_dir, stage)}")
    if world > 1:
        torch.distributed.barrier()
    return metrics


# ---------------------------------------------------------------- the pipeline

def load_finished(out_dir, stage, expected_model, dataset):
    """The checkpoint of a finished stage, or None when there is none.

    A checkpoint of another model or class list is an error, not something to
    silently reuse."""
    path = stage_path(out_dir, stage)
    if not path.exists():
        return None
    try:
        checkpoint = models.load_checkpoint(path)
    except ValueError as error:
        raise TrainingError(f"{path}: {error}; delete it or pass --fresh to retrain") from None
    if checkpoint["model"] != expected_model or checkpoint["classes"] != dataset.classes:
        raise TrainingError(f"{path} holds a {checkpoint['model']} trained on other classes or another model than "
                            f"{expected_model}; pass --fresh to retrain it, or another --out-dir")
    if "metrics" not in checkpoint:
        raise TrainingError(f"{path} is not a finished stage of train.py (no metrics); pass --fresh to retrain it")
    return checkpoint


def teacher_model(checkpoint, path):
    """The network of a saved teacher, or a one-line error when its weights do
    not fit the model of that name (a checkpoint from an older version, say)."""
    try:
        return models.checkpoint_model(checkpoint)
    except ValueError as error:
        raise TrainingError(f"{path}: {error}; pass --fresh to retrain the teacher") from None


def file_digest(path):
    """A short content hash of a file, to tell one checkpoint from another."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def saved_teacher(out_dir, checkpoint):
    """The network of the teacher saved in out_dir, and the digest of its file."""
    path = stage_path(out_dir, "teacher")
    return teacher_model(checkpoint, path), file_digest(path)


def data_sources(rows):
    """Where the stages' data came from, for results.md: one source, or one per
    stage when they differ (a stage kept from a run on other data)."""
    sources = {stage: m.get("data", "not recorded") for stage, m in rows.items()}
    if len(set(sources.values())) == 1:
        return f"data: {next(iter(sources.values()))}\n"
    return "data: " + "; ".join(f"{stage} from {source}" for stage, source in sources.items()) + "\n"


def results_table(rows):
    lines = ["| stage | model | params | test accuracy | CPU latency (batch 1) | CPU throughput (batch 256) | train time |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for stage, m in rows.items():
        lines.append(f"| {stage} | {m['model']} | {m['params']:,} | {m['test_acc']:.2%} | {m['cpu_latency_ms']:.2f} ms "
                     f"| {m['cpu_throughput']:,.0f} img/s | {m['train_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def check_writable(folder):
    """Fail now, not after an hour of training, if outputs cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        config.fail("out-dir", f"cannot write to {folder} ({error.strerror}); choose a writable --out-dir")


def load_unfinished(out_dir, stage, cfg, device):
    """The saved progress of an unfinished stage (its .last.pt), or None.

    It is used only with --resume, and must come from the same settings; with
    --fresh it is ignored and later overwritten; otherwise it stops the run, so
    that no progress is lost by accident."""
    path = stage_path(out_dir, stage, ".last.pt")
    if not path.exists() or cfg["FRESH"]:
        return None
    if not cfg["RESUME"]:
        raise TrainingError(f"{path} holds an unfinished {stage} run; continue it with: {resume_command()}  "
                            f"(or pass --fresh to start the stage over)", exit_code=2)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainingError(f"{path}: cannot read it ({str(error).splitlines()[0][:200]}); delete it or pass --fresh",
                            exit_code=2) from None
    # a setting that the file does not know (added to config.py since) counts as its default
    was = {**json_safe(config.defaults()), **state["config"]}
    changed = [k for k, v in json_safe(cfg).items() if k not in RUNTIME_KEYS and was.get(k) != v]
    if changed:
        was = " ".join(as_flag(k, was[k]) for k in changed)
        raise TrainingError(f"{path} was started with other settings ({was}); resume with those, or pass --fresh",
                            exit_code=2)
    if state.get("device", device.type) != device.type:  # the data generator's state belongs to its device
        raise TrainingError(f"{path} was started on {state['device']}; resume it with --device {state['device']}, "
                            f"or pass --fresh", exit_code=2)
    return state


def as_flag(name, value):
    """A setting as the user would type it."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{config.flag(name)}"
    return f"--{config.flag(name)} {','.join(map(str, value)) if isinstance(value, list) else value}"


def resume_command():
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--fresh")]
    command = shlex.join(["python3", Path(sys.argv[0]).name, *args, "--resume"])
    return command + (" (through the same torchrun command)" if job_size() > 1 else "")


def make_deterministic():
    """Same inputs, same bits: deterministic kernels where torch has them."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def main(argv=None):
    cfg = config.parse(argv, description=__doc__.split("\n\n")[0],
                       choices={"DATASET": data.DATASETS, "TEACHER": models.MODELS, "STUDENT": models.MODELS,
                                "METHOD": distill.METHODS, "OPTIMIZER": distill.OPTIMIZERS},
                       derived=distill.paper_pair_settings)
    if cfg["RESUME"] and cfg["FRESH"]:
        config.fail("resume", "--resume continues unfinished stages and --fresh starts them over; pick one")
    rank, world, device = join_job(config.device(cfg["DEVICE"]))
    if cfg["BATCH_SIZE"] % world:  # DDP averages the processes' gradients with equal weights
        config.fail("batch-size", f"{cfg['BATCH_SIZE']} does not split evenly over the {world} processes of this "
                    f"torchrun job; give a multiple of {world}")
    if rank > 0:  # one process of a torchrun job speaks for all
        sys.stdout = open(os.devnull, "w")
    if cfg["THREADS"]:
        torch.set_num_threads(cfg["THREADS"])
    out_dir = Path(cfg["OUT_DIR"]) / cfg["DATASET"]
    check_writable(out_dir)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg["DETERMINISTIC"]:
        make_deterministic()

    if Path(cfg["DATA_DIR"]).is_file():
        config.fail("data-dir", f"{cfg['DATA_DIR']} is a file, but the flag takes a folder: for {cfg['DATASET']} it "
                    f"looks there for {data.expected_contents(cfg['DATASET'])}")
    if not Path(cfg["DATA_DIR"]).is_dir() and (cfg["DATASET"] == "folder" or (cfg["DATASET"] == "cifar100"
                                                                             and not cfg["DOWNLOAD"])):
        config.fail("data-dir", f"{cfg['DATA_DIR']} is not a folder; point it at the dataset"
                    + ("" if cfg["DATASET"] == "folder" else " or allow --download"))
    with in_turns(rank, world):
        dataset = data.load(cfg["DATASET"], cfg["DATA_DIR"], cache_dirs=[out_dir], image_size=cfg["IMAGE_SIZE"],
                            val_size=cfg["VAL_SIZE"], seed=cfg["SEED"], device=device, download=cfg["DOWNLOAD"])
    print(f"data: {cfg['DATASET']} from {dataset.source}: {len(dataset.classes)} classes, "
          f"{dataset.in_channels}x{dataset.image_size}x{dataset.image_size}, {len(dataset.train_y):,} train, "
          f"{len(dataset.val_y):,} val, {len(dataset.test_y):,} test")
    if cfg["CROP_PADDING"] >= min(dataset.train_x.shape[-2:]):  # reflection cannot reach further than the image
        config.fail("crop-padding", f"{cfg['CROP_PADDING']} pixels is not less than the {dataset.image_size}-pixel "
                    f"images; give a smaller value (0 turns translation off)")

    requested = [s for s in STAGES if s in cfg["STAGES"].split(",")]
    finished = {}
    for stage in STAGES:
        if not (cfg["FRESH"] and stage in requested):
            expected = cfg["TEACHER"] if stage == "teacher" else cfg["STUDENT"]
            checkpoint = load_finished(out_dir, stage, expected, dataset)
            if checkpoint is not None:
                finished[stage] = checkpoint
    if "distilled" in requested and "teacher" not in requested and "teacher" not in finished:
        print("distilled needs a teacher and none is saved: training the teacher first")
        requested.insert(0, "teacher")
    todo = [stage for stage in requested if stage not in finished]
    unfinished = {stage: load_unfinished(out_dir, stage, cfg, device) for stage in todo}

    results = {stage: checkpoint["metrics"] for stage, checkpoint in finished.items()}
    for stage in requested:
        if stage in finished:
            print(f"{stage}: {stage_path(out_dir, stage)} exists (test accuracy {results[stage]['test_acc']:.2%}); "
                  f"skipping it (--fresh retrains)")
    teacher = digest = None
    if "distilled" in todo and "teacher" in finished:  # check the saved teacher now, not after the other stages
        teacher, digest = saved_teacher(out_dir, finished["teacher"])
    if unfinished.get("distilled") is not None and unfinished["distilled"].get("teacher", digest) != digest:
        raise TrainingError(f"{stage_path(out_dir, 'distilled', '.last.pt')} was distilled from another teacher.pt "
                            f"than the one there is now; pass --fresh to start the distilled stage over", exit_code=2)
    for stage in todo:
        try:
            results[stage] = train_stage(stage, cfg, dataset, device, out_dir,
                                         teacher=teacher if stage == "distilled" else None,
                                         teacher_digest=digest if stage == "distilled" else None,
                                         resume=unfinished[stage], part=(rank, world))
        except torch.OutOfMemoryError:
            raise TrainingError(f"{stage}: out of GPU memory with --batch-size {cfg['BATCH_SIZE']}; "
                                f"try a smaller --batch-size") from None
        if stage == "teacher":  # distil from the teacher as saved (in a torchrun job, every process reads it)
            teacher, digest = saved_teacher(out_dir, load_finished(out_dir, "teacher", cfg["TEACHER"], dataset))

    if rank > 0:
        return
    rows = {stage: results[stage] for stage in STAGES if stage in results}
    table = results_table(rows)
    print(f"\nresults ({cfg['DATASET']}, test accuracy{' with flip TTA' if cfg['TTA'] else ''}):\n{table}"
          f"{data_sources(rows)}")
    save_text(out_dir / "results.md", f"# {cfg['DATASET']}\n\n{table}\n{data_sources(rows)}")
    save_text(out_dir / "results.json", json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    quiet = os.environ.get("RANK", "0") != "0"  # in a torchrun job, rank 0 tells the user how to go on
    try:
        main()
    except Interrupted as stop:
        saved = ("progress is saved. Continue with: " + resume_command() if stop.saved
                 else "the loss had diverged, so nothing was saved over earlier progress; start the stage over with "
                      "--fresh and a lower --lr")
        if not quiet:
            sys.stderr.write(f"{Path(sys.argv[0]).name}: stopped by {stop}; {saved}\n")
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:  # a second signal: stop at once; the last .last.pt is from the end of an epoch or earlier
        if not quiet:
            sys.stderr.write(f"{Path(sys.argv[0]).name}: stopped at once by a second signal; continue from the last "
                             f"saved progress with: {resume_command()}\n")
        sys.exit(128 + (STOP["signal"] or signal.SIGINT))
    except (data.DataError, TrainingError) as error:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {error}\n")
        sys.exit(getattr(error, "exit_code", 1))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
