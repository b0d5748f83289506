"""Train a teacher, a small student alone, and the same student distilled from the
frozen teacher; then compare the three.

    python3 train.py                       # all three stages, defaults from config.py
    python3 train.py --stages distilled --method kd --temperature 2
    python3 train.py --help                # every constant of config.py as a flag

Each stage writes OUT_DIR/<dataset>/<stage>.pt (checkpoint) and <stage>.jsonl
(one JSON line per epoch); the run ends with results.md and results.json.
"""

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import config
import data
import distill
import models

STAGES = ("teacher", "student", "distilled")


# ---------------------------------------------------------------- small helpers

def atomic_write(path, write):
    """Write a file through a temporary file and os.replace, so that a crash
    never leaves a half-written file where a good one was."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_text(path, text):
    atomic_write(path, lambda p: p.write_text(text))


def sgd(params, lr, cfg):
    return torch.optim.SGD(params, lr=lr, momentum=cfg["MOMENTUM"], nesterov=True)


def adamw(params, lr, cfg):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99))


OPTIMIZERS = {"sgd": sgd, "adamw": adamw}  # name -> constructor(param groups, lr, config)


def make_optimizer(objective, cfg):
    """The optimizer over every trainable parameter of the objective (the
    student and any adapters of the method), without weight decay on biases
    and norm weights."""
    trainable = [p for p in objective.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": cfg["WEIGHT_DECAY"]},
              {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}]
    return OPTIMIZERS[cfg["OPTIMIZER"]](groups, cfg["LR"], cfg)


def warmup_then_linear_decay(total_steps, warmup_fraction):
    """LR multiplier per step: linear warm-up, then linear decay to zero at the end."""
    warmup = max(1, round(total_steps * warmup_fraction))

    def multiplier(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return multiplier


@torch.no_grad()
def evaluate(model, images, labels, mean, std, batch_size=1024, tta=False, autocast=None, channels_last=True):
    """Top-1 accuracy of `model` on uint8 images. With tta, the softmax of each
    image and of its mirror are averaged. One host sync, at the end."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for start in range(0, len(labels), batch_size):
        batch = data.normalize(images[start:start + batch_size], mean, std, channels_last)
        with autocast():
            probs = model(batch).float().softmax(1)
            if tta:
                probs += model(batch.flip(-1)).float().softmax(1)
        correct += (probs.argmax(1) == labels[start:start + batch_size]).sum()
    model.train(was_training)
    return correct.item() / max(1, len(labels))


