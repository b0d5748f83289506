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
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import config
import data
import datafiles
import models
import plan
import report
import runtime
import stages
from distributed import ddp, ddp_agreed_stop, ddp_init, ddp_rank, ddp_sum, ddp_world_size, in_turns, master_process
from plan import TrainingError

STAGES = config.STAGE_NAMES
PROG = Path(sys.argv[0]).name
# the script as typed (path included), for the command printed after a stop; "train.py" when main() is called
# from elsewhere (tests)
SCRIPT = sys.argv[0] if PROG == Path(__file__).name else "train.py"
# The code that trains: its commit as this process starts, recorded with the
# run and with each stage it trains (a commit made while it trains is not its code).
GIT_STATE = report.git_commit()  # (commit, dirty, digest of the uncommitted changes)
THIS_CODE = dict(zip(report.CODE, GIT_STATE))
PROGRESS_SECONDS = 30  # how often a run whose output goes to a file says where it is inside an epoch
DIVERGED = (
    "the loss had diverged, so nothing was saved over earlier progress; start the stage over with --fresh and "
    "a lower --lr"
)

# ---------------------------------------------------------------- interruption


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step. `saved` says whether
    the progress was saved (it is not when the loss had already diverged)."""

    def __init__(self, signum, saved=True):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved


# set by the signal handler, read by the training loop after every step. "held": what is finished before a
# signal is obeyed (None: nothing, it stops at once)
STOP = {"signal": None, "held": None}


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
    stop = ddp_agreed_stop(STOP["signal"], device)
    if stop is not None:
        raise Interrupted(stop)


# ---------------------------------------------------------------- training one stage


def percent(fraction):
    """A fraction as a percentage, or 'n/a' when there is none (no validation split)."""
    return "n/a" if fraction is None else f"{fraction:.2%}"


class LogProgress:
    """The progress bar of output that is no terminal (a log file, where tqdm
    writes nothing): a line every `every` seconds, flushed, so that an hour
    inside one epoch does not look like a hang."""

    def __init__(self, name, total, initial, every=PROGRESS_SECONDS, clock=time.monotonic):
        self.name, self.total, self.n, self.every, self.clock = name, total, initial, every, clock
        self.start = self.last = clock()
        self.first = initial

    def update(self):
        self.n += 1
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            rate = (now - self.start) / max(self.n - self.first, 1)
            self.write(f"{self.name}: step {self.n:,}/{self.total:,} ({self.n / self.total:.0%}), {rate:.2f} s/step")

    def write(self, line):
        print(line, flush=True)

    def close(self):
        pass


def save_progress(stage, progress):
    if master_process:
        checkpoint.save_progress(stage.path(".last.pt"), {**stage.state_dict(), "progress": progress.state_dict()})


def train_stage(row, cfg, dataset, device, out_dir, teacher=None, teacher_digest=None, route=()):
    """Train one network (teacher, student, or distilled student) as its row
    of the plan says, from the start or from its saved progress, and save it.
    Returns the stage's metrics on the master process, None on the others."""
    stage = stages.build(row.stage, cfg, dataset, device, out_dir, teacher, teacher_digest, route)
    progress = stages.Progress() if row.progress is None else restore(stage, row.progress)
    print(
        f"\n== {row.stage}: {stage.model_name} ({models.count_params(stage.model):,} params) on {device}"
        f"{', bf16' if stage.amp_on else ''}, {runtime.counted(stage.epochs, 'epoch')} of "
        f"{runtime.counted(stage.steps, 'step')}, "
        f"{len(dataset.train_y):,} train / {len(dataset.val_y):,} val images"
        + (f"; resuming at epoch {progress.epoch}, step {progress.step}" if row.progress is not None else "")
    )
    total, initial = stage.epochs * stage.steps, (progress.epoch - 1) * stage.steps + progress.step
    if sys.stderr.isatty() or not master_process:
        bar = tqdm(total=total, initial=initial, desc=row.stage, unit="step", dynamic_ncols=True, leave=False,
                   disable=None if master_process else True)  # fmt: skip
    else:  # a log file, where tqdm writes nothing
        bar = LogProgress(row.stage, total, initial)
    row.begun = True
    with signals_held(f"finishing the current {'epoch' if ddp else 'step'} and saving progress", device):
        while progress.epoch <= stage.epochs:  # a torchrun job stops between epochs, a single process after a step
            sums = train_epoch(stage, progress, bar)
            end_epoch(stage, progress, sums, bar)
            stop = ddp_agreed_stop(STOP["signal"], device)
            if stop is not None:
                bar.close()
                raise Interrupted(stop)
        bar.close()
        metrics = finish_stage(stage, progress)  # a signal while it is tested and saved stops the run once saved
        row.done = True
        return metrics


def restore(stage, state):
    """The Progress of a resumed stage, its training state loaded into `stage`."""
    try:
        stage.load_state_dict(state)
    except RuntimeError:
        raise TrainingError(
            f"{stage.path('.last.pt')}: its weights do not fit {stage.model_name} as this version "
            f"of models.py builds it; pass --fresh to start the stage over",
            exit_code=2,
        ) from None
    return stages.Progress.from_state(state["progress"])


