"""Images per second of this repo's training and inference paths, against the
loop that typical distillation repos run, side by side on this machine.

    python3 bench.py                                   # generated CIFAR-shaped data
    python3 bench.py --data-dir data/cifar10-jpeg      # real images (any cifar10 source)
    python3 bench.py --quick                           # a smoke run: under a minute on 2 CPU cores
    python3 bench.py --profile                         # and each path's time per kind of operator
    python3 bench.py --latency                         # inference latency only, in PyTorch and ONNX Runtime
    python3 bench.py --precision --dataset folder --data-dir data/digits --train-args "--epochs 4 --val-size 400"

ours: the repo's path. The dataset is one uint8 tensor on the device, batches
are augmented all at once (random crop, flip) and normalised there, with
channels_last, bf16 autocast where the hardware has it (--amp), and
torch.compile if asked (--compile).
conventional: a torch.utils.data.DataLoader over a per-sample Dataset with
torchvision transforms (RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor, Normalize), as many workers as cores, float32, NCHW; the same
models, batch size, optimiser and loss.

Both train the same objectives from distill.py. Timings exclude warm-up steps
and wait for the device before the clock stops. The figures go to a table and
to a JSON file (--out).

--profile adds where the time of each step goes: torch.profiler (CPU) over
the teacher's and the distilled training steps and the teacher's inference,
each operator's own time summed into parts (convolution forward and backward,
GELU, max-pool, batch norm, zeroing, the augmentation's gather, the
optimiser, other), as shares of the profiled operator time.

--latency measures instead where a distilled student is deployed: the teacher
and the student as export.py ships them (uint8 in, probabilities out, no
TTA), in PyTorch eager (float32) and in ONNX Runtime, with one thread and with
all cores: batch-1 latency (median and p90 of 200 calls after 20 warm-up
calls) and batch-256 throughput (median of 5 batches after one). Speed does
not depend on the weights, so the networks are fresh ones (10 classes,
3x32x32 images).

--precision asks whether bf16 earns its place on this machine: train.py runs
the whole pipeline for each of --seeds twice, with --amp bf16 and --amp off,
on the data given, and the table gives each stage's test accuracy in both,
the paired difference (mean and standard deviation over the seeds), the
lowest validation accuracy after the first epoch (a collapse shows there)
and the training speed-up.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import checkpoint
import config
import data
import datafiles
import distill
import models
import optim
import report
import runtime


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="few steps per path: a smoke test, not a measurement")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per path (after 3 warm-up steps)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the conventional loop"
    )
    parser.add_argument(
        "--out", default=None, help="JSON file for the results (default: OUT_DIR/bench.json, or OUT_DIR/latency.json)"
    )
    parser.add_argument(
        "--latency",
        action="store_true",
        help="only inference latency and throughput, in PyTorch eager and ONNX Runtime",
    )
    parser.add_argument("--profile", action="store_true", help="also each path's time per kind of operator (CPU)")
    parser.add_argument("--precision", action="store_true", help="train.py's accuracy and speed in bf16 and float32")
    parser.add_argument("--seeds", default="0,1,2", help="--precision: the seeds, each trained in both precisions")
    parser.add_argument("--train-args", default="", help='--precision: more train.py flags, e.g. "--epochs 4"')


class PerSampleDataset(torch.utils.data.Dataset):
    """What CIFAR repos do: one PIL image at a time through torchvision transforms."""

    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8, as torchvision's CIFAR10 holds it
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return self.transform(image), self.labels[index]


def conventional_loader(images, labels, mean, std, batch_size, workers, train):
    augment = [T.RandomCrop(images.shape[-1], padding=4), T.RandomHorizontalFlip()] if train else []
    transform = T.Compose([*augment, T.ToTensor(), T.Normalize(mean, std)])
    return torch.utils.data.DataLoader(
        PerSampleDataset(images, labels, transform),
        batch_size=batch_size,
        shuffle=train,
        num_workers=workers,
        drop_last=train,
        persistent_workers=False,
        pin_memory=False,
    )


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_loop(run_step, batches, steps, device, warmup=3):
    """Images per second of run_step over `steps` batches after `warmup` ones."""
    iterator = iter(batches)
    for _ in range(warmup):
        run_step(*next(iterator))
    synchronize(device)
    start = time.perf_counter()
    seen = 0
    for _ in range(steps):
        images, labels = next(iterator)
        run_step(images, labels)
        seen += len(labels)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def make_train_step(objective, cfg, autocast, device):
    optimizer = optim.make_optimizer(objective, cfg, cfg["LR"][0])
    objective.train()
    forward = torch.compile(objective) if cfg["COMPILE"] else objective

    def run_step(images, labels):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            loss, _ = forward(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run_step


def make_inference_step(model, autocast, device):
    model.eval()

    @torch.no_grad()
    def run_step(images, labels):
        with autocast():
            model(images.to(device, non_blocking=True))

    return run_step


def stage_objective(stage, cfg, dataset, device):
    """The objective train.py builds for `stage`, with an untrained teacher (the speed is the same)."""
    name = cfg["TEACHER"] if stage == "teacher" else cfg["STUDENT"]
    teacher = models.build(cfg["TEACHER"], len(dataset.classes), dataset.in_channels) if stage == "distilled" else None
    return distill.build_objective(cfg, name, dataset, device, teacher)


def peak_gflops(device, autocast, memory_format):
    """GFLOP/s of one large 3x3 convolution (256 to 256 channels, 16x16, batch
    64), forward only: about the best this device does on the convolutions
    these nets are made of (not the hardware's limit). A path's FLOPs per
    image at that rate give the images per second it could reach with no
    overhead at all, whatever the loop around it."""
    repeats = 50 if device.type == "cuda" else 5  # a GPU runs it in well under a millisecond
    images = torch.randn(64, 256, 16, 16, device=device).contiguous(memory_format=memory_format)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device, memory_format=memory_format)
    with torch.no_grad(), autocast():
        for _ in range(2):
            conv(images)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            conv(images)
        synchronize(device)
    flops = 2 * 64 * 256 * 16 * 16 * 256 * 9 * repeats
    return flops / (time.perf_counter() - start) / 1e9


def flops_per_image(model, in_channels, size, train):
    """FLOPs of one image's forward (and backward, if train) by torch's flop counter."""
    model = models.build(model, 10, in_channels)
    images = torch.randn(2, in_channels, size, size)
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            model.train()
            model(images).sum().backward()
        else:
            model.eval()
            with torch.no_grad():
                model(images)
    return counter.get_total_flops() / 2


def generated_dataset(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return data.Data(
        images,
        labels,
        images[:0],
        labels[:0],
        images[: n // 4],
        labels[: n // 4],
        [str(i) for i in range(10)],
        (0.5,) * 3,
        (0.25,) * 3,
        "generated",
    )


def output_file(cfg, name):
    """Where the results go (--out, else OUT_DIR/name), checked before any
    measuring: a path that cannot be written fails now, not after the benchmark."""
    flag = "out" if cfg["out"] else "out-dir"
    out = Path(cfg["out"] or Path(cfg["OUT_DIR"]) / name)
    if out.is_dir():
        config.fail(flag, f"{out} is a folder; give a file name, such as {out / name}")
    if reason := checkpoint.unwritable(out.parent):
        config.fail(flag, f"cannot write to {out.parent} ({reason}); choose a writable --{flag}")
    return out


def latency(cfg, out):
    """The --latency section: teacher and student, eager and ONNX Runtime, one thread and all cores."""
    networks = {"teacher": models.build(cfg["TEACHER"], 10), "student": models.build(cfg["STUDENT"], 10)}
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    machine = report.device_name(torch.device("cpu"))
    print(f"latency: {cfg['TEACHER']} (teacher) and {cfg['STUDENT']} (student) as export.py ships them without TTA, "
          f"float32, on {machine} (native bf16: {'yes' if native_bf16 else 'no'}), torch {torch.__version__}, "
          f"{report.engine_name()}")  # fmt: skip
    figures = report.latency_table(networks, 3, 32)
    print(f"\n{report.latency_markdown(figures)}")
    for engine in ("eager", "onnxruntime"):
        ratio = figures["student"][engine][1]["latency_ms"] / figures["teacher"][engine][1]["latency_ms"]
        print(f"student / teacher, {'ONNX Runtime' if engine == 'onnxruntime' else 'PyTorch eager'}, batch 1, "
              f"1 thread: latency {ratio:.2f}x ({1 / ratio:.1f} times as fast)")  # fmt: skip
    result = {"device": machine, "native_bf16": native_bf16, "torch": torch.__version__, "engine": report.engine_name(),
              "teacher": cfg["TEACHER"], "student": cfg["STUDENT"], "latency": figures}  # fmt: skip
    datafiles.atomic_write(out, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    print(f"\nwrote {out}")


BENCH_SETTINGS = ["DATASET", "DATA_DIR", "OUT_DIR", "TEACHER", "STUDENT", "METHOD", "BATCH_SIZE", "DEVICE", "OPTIMIZER",
                  "LR", "AMP", "CHANNELS_LAST", "COMPILE", "THREADS", "SEED"]  # fmt: skip


def load_images(cfg, needed):
    """The dataset of DATA_DIR when that folder exists, else generated images.
    A folder without the dataset, or whose data cannot be read, fails now, in
    one line: measuring on other images would pass off figures that are not
    the folder's. As in train.py, the bundled CIFAR-10 stands in for the
    default folder alone."""
    if not Path(cfg["DATA_DIR"]).is_dir():
        return generated_dataset(needed)
    try:
        folder = Path(cfg["OUT_DIR"]) / cfg["DATASET"]
        fallback = Path(cfg["DATA_DIR"]) == Path(config.DATA_DIR)
        return data.load(cfg["DATASET"], cfg["DATA_DIR"], [folder], val_size=0, download=False, fallback=fallback)
    except datafiles.DataError as error:
        config.fail("data-dir", str(error))


def training_rows(cfg, dataset, cpu_data, device, steps, autocast):
    """Images per second of each stage's training, ours and conventional, with the FLOPs per image."""
    fp32 = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731
    generator = torch.Generator(device=device).manual_seed(cfg["SEED"])
    rows = {}
    for stage in ("teacher", "student", "distilled"):
        order = torch.randperm(len(dataset.train_y), device=device, generator=generator)
        batches = data.train_batches(dataset, order, cfg["BATCH_SIZE"], 4, True, generator, cfg["CHANNELS_LAST"])
        ours_step = make_train_step(stage_objective(stage, cfg, dataset, device), cfg, autocast, device)
        ours = time_loop(ours_step, batches, steps, device)
        loader = conventional_loader(*cpu_data, dataset.mean, dataset.std, cfg["BATCH_SIZE"], cfg["workers"], True)
        nchw = stage_objective(stage, {**cfg, "CHANNELS_LAST": False}, dataset, device)
        conventional = time_loop(make_train_step(nchw, cfg, fp32, device), loader, steps, device)
        trained = cfg["TEACHER"] if stage == "teacher" else cfg["STUDENT"]
        flops = flops_per_image(trained, dataset.in_channels, dataset.image_size, train=True)
        if stage == "distilled":
            flops += flops_per_image(cfg["TEACHER"], dataset.in_channels, dataset.image_size, train=False)
        rows[f"{stage} training"] = {"ours": ours, "conventional": conventional, "flops_per_image": flops}
        print(f"  {stage} training: ours {ours:,.0f} img/s, conventional {conventional:,.0f} img/s", flush=True)
    return rows


def inference_batches(cfg, dataset):
    """Normalised batches of 256 training images, as inference sees them."""
    for i in range(0, len(dataset.train_y) - 255, 256):
        images = data.normalize(dataset.train_x[i : i + 256], dataset.mean, dataset.std, cfg["CHANNELS_LAST"])
        yield images, dataset.train_y[i : i + 256]


def inference_rows(cfg, dataset, cpu_data, device, steps, autocast):
    """Images per second of the teacher's and the student's inference, ours and conventional."""
    fp32 = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731
    ours_format = torch.channels_last if cfg["CHANNELS_LAST"] else torch.contiguous_format
    rows = {}
    for role in ("teacher", "student"):
        name = cfg[role.upper()]
        model = models.build(name, len(dataset.classes), dataset.in_channels)
        ours_step = make_inference_step(model.to(device, memory_format=ours_format), autocast, device)
        ours = time_loop(ours_step, inference_batches(cfg, dataset), steps, device)
        loader = conventional_loader(*cpu_data, dataset.mean, dataset.std, 256, cfg["workers"], False)
        nchw_step = make_inference_step(model.to(memory_format=torch.contiguous_format), fp32, device)
        conventional = time_loop(nchw_step, loader, steps, device)
        flops = flops_per_image(name, dataset.in_channels, dataset.image_size, train=False)
        rows[f"{role} inference"] = {"ours": ours, "conventional": conventional, "flops_per_image": flops}
        print(f"  {role} inference: ours {ours:,.0f} img/s, conventional {conventional:,.0f} img/s", flush=True)
    return rows


def print_table(rows, peak):
    """The rows as a markdown table, each with its ratios to the conventional loop and to the peak rate."""
    print(
        f"\npeak: {peak:.1f} GFLOP/s (one 256-channel 3x3 convolution); 'at peak' is the most images per second a "
        f"path's FLOPs allow at that rate, and its ratio to the conventional loop the most any loop could gain\n"
    )
    print(
        "| path | ours (img/s) | conventional (img/s) | ours / conventional | GFLOP per image | ours GFLOP/s "
        "| share of peak | at peak (img/s) | at peak / conventional |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for path, row in rows.items():
        row["ratio"] = row["ours"] / row["conventional"]
        row["gflops_per_second"] = row["ours"] * row["flops_per_image"] / 1e9
        row["share_of_peak"] = row["gflops_per_second"] / peak
        row["at_peak"] = peak * 1e9 / row["flops_per_image"]
        row["at_peak_ratio"] = row["at_peak"] / row["conventional"]
        print(
            f"| {path} | {row['ours']:,.0f} | {row['conventional']:,.0f} | {row['ratio']:.2f}x | "
            f"{row['flops_per_image'] / 1e9:.3f} | {row['gflops_per_second']:.1f} | {row['share_of_peak']:.1%} | "
            f"{row['at_peak']:,.0f} | "
            f"{row['at_peak_ratio']:.2f}x |"
        )


def warn_if_busy():
    """After the input checks (a refusal stays one line), before measuring."""
    if busy := report.busy_cpu():
        print(busy, file=sys.stderr)


def main(argv=None):
    cfg = config.parse(argv, __doc__.split("\n\n")[0], names=BENCH_SETTINGS, extra=add_arguments)
    steps = 3 if cfg["quick"] else cfg["steps"]
    if steps < 1:
        config.fail("steps", "must be >= 1")
    if cfg["workers"] < 0:
        config.fail("workers", "must be >= 0")
    if cfg["THREADS"]:
        torch.set_num_threads(cfg["THREADS"])
    out = output_file(cfg, "latency.json" if cfg["latency"] else "precision.json" if cfg["precision"] else "bench.json")
    if cfg["latency"]:
        warn_if_busy()
        return latency(cfg, out)
    if cfg["precision"]:
        return precision(cfg, out)
    device = runtime.device(cfg["DEVICE"])
    runtime.reuse_freed_memory(device)
    batches = max(cfg["BATCH_SIZE"], 256) * (steps + 3)  # 3 warm-up and the timed steps: training, or inference by 256
    needed = batches + 256
    dataset = load_images(cfg, needed)
    if len(dataset.train_y) < batches:
        config.fail("steps", f"{dataset.source} has {len(dataset.train_y):,} training images, too few for 3 warm-up "
                    f"and {steps} timed batches of {max(cfg['BATCH_SIZE'], 256)}; lower --steps (or --batch-size), "
                    f"or give more data")  # fmt: skip
    warn_if_busy()
    cpu_data = dataset.train_x[:needed].cpu(), dataset.train_y[:needed].cpu()
    dataset.train_x, dataset.train_y = dataset.train_x[:needed].to(device), dataset.train_y[:needed].to(device)
    autocast, amp_on = runtime.autocast(device, cfg["AMP"])
    print(
        f"bench: {device} ({torch.get_num_threads()} threads), batch {cfg['BATCH_SIZE']}, {steps} timed steps per "
        f"path, data {dataset.source}, bf16 {'on' if amp_on else 'off'}, channels_last {cfg['CHANNELS_LAST']}, "
        f"compile {cfg['COMPILE']}, {cfg['workers']} loader workers for the conventional loop"
    )
    rows = {**training_rows(cfg, dataset, cpu_data, device, steps, autocast),
            **inference_rows(cfg, dataset, cpu_data, device, steps, autocast)}  # fmt: skip
    peak = peak_gflops(device, autocast, torch.channels_last if cfg["CHANNELS_LAST"] else torch.contiguous_format)
    print_table(rows, peak)
    result = {
        "device": report.device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": cfg["BATCH_SIZE"],
        "steps": steps, "data": dataset.source, "teacher": cfg["TEACHER"], "student": cfg["STUDENT"], "bf16": amp_on,
        "channels_last": cfg["CHANNELS_LAST"], "compile": cfg["COMPILE"], "workers": cfg["workers"],
        "peak_gflops_per_second": peak, "rows": rows,
    }  # fmt: skip
    if cfg["profile"]:
        result["profile"] = profile_paths(cfg, dataset, device, steps, autocast)
    datafiles.atomic_write(out, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    print(f"\nwrote {out}")


# ---------------------------------------------------------------- --profile

PROFILE_PARTS = (  # part -> fragments of operator names (lower case); the first part that matches takes the operator
    ("convolution backward", ("convolution_backward", "convolutionbackward")),
    ("convolution forward", ("convolution", "conv2d")),
    ("GELU", ("gelu",)),
    ("max-pool", ("max_pool", "maxpool")),
    ("batch norm", ("batch_norm", "batchnorm")),
    ("fill_/zeroing", ("fill_", "zero_")),
    ("augmentation gather (take, index)", ("take", "index", "gather")),
    ("optimizer", ("adam", "_foreach", "optimizer")),
)


def group_parts(rows):
    """Shares of each part in the total own time of (operator name, own
    time) rows; what no part claims is "other"."""
    times = dict.fromkeys([part for part, _ in PROFILE_PARTS] + ["other"], 0.0)
    for name, own in rows:
        lower = name.lower()
        part = next((part for part, fragments in PROFILE_PARTS if any(f in lower for f in fragments)), "other")
        times[part] += own
    total = sum(times.values()) or 1.0
    return {part: time / total for part, time in times.items()}


def profile_step(run_step, batches, steps):
    """{"step_ms", "parts"}: torch.profiler over `steps` calls of run_step after 3 warm-up ones."""
    iterator = iter(batches)
    for _ in range(3):
        run_step(*next(iterator))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            run_step(*next(iterator))
        step_ms = (time.perf_counter() - start) / steps * 1e3
    rows = [(event.key, event.self_cpu_time_total) for event in profiler.key_averages()]
    return {"step_ms": step_ms, "parts": group_parts(rows)}


def profile_paths(cfg, dataset, device, steps, autocast):
    """The breakdown of the teacher's and the distilled training steps and the teacher's inference, printed."""
    generator = torch.Generator(device=device).manual_seed(cfg["SEED"])
    order = torch.randperm(len(dataset.train_y), device=device, generator=generator)
    results = {}
    for stage in ("teacher", "distilled"):
        batches = data.train_batches(dataset, order, cfg["BATCH_SIZE"], 4, True, generator, cfg["CHANNELS_LAST"])
        run_step = make_train_step(stage_objective(stage, cfg, dataset, device), cfg, autocast, device)
        results[f"{stage} training"] = profile_step(run_step, batches, steps)
    memory_format = torch.channels_last if cfg["CHANNELS_LAST"] else torch.contiguous_format
    teacher = models.build(cfg["TEACHER"], len(dataset.classes), dataset.in_channels)
    run_step = make_inference_step(teacher.to(device, memory_format=memory_format), autocast, device)
    results["teacher inference"] = profile_step(run_step, inference_batches(cfg, dataset), steps)
    print(f"\nprofile (torch.profiler, CPU, {steps} steps): each part's share of the operators' own time\n")
    print(f"| part | {' | '.join(results)} |\n|---|{'---:|' * len(results)}")
    for part in results["teacher training"]["parts"]:
        shares = " | ".join(f"{r['parts'][part]:.1%}" for r in results.values())
        print(f"| {part} | {shares} |")
    step_ms = " | ".join(f"{r['step_ms']:.1f}" for r in results.values())
    print(f"| step (ms, profiled) | {step_ms} |")
    return results


# ---------------------------------------------------------------- --precision


def train_run(cfg, seed, amp, folder):
    """One train.py pipeline in a fresh folder; its results.json, or a one-line failure."""
    args = ["--dataset", cfg["DATASET"], "--data-dir", cfg["DATA_DIR"], "--out-dir", str(folder), "--seed", str(seed),
            "--amp", amp, "--teacher", cfg["TEACHER"], "--student", cfg["STUDENT"], "--method", cfg["METHOD"],
            "--threads", str(cfg["THREADS"]), "--fresh", "--no-compression-report",  # speed is what it measures
            *shlex.split(cfg["train_args"])]  # fmt: skip
    script = Path(__file__).resolve().parent / "train.py"
    log = folder / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        done = subprocess.run([sys.executable, str(script), *args], stdout=output, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"bench.py: error: train.py {shlex.join(args)} failed: {tail[0]} (log: {log})")
    trained = folder / config.output_name(cfg["DATASET"], cfg["DATA_DIR"])
    results = json.loads((trained / "results.json").read_text())
    for stage, row in results["stages"].items():
        lines = (trained / f"{stage}.jsonl").read_text().splitlines()
        later = [json.loads(line)["val_acc"] for line in lines[1:]]
        row["lowest_later_val_acc"] = min((v for v in later if v is not None), default=None)
    return results["stages"]


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def precision_rows(runs, seeds):
    """Per stage: test accuracy in each precision, the paired difference, the
    lowest later validation accuracy and the training speed-up."""
    rows = {}
    for stage in runs["off"][seeds[0]]:
        bf16, fp32 = ([runs[amp][s][stage] for s in seeds] for amp in ("bf16", "off"))
        seconds = {amp: sum(r["train_seconds"] for r in rs) for amp, rs in (("bf16", bf16), ("off", fp32))}
        lowest = [r["lowest_later_val_acc"] for r in bf16 if r["lowest_later_val_acc"] is not None]
        rows[stage] = {
            "float32": mean_std([100 * r["test_acc"] for r in fp32]),
            "bf16": mean_std([100 * r["test_acc"] for r in bf16]),
            "difference": mean_std([100 * (b["test_acc"] - f["test_acc"]) for b, f in zip(bf16, fp32)]),
            "bf16_lowest_later_val_acc": 100 * min(lowest) if lowest else None,
            "speedup": seconds["off"] / seconds["bf16"],
        }
    return rows


def precision_markdown(rows, seeds):
    lines = [
        f"| stage | float32 test | bf16 test | bf16 - float32 (points, {len(seeds)} paired seeds) | bf16: lowest val "
        "after epoch 1 | bf16 speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage, row in rows.items():
        fp32, bf16, diff = (row[k] for k in ("float32", "bf16", "difference"))
        lowest = "n/a" if row["bf16_lowest_later_val_acc"] is None else f"{row['bf16_lowest_later_val_acc']:.2f}%"
        lines.append(f"| {stage} | {fp32[0]:.2f} ± {fp32[1]:.2f}% | {bf16[0]:.2f} ± {bf16[1]:.2f}% | {diff[0]:+.2f} ± "
                     f"{diff[1]:.2f} | {lowest} | {row['speedup']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def precision(cfg, out):
    """The --precision section: every seed's pipeline in bf16 and in float32, paired."""
    try:
        seeds = [int(s) for s in cfg["seeds"].split(",")]
    except ValueError:
        config.fail("seeds", f"{cfg['seeds']!r} is not a comma-separated list of integers")
    warn_if_busy()
    machine = report.device_name(torch.device("cpu"))
    print(f"precision: {cfg['DATASET']} from {cfg['DATA_DIR']}, seeds {cfg['seeds']}, train.py {cfg['train_args']}, "
          f"on {machine}; each run's output goes to its train.log")  # fmt: skip
    runs = {"bf16": {}, "off": {}}
    for seed in seeds:
        for amp in runs:
            folder = out.parent / "precision" / f"{amp}-seed{seed}"
            started = time.perf_counter()
            runs[amp][seed] = train_run(cfg, seed, amp, folder)
            accuracies = ", ".join(f"{stage} {row['test_acc']:.2%}" for stage, row in runs[amp][seed].items())
            print(f"seed {seed}, --amp {amp}: {accuracies} ({time.perf_counter() - started:.0f} s)", flush=True)
    rows = precision_rows(runs, seeds)
    print(f"\n{precision_markdown(rows, seeds)}")
    result = {"device": machine, "torch": torch.__version__, "dataset": cfg["DATASET"], "data_dir": cfg["DATA_DIR"],
              "train_args": cfg["train_args"], "seeds": seeds, "rows": rows, "runs": runs}  # fmt: skip
    checkpoint.atomic_write(out, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