def cpu_speed(model, in_channels, image_size):
    """Inference speed on the CPU in float32, whatever device trained the model:
    median latency at batch 1 (ms) and throughput at batch 256 (images/s)."""
    model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.channels_last)
    single = torch.randn(1, in_channels, image_size, image_size).contiguous(memory_format=torch.channels_last)
    batch = torch.randn(256, in_channels, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(5):
            model(single)
        times = []
        for _ in range(30):
            start = time.perf_counter()
            model(single)
            times.append(time.perf_counter() - start)
        latency_ms = sorted(times)[len(times) // 2] * 1000
        model(batch)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            model(batch)
            runs.append(time.perf_counter() - start)
    return latency_ms, 256 / sorted(runs)[1]


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


def stage_path(out_dir, stage, suffix=".pt"):
    return Path(out_dir) / f"{stage}{suffix}"


# ---------------------------------------------------------------- one stage

def train_stage(stage, cfg, dataset, device, out_dir, teacher=None):
    """Train one network (teacher, student, or distilled student) and save it.

    The same loop serves every stage: only the objective differs (cross-entropy,
    or a distillation method against the frozen teacher)."""
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
        method = distill.build_method(cfg["METHOD"], cfg, model, teacher)
        objective = distill.Distillation(model, teacher, method).to(device, memory_format=memory_format)
    optimizer = make_optimizer(objective, cfg)
    steps = data.steps_per_epoch(dataset, cfg["BATCH_SIZE"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(epochs * steps, cfg["WARMUP"]))
    autocast, amp_on = autocast_for(device, cfg["AMP"])
    step = torch.compile(objective) if cfg["COMPILE"] else objective
    generator = torch.Generator(device=device).manual_seed(cfg["SEED"])
    params = models.count_params(model)
    print(f"\n== {stage}: {model_name} ({params:,} params) on {device}{', bf16' if amp_on else ''}, "
          f"{epochs} epochs of {steps} steps, {len(dataset.train_y):,} train / {len(dataset.val_y):,} val images")

    log, best_acc, best_state, best_epoch = [], -1.0, None, 0
    started = time.perf_counter()
    bar = tqdm(total=epochs * steps, desc=stage, unit="step", dynamic_ncols=True, leave=False)
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        objective.train()
        objective.set_progress((epoch - 1) / epochs)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        for images, labels in data.train_batches(dataset, cfg["BATCH_SIZE"], cfg["CROP_PADDING"], cfg["FLIP"],
                                                 generator, cfg["CHANNELS_LAST"]):
            with autocast():
                loss, logits = step(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            bar.update()
        train_loss = loss_sum.item() / steps
        if not math.isfinite(train_loss):
            bar.close()
            raise TrainingError(f"{stage}: the loss became {train_loss} in epoch {epoch}; lower --lr "
                                f"or turn off mixed precision with --amp off")
        val_acc = (evaluate(model, dataset.val_x, dataset.val_y, dataset.mean, dataset.std, tta=cfg["TTA"],
                            autocast=autocast, channels_last=cfg["CHANNELS_LAST"]) if len(dataset.val_y) else float("nan"))
        record = {"epoch": epoch, "loss": round(train_loss, 5), "train_acc": round(correct.item() / seen, 5),
                  "val_acc": round(val_acc, 5), "lr": scheduler.get_last_lr()[0],
                  "seconds": round(time.perf_counter() - epoch_start, 2)}
        log.append(record)
        save_text(stage_path(out_dir, stage, ".jsonl"), "".join(json.dumps(r) + "\n" for r in log))
        if not len(dataset.val_y) or val_acc > best_acc:  # without a validation split, keep the last epoch
            best_acc, best_epoch = val_acc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.write(f"{stage} epoch {epoch:3d}/{epochs}  loss {train_loss:.4f}  train {record['train_acc']:.2%}  "
                  f"val {val_acc:.2%}  lr {record['lr']:.2e}  {record['seconds']:.1f}s")
    bar.close()
    train_seconds = time.perf_counter() - started

    model.load_state_dict(best_state)
    test_acc = evaluate(model, dataset.test_x, dataset.test_y, dataset.mean, dataset.std, tta=cfg["TTA"],
                        autocast=autocast, channels_last=cfg["CHANNELS_LAST"])
    latency_ms, throughput = cpu_speed(model, dataset.in_channels, dataset.image_size)
    metrics = {"model": model_name, "params": params, "test_acc": test_acc, "best_val_acc": best_acc,
               "best_epoch": best_epoch, "epochs": epochs, "train_seconds": round(train_seconds, 1),
               "cpu_latency_ms": round(latency_ms, 3), "cpu_throughput": round(throughput, 1),
               "device": str(device), "tta": cfg["TTA"]}
    if teacher is not None:
        metrics["method"] = cfg["METHOD"]
    checkpoint = {"stage": stage, "dataset": cfg["DATASET"], "model": model_name,
                  "num_classes": len(dataset.classes), "in_channels": dataset.in_channels,
                  "image_size": dataset.image_size, "classes": list(dataset.classes),
                  "mean": list(dataset.mean), "std": list(dataset.std), "tta": cfg["TTA"],
                  "state_dict": {k: v.cpu() for k, v in best_state.items()},
                  "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                  "metrics": metrics}
    atomic_write(stage_path(out_dir, stage), lambda p: torch.save(checkpoint, p))
    print(f"{stage}: test accuracy {test_acc:.2%} (best epoch {best_epoch}, val {best_acc:.2%}), "
          f"{train_seconds:.0f}s, saved {stage_path(out_dir, stage)}")
    return model, metrics


class TrainingError(Exception):
    """Training cannot go on (for example, the loss diverged)."""


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
    return checkpoint


def results_table(rows):
    lines = ["| stage | model | params | test accuracy | CPU latency (batch 1) | CPU throughput (batch 256) | train time |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for stage, m in rows.items():
        lines.append(f"| {stage} | {m['model']} | {m['params']:,} | {m['test_acc']:.2%} | {m['cpu_latency_ms']:.2f} ms "
                     f"| {m['cpu_throughput']:,.0f} img/s | {m['train_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def pick_device(choice):
    if choice == "cuda" and not torch.cuda.is_available():
        config.fail("device", "cuda was asked for but torch sees no CUDA device; use --device cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def check_writable(folder):
    """Fail now, not after an hour of training, if outputs cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        config.fail("out-dir", f"cannot write to {folder} ({error.strerror}); choose a writable --out-dir")


def main(argv=None):
    cfg = config.parse(argv, description=__doc__.split("\n\n")[0],
                       choices={"DATASET": data.DATASETS, "TEACHER": models.MODELS, "STUDENT": models.MODELS,
                                "METHOD": distill.METHODS, "OPTIMIZER": OPTIMIZERS})
    device = pick_device(cfg["DEVICE"])
    if cfg["THREADS"]:
        torch.set_num_threads(cfg["THREADS"])
    out_dir = Path(cfg["OUT_DIR"]) / cfg["DATASET"]
    check_writable(out_dir)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    dataset = data.load(cfg["DATASET"], cfg["DATA_DIR"], cache_dirs=[out_dir], image_size=cfg["IMAGE_SIZE"],
                        val_size=cfg["VAL_SIZE"], seed=cfg["SEED"], device=device, download=cfg["DOWNLOAD"])
    print(f"data: {cfg['DATASET']} from {dataset.source}: {len(dataset.classes)} classes, "
          f"{dataset.in_channels}x{dataset.image_size}x{dataset.image_size}, {len(dataset.train_y):,} train, "
          f"{len(dataset.val_y):,} val, {len(dataset.test_y):,} test")

    requested = [s for s in STAGES if s in cfg["STAGES"].split(",")]
    finished = {}
    for stage in STAGES:
        expected = cfg["TEACHER"] if stage == "teacher" else cfg["STUDENT"]
        checkpoint = None if (cfg["FRESH"] and stage in requested) else load_finished(out_dir, stage, expected, dataset)
        if checkpoint is not None:
            finished[stage] = checkpoint
    if "distilled" in requested and "teacher" not in requested and "teacher" not in finished:
        print("distilled needs a teacher and none is saved: training the teacher first")
        requested.insert(0, "teacher")

    results = {stage: checkpoint["metrics"] for stage, checkpoint in finished.items()}
    teacher = None
    for stage in requested:
        if stage in finished and not cfg["FRESH"]:
            print(f"{stage}: {stage_path(out_dir, stage)} exists (test accuracy {results[stage]['test_acc']:.2%}); "
                  f"skipping it (--fresh retrains)")
            continue
        if stage == "distilled":
            if teacher is None:
                teacher = models.checkpoint_model(finished["teacher"])
        model, results[stage] = train_stage(stage, cfg, dataset, device, out_dir,
                                            teacher=teacher if stage == "distilled" else None)
        if stage == "teacher":
            teacher = model
            finished["teacher"] = None

    rows = {stage: results[stage] for stage in STAGES if stage in results}
    table = results_table(rows)
    print(f"\nresults ({cfg['DATASET']}, test accuracy{' with flip TTA' if cfg['TTA'] else ''}):\n{table}")
    save_text(out_dir / "results.md", f"# {cfg['DATASET']}\n\n{table}")
    save_text(out_dir / "results.json", json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, TrainingError) as error:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {error}\n")
        sys.exit(1)