def start_epoch(stage, progress):
    """The running sums of the epoch about to run: fresh ones with a new order,
    or those of the epoch a resumed run stopped in."""
    if progress.step > 0:
        sums = stages.EpochSums(
            **{k: v.to(stage.device) if torch.is_tensor(v) else v for k, v in vars(progress.sums).items()}
        )
        if not master_process:  # the sums so far are counted once, by the master
            sums.loss_sum, sums.correct, sums.seen = sums.loss_sum.zero_(), sums.correct.zero_(), 0
        return sums
    device = stage.device
    order = torch.randperm(len(stage.dataset.train_y), device=device, generator=stage.generator)
    if ddp:  # one order for the whole job, even where GPUs of another kind would draw another
        torch.distributed.broadcast(order, 0)
    return stages.EpochSums(
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
        sums.lr = stage.optimizer.param_groups[0]["lr"]
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
        "lr": sums.lr,  # that of the epoch's last step
        "images": sums.seen,
        "seconds": round(sums.seconds, 2),
        **THIS_CODE,  # a resumed stage may have epochs from other code
    }
    if sums.code != THIS_CODE:  # stopped part-way by other code, and resumed by this
        record["begun_by"] = sums.code
    warning = stages.collapse_warning(stage.name, progress.epoch, record["train_acc"], val_acc, len(dataset.classes),
                               stage.amp_on)  # fmt: skip
    if warning:
        record["warning"] = warning
    progress.log.append(record)
    if master_process:
        checkpoint.write_text(stage.path(".last.jsonl"), log_text(progress.log))
    best = master_process and (val_acc is None or val_acc > progress.best["acc"])  # no validation split: the last
    anchor = master_process and stage.name == "teacher" and progress.epoch in stages.anchor_epochs(stage.epochs)
    state = {k: v.detach().cpu().clone() for k, v in stage.model.state_dict().items()} if best or anchor else None
    if best:
        progress.best = {"acc": val_acc, "epoch": progress.epoch, "state": state}
    if anchor:
        progress.anchors.append({"epoch": progress.epoch, "state": state})
    bar.write(
        f"{stage.name} epoch {progress.epoch:3d}/{stage.epochs}  loss {train_loss:.4f}  train "
        f"{record['train_acc']:.2%}  val {percent(val_acc)}  lr {record['lr']:.2e} (last step)  "
        f"{record['seconds']:.1f}s"
    )
    if warning:
        bar.write(warning)
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
        "earlier_code": report.earlier_code(progress.log, THIS_CODE),
        "warnings": [record["warning"] for record in progress.log if "warning" in record],
    }
    anchors = [anchor for anchor in progress.anchors if anchor["epoch"] < progress.best["epoch"]]  # before the best
    checkpoint.save(stage.path(), stage.finished(progress.best["state"], metrics, anchors))
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


# ---------------------------------------------------------------- the pipeline


def set_up(cfg):
    """Check the settings that need no data, join the torchrun job and set up
    the device; returns the device and the output folder."""
    out_dir = plan.out_folder(cfg, ddp_world_size)
    device = ddp_init(runtime.device(cfg["DEVICE"]))
    if not master_process:  # one process of a torchrun job speaks for all
        sys.stdout = open(os.devnull, "w")
    if cfg["THREADS"]:
        torch.set_num_threads(cfg["THREADS"])
    runtime.reuse_freed_memory(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg["DETERMINISTIC"]:
        runtime.make_deterministic()
    return device, out_dir


def load_data(cfg, device, out_dir):
    fallback = plan.data_folder(cfg)
    with in_turns():
        dataset = data.load(cfg["DATASET"], cfg["DATA_DIR"], cache_dirs=[out_dir], image_size=cfg["IMAGE_SIZE"],
                            val_size=cfg["VAL_SIZE"], seed=cfg["SEED"], device=device, download=cfg["DOWNLOAD"],
                            fallback=fallback, test_fraction=cfg["TEST_FRACTION"])  # fmt: skip
    for note in dataset.notes:
        print(note)
    if dataset.test_files is not None and master_process:
        record_split(cfg, dataset, out_dir)
    print(
        f"data: {cfg['DATASET']} from {dataset.source}: {len(dataset.classes)} classes, "
        f"{dataset.in_channels}x{dataset.image_size}x{dataset.image_size}, {len(dataset.train_y):,} train, "
        f"{len(dataset.val_y):,} val, {len(dataset.test_y):,} test"
    )
    return dataset


def record_split(cfg, dataset, out_dir):
    """OUT_DIR/<dataset>/split.json: the test images of a single <class>/*
    tree, so that predict.py --evaluate scores those alone (see data.split_tree)."""
    split = {"root": str(Path(cfg["DATA_DIR"]).resolve()), "seed": cfg["SEED"],
             "test_fraction": cfg["TEST_FRACTION"], "test": dataset.test_files}  # fmt: skip
    checkpoint.write_text(out_dir / datafiles.SPLIT_FILE, json.dumps(split, indent=1) + "\n")
    print(f"split: its test images are listed in {out_dir / datafiles.SPLIT_FILE}; predict.py --evaluate "
          f"{shlex.quote(cfg['DATA_DIR'])} scores those alone")  # fmt: skip


def brought_teacher(cfg, decided, dataset, device):
    """The metrics of the teacher of --teacher-checkpoint (its test accuracy
    measured here, by the master process alone: the others get None)."""
    path, model = cfg["TEACHER_CHECKPOINT"], decided.teacher[0]
    model = model.to(device, memory_format=torch.channels_last if cfg["CHANNELS_LAST"] else torch.contiguous_format)
    if not master_process:  # only the master reports; the others need the network and its digest
        return None
    test_acc, test_top5 = stages.evaluate(model, dataset.test_x, dataset.test_y, dataset.mean, dataset.std,
                                          cfg["TTA"], cfg["CHANNELS_LAST"])  # fmt: skip
    params = models.count_params(model)
    print(f"teacher: {cfg['TEACHER']} ({params:,} params) from {path} ({decided.brought}), not trained by this run: "
          f"test accuracy {test_acc:.2%}")  # fmt: skip
    return {"model": cfg["TEACHER"], "params": params, "test_acc": test_acc, "test_top5": test_top5,
            "best_val_acc": None, "best_epoch": None, "epochs": 0, "train_seconds": None, "device": str(device),
            "tta": cfg["TTA"], "method": "brought", "data": str(path), "checkpoint": str(path),
            **dict.fromkeys(report.CODE), "earlier_code": None, "warnings": []}  # fmt: skip


def train_stages(cfg, decided, dataset, device, out_dir):
    """Train the stages that the plan trains, in order. Returns the metrics of
    every stage the results show: trained, kept or brought."""
    results = {stage: row.saved["metrics"] for stage, row in decided.rows.items() if row.saved is not None}
    if cfg["TEACHER_CHECKPOINT"]:
        results["teacher"] = brought_teacher(cfg, decided, dataset, device)
    for row in decided.training():
        teacher, digest = decided.teacher if row.stage == "distilled" else (None, None)
        try:
            results[row.stage] = train_stage(row, cfg, dataset, device, out_dir, teacher, digest, decided.route)
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"{row.stage}: out of GPU memory with --batch-size {cfg['BATCH_SIZE']}; try a smaller --batch-size"
            ) from None
        if row.stage == "teacher":  # distil from the teacher as saved (in a torchrun job, every process reads it)
            decided.teacher, decided.route = plan.saved_teacher(out_dir, checkpoint.load(out_dir / "teacher.pt"))
            if cfg["ROUTE"] and not decided.route and decided.rows["distilled"].trains:
                print(f"distilled: {plan.NO_ROUTE}")
        if master_process:
            report.draw_curves(out_dir, [s for s in STAGES if s in results])
    return results


def main(argv=None):
    """Run train.py; returns the exit status of a run that a signal stopped, None otherwise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    decided = plan.Plan(argv, SCRIPT, ddp)  # until the plan is made, a stop has trained nothing
    try:
        cfg = config.parse(argv, description=__doc__.split("\n\n")[0])
        device, out_dir = set_up(cfg)
        run = report.run_info(cfg["SEED"], device, runtime.autocast(device, cfg["AMP"])[1], GIT_STATE)
        dataset = load_data(cfg, device, out_dir)
        decided = plan.make(cfg, dataset, device, out_dir, argv, SCRIPT, ddp)
        print(decided.text())
        results = train_stages(cfg, decided, dataset, device, out_dir)
        if master_process:
            report.write_run(cfg, decided, results, out_dir, dataset, run)
            print(outputs(out_dir))
    except Interrupted as stop:
        return stopped(stop.signum, f"stopped by {stop}; {decided.go_on() if stop.saved else DIVERGED}")
    except KeyboardInterrupt:  # see request_stop; a .last.pt is from the end of an epoch or earlier
        signum = STOP["signal"] or signal.SIGINT
        return stopped(signum, f"stopped at once by {signal.Signals(signum).name}; {decided.go_on()}")


def outputs(out_dir):
    """The closing lines: where the results and the checkpoints are."""
    written = [name for name in ("results.md", "results.json", "curves.png") if (out_dir / name).exists()]
    saved = [f"{stage}.pt" for stage in STAGES if (out_dir / f"{stage}.pt").exists()]
    return f"results: {', '.join(str(out_dir / n) for n in written)}\ncheckpoints: {', '.join(saved)} in {out_dir}"


def stopped(signum, line):
    """Say how the stopped run goes on (in a torchrun job, the master alone); returns the exit status."""
    if master_process:
        sys.stderr.write(f"{PROG}: {line}\n")
    return 128 + signum


if __name__ == "__main__":
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        sys.exit(main())
    except (datafiles.DataError, TrainingError) as error:
        sys.stderr.write(f"{PROG}: error: {error}\n")
        sys.exit(getattr(error, "exit_code", 1))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
