"""What a run reports besides accuracy: compute, speed where the model will
run, the compression report, training curves, and where the numbers came from.

- MACs per image, counted by torch.utils.flop_counter (FLOPs / 2).
- Latency at batch 1 (median and p90 of single calls, after warm-up) and
  throughput at batch 256, in ONNX Runtime and in PyTorch eager, with a given
  number of threads. What is timed is what export.py ships, without flip
  TTA: uint8 images in, normalisation, the network, probabilities out (TTA
  doubles the cost of a call).
- The compression report of train.py: teacher, student and distilled side by
  side, and the student's ratios to the teacher.
- curves.png, drawn from the <stage>.jsonl logs.
- The run's provenance: seed, git commit, torch version, device, bf16.
"""

import contextlib
import copy
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import export
import models
from checkpoint import build_model
from checkpoint import load as load_checkpoint
from datafiles import atomic_write

STAGE_COLOURS = {"teacher": "tab:blue", "student": "tab:orange", "distilled": "tab:green"}
CURVES_SIZE = (10, 4)  # inches: with CURVES_DPI, curves.png is 1000 x 400 pixels
CURVES_DPI = 100
LATENCY_CALLS = 200  # timed batch-1 calls, after LATENCY_WARMUP untimed ones
LATENCY_WARMUP = 20
THROUGHPUT_BATCH = 256
THROUGHPUT_REPEATS = 5  # timed batches, after one untimed


# ---------------------------------------------------------------- compute and speed


@torch.no_grad()
def macs_per_image(model, in_channels, image_size):
    """Multiply-accumulates of one image's forward pass in eval mode: torch's
    FLOP counter counts convolutions and matrix products (2 FLOPs per MAC);
    norms, activations and pooling are not counted."""
    model = copy.deepcopy(model).float().cpu().eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, in_channels, image_size, image_size))
    return counter.get_total_flops() // 2


def deployable(model, in_channels):
    """The network as export.py ships it without TTA, in float32 on the CPU.
    The normalisation constants do not change the cost, so any will do."""
    return export.Deployable(copy.deepcopy(model).float().cpu(), (0.5,) * in_channels, (0.25,) * in_channels, tta=False)


@contextlib.contextmanager
def torch_threads(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def call_seconds(run, example, calls, warmup):
    """Wall time of each of `calls` calls of run(example), after `warmup` untimed ones."""
    for _ in range(warmup):
        run(example)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(example)
        times.append(time.perf_counter() - start)
    return times


def speed(module, in_channels, image_size, engine, threads, onnx_path=None, batch1=True, batch256=True):
    """Batch-1 latency (median and p90, ms) and batch-256 throughput (images/s)
    of `module` (a Deployable) in `engine` ("onnxruntime", from the file at
    `onnx_path`, or "eager") with `threads` threads. Inputs are made before
    the clock starts; a call includes handing the input over and getting the
    probabilities back."""
    generator = torch.Generator().manual_seed(0)
    single = torch.randint(0, 256, (1, in_channels, image_size, image_size), dtype=torch.uint8, generator=generator)
    batch = torch.randint(
        0, 256, (THROUGHPUT_BATCH, in_channels, image_size, image_size), dtype=torch.uint8, generator=generator
    )
    if engine == "onnxruntime":
        session = export.onnx_session(onnx_path, threads)
        run = lambda images: session.run(None, {"images": images})  # noqa: E731
        single, batch = single.numpy(), batch.numpy()
        context = contextlib.nullcontext()
    else:
        run = module.to(memory_format=torch.channels_last)  # this repo's layout: faster convolutions on CPU
        context = torch_threads(threads)
    result = {}
    with context, torch.inference_mode():
        if batch1:
            times = sorted(call_seconds(run, single, LATENCY_CALLS, LATENCY_WARMUP))
            result["latency_ms"] = statistics.median(times) * 1000
            result["latency_p90_ms"] = times[int(0.9 * len(times))] * 1000
        if batch256:
            result["throughput"] = THROUGHPUT_BATCH / statistics.median(call_seconds(run, batch, THROUGHPUT_REPEATS, 1))
    return result


def all_cores():
    return os.cpu_count() or 1


def latency_table(networks, in_channels, image_size):
    """Every network of {name: model} in eager PyTorch and ONNX Runtime, with
    one thread and with all cores: {name: {engine: {threads: speed}}}."""
    figures = {}
    settings = [(engine, threads) for engine in ("eager", "onnxruntime") for threads in sorted({1, all_cores()})]
    with tempfile.TemporaryDirectory() as folder:
        bar = tqdm(total=len(networks) * len(settings), desc="latency", unit="setting", leave=False, disable=None)
        for name, model in networks.items():
            module = deployable(model, in_channels)
            onnx_path = Path(folder) / f"{name}.onnx"
            export.write_onnx(module, torch.zeros(2, in_channels, image_size, image_size, dtype=torch.uint8), onnx_path)
            for engine, threads in settings:
                figures.setdefault(name, {}).setdefault(engine, {})[threads] = speed(
                    module, in_channels, image_size, engine, threads, onnx_path
                )
                bar.update()
        bar.close()
    return figures


def latency_markdown(figures):
    lines = [
        "| network | engine | threads | batch 1: median | batch 1: p90 | batch 256 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, engines in figures.items():
        for engine, by_threads in engines.items():
            for threads, s in by_threads.items():
                label = "ONNX Runtime" if engine == "onnxruntime" else "PyTorch eager"
                lines.append(
                    f"| {name} | {label} | {threads} | {s['latency_ms']:.3f} ms | {s['latency_p90_ms']:.3f} ms "
                    f"| {throughput_text(s)} |"
                )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the compression report


def report_speed(module, in_channels, image_size, engine, onnx_path=None):
    """How the compression report times a network in `engine`: batch-1 latency
    with one thread, batch-256 throughput with all cores."""
    return {
        **speed(module, in_channels, image_size, engine, 1, onnx_path, batch256=False),
        **speed(module, in_channels, image_size, engine, all_cores(), onnx_path, batch1=False),
    }


def error_text(error):
    """An exception in one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def compression(networks, in_channels, image_size):
    """The compression report of a run. networks: {stage: (model name, model,
    checkpoint path, test accuracy)}. Each architecture is timed once (the
    student and the distilled student are one network, and their speeds must
    not differ by the machine's noise) in PyTorch (under "pytorch") and,
    exported, in ONNX Runtime. An export that fails (an op the exporter cannot
    convert) leaves that network's ONNX Runtime figures out, with the reason in
    "onnx_error": the report comes after training, and keeps what it can."""
    rows, measured, onnx_error = {}, {}, None
    with tempfile.TemporaryDirectory() as folder:
        for stage, (name, model, path, test_acc) in tqdm(
            networks.items(), desc="compression report", leave=False, disable=None
        ):
            if name not in measured:
                module = deployable(model, in_channels)
                onnx_path = Path(folder) / f"{name}.onnx"
                try:
                    export.write_onnx(
                        module, torch.zeros(2, in_channels, image_size, image_size, dtype=torch.uint8), onnx_path
                    )
                except Exception as error:
                    onnx_error, onnx_path = onnx_error or error_text(error), None
                measured[name] = {
                    "macs": macs_per_image(model, in_channels, image_size),
                    **(report_speed(module, in_channels, image_size, "onnxruntime", onnx_path) if onnx_path else {}),
                    "pytorch": report_speed(module, in_channels, image_size, "eager"),
                }
            rows[stage] = {
                "model": name,
                "params": models.count_params(model),
                "checkpoint_bytes": Path(path).stat().st_size,
                "test_acc": test_acc,
                **measured[name],
            }
    return {
        "rows": rows,
        "student_vs_teacher": ratios(rows),
        "engine": engine_name(),
        "onnx_error": onnx_error,
        "latency_threads": 1,
        "throughput_threads": all_cores(),
    }


def ratios(rows):
    """The student's size, MACs and ONNX Runtime latency (where both were
    measured) over the teacher's, and the points of test accuracy the student
    alone loses and distillation wins back."""
    teacher, student = rows.get("teacher"), rows.get("student") or rows.get("distilled")
    if teacher is None or student is None:
        return None
    keys = [key for key in ("checkpoint_bytes", "macs", "latency_ms") if key in student and key in teacher]
    out = {key: student[key] / teacher[key] for key in keys}
    if "student" in rows:
        out["accuracy_lost_points"] = 100 * (teacher["test_acc"] - rows["student"]["test_acc"])
        if "distilled" in rows:
            out["accuracy_won_back_points"] = 100 * (rows["distilled"]["test_acc"] - rows["student"]["test_acc"])
    return out


def engine_name():
    import onnxruntime

    return f"ONNX Runtime {onnxruntime.__version__}"


def size_text(size):
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def latency_text(figures):
    return f"{figures['latency_ms']:.3f} / {figures['latency_p90_ms']:.3f} ms"


def throughput_text(figures):
    return f"{figures['throughput']:,.0f} img/s"


def compression_markdown(report):
    """The report as a markdown table and its last line."""
    threads = report["throughput_threads"]
    lines = [
        f"| stage | model | params | MACs per image | checkpoint | test accuracy | ONNX Runtime latency, batch 1, "
        f"1 thread (median / p90) | in PyTorch | ONNX Runtime throughput, batch 256, {threads} threads | in PyTorch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, row in report["rows"].items():
        exported = "latency_ms" in row  # not where exporting to ONNX failed
        lines.append(
            f"| {stage} | {row['model']} | {row['params']:,} | {row['macs'] / 1e6:,.2f} M "
            f"| {size_text(row['checkpoint_bytes'])} | {row['test_acc']:.2%} "
            f"| {latency_text(row) if exported else 'n/a'} | {latency_text(row['pytorch'])} "
            f"| {throughput_text(row) if exported else 'n/a'} | {throughput_text(row['pytorch'])} |"
        )
    r = report["student_vs_teacher"]
    text = "\n".join(lines) + "\n"
    if r is not None:
        text += f"\nStudent / teacher: checkpoint {r['checkpoint_bytes']:.2f}x, MACs {r['macs']:.2f}x"
        if "latency_ms" in r:
            text += f", ONNX Runtime latency {r['latency_ms']:.2f}x ({1 / r['latency_ms']:.1f} times as fast)"
        if "accuracy_lost_points" in r:
            lost = r["accuracy_lost_points"]
            text += (
                f"; the student alone loses {lost:.2f} points of test accuracy"
                if lost >= 0
                else f"; the student alone is {-lost:.2f} points of test accuracy above the teacher"
            )
        if "accuracy_won_back_points" in r:
            won = r["accuracy_won_back_points"]
            text += f", distillation wins back {won:.2f}" if won >= 0 else f", distillation loses {-won:.2f} more"
        text += ".\n"
    if report["onnx_error"]:
        text += f"\nONNX Runtime figures n/a: exporting to ONNX failed ({report['onnx_error']}).\n"
    return text + (
        f"\n{report['engine']} and PyTorch {torch.__version__} (eager, float32, channels_last), the network as "
        f"exported, without TTA (uint8 in, probabilities out), {threads} CPU cores.\n"
    )


def measured_compression(summary, checkpoints, in_channels, image_size, loaded):
    """The compression report of write_results and its markdown; a failure is reported, not raised."""
    networks = {
        stage: (
            row["model"],
            loaded[stage] if stage in loaded else build_model(load_checkpoint(checkpoints[stage])),
            checkpoints[stage],
            row["test_acc"],
        )
        for stage, row in summary["stages"].items()
    }
    print("measuring the compression report in PyTorch and ONNX Runtime...")
    try:
        report = compression(networks, in_channels, image_size)
    except Exception as error:  # the report comes after training: a failure here must not lose the results
        report = {"error": error_text(error)}
        print(f"warning: compression report skipped ({report['error']}); results are written without it",
              file=sys.stderr)  # fmt: skip
        return report, f"Not measured: the compression report failed ({report['error']}).\n"
    if report["onnx_error"]:
        print(f"warning: exporting to ONNX failed ({report['onnx_error']}); the compression report has no ONNX "
              f"Runtime figures", file=sys.stderr)  # fmt: skip
    text = compression_markdown(report)
    print(f"\n{text}")
    return report, text


def write_results(out_dir, title, table, summary, checkpoints, in_channels, image_size, loaded, measure=True):
    """Print the compression report (unless not `measure`d) and write
    results.md and results.json: train.py's table and summary (whose
    "stages" are the rows), the compression report, the curves and the run
    (summary["run"]). checkpoints: {stage: file}; loaded: {stage: model} for
    files that are not checkpoints of this repo (a teacher brought with
    --teacher-checkpoint)."""
    if measure:
        report, text = measured_compression(summary, checkpoints, in_channels, image_size, loaded)
    else:
        report = {"skipped": "COMPRESSION_REPORT is False"}
        text = "Not measured: COMPRESSION_REPORT is off (`--no-compression-report`).\n"
    atomic_write(
        Path(out_dir) / "results.md",
        lambda path: path.write_text(
            f"# {title}\n\n{table}\n## Compression\n\n{text}\n## Training curves\n\n![training curves](curves.png)\n\n"
            f"## Run\n\n{run_markdown(summary['run'])}"
        ),
    )
    atomic_write(Path(out_dir) / "results.json", lambda path: path.write_text(
        json.dumps({**summary, "compression": report}, indent=2) + "\n"))  # fmt: skip


# ---------------------------------------------------------------- the results of a run

CODE = ("git_commit", "git_dirty", "git_diff")  # what a record says of the code that made it


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
        return commit_text(m["git_commit"], m["git_dirty"], m["git_diff"])

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


def results_text(rows, num_classes, left_out):
    """The results table of a run (rows: each stage's metrics, with "kept"),
    and the lines under it: where the data came from, which stages were kept
    from earlier runs or resumed under other code, which were left out, and
    the warnings of epochs whose validation collapsed."""
    warnings = "".join(f"{warning}\n" for m in rows.values() for warning in m["warnings"])
    lines = data_sources(rows) + provenance_lines(rows) + left_out_line(left_out) + warnings
    return results_table(rows, num_classes), lines


def write_run(cfg, plan, results, out_dir, dataset, run):
    """curves.png, results.md and results.json of a train.py run: the stages
    side by side (results: {stage: metrics}; those kept from earlier runs
    marked), the distillation's gain, the rows of `plan` (plan.make's), the
    compression report, the curves and `run` (run_info)."""
    draw_curves(out_dir, [stage for stage in plan.rows if stage in results])
    rows = {stage: {**results[stage], "kept": row.saved is not None} for stage, row in plan.rows.items()
            if stage in results}  # fmt: skip
    table, sources = results_text(rows, len(dataset.classes), plan.left_out())
    print(f"\nresults ({cfg['DATASET']}, test accuracy{' with flip TTA' if cfg['TTA'] else ''}):\n{table}\n"
          f"{sources}")  # fmt: skip
    summary = {"dataset": cfg["DATASET"], "stages": rows, "distillation_gain": distillation_gain(rows),
               "left_out": plan.left_out(), "plan": plan.records(),
               "run": run}  # fmt: skip
    brought = cfg["TEACHER_CHECKPOINT"]
    files = {stage: Path(brought) if stage == "teacher" and brought else out_dir / f"{stage}.pt" for stage in rows}
    write_results(out_dir, cfg["DATASET"], f"{table}\n{sources}\n## Plan\n\n{plan.markdown()}", summary, files,
                  dataset.in_channels, dataset.image_size, {"teacher": plan.teacher[0]} if brought else {},
                  cfg["COMPRESSION_REPORT"])  # fmt: skip


def code_of(record):
    """The code that a log record or an epoch's running sums name."""
    return {key: record[key] for key in CODE}


def earlier_code(log, this_code):
    """Runs of consecutive epochs of a resumed stage trained by code other than
    `this_code`, as [{git_commit, git_dirty, git_diff, first_epoch, last_epoch}].
    An epoch stopped part-way counts for the code on either side of the stop."""
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
    return [{**code, "first_epoch": first, "last_epoch": last} for code, first, last in runs if code != this_code]


# ---------------------------------------------------------------- training curves


def curve_series(out_dir, stages):
    """{stage: {"epoch", "loss", "val_acc"}} read from the <stage>.jsonl logs
    in out_dir, for the stages that have one."""
    series = {}
    for stage in stages:
        path = Path(out_dir) / f"{stage}.jsonl"
        if not path.exists():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        series[stage] = {key: [r[key] for r in records] for key in ("epoch", "loss", "val_acc")}
    return series


def draw_curves(out_dir, stages):
    """Draw out_dir/curves.png: training loss and validation accuracy per
    epoch, one colour per stage. Returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=CURVES_SIZE, dpi=CURVES_DPI)
    FigureCanvasAgg(figure)  # the Agg backend, without pyplot's global state
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    validated = False
    for stage, series in curve_series(out_dir, stages).items():
        colour = STAGE_COLOURS[stage]
        loss_axes.plot(series["epoch"], series["loss"], marker="o", color=colour, label=stage)
        points = [(e, 100 * a) for e, a in zip(series["epoch"], series["val_acc"]) if a is not None]
        if points:
            accuracy_axes.plot(*zip(*points), marker="o", color=colour, label=stage)
            validated = True
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="training loss (each stage's own objective)")
    accuracy_axes.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy")
    if not validated:
        accuracy_axes.text(
            0.5, 0.5, "no validation split (--val-size 0)", ha="center", va="center", transform=accuracy_axes.transAxes
        )
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_lines():
            axes.legend()
    figure.tight_layout()
    atomic_write(Path(out_dir) / "curves.png", lambda path: figure.savefig(path, format="png"))
    return figure


# ---------------------------------------------------------------- provenance


def git_commit(folder=None):
    """(commit, whether tracked files differ from it, a digest of the
    difference or None) of the checkout holding `folder` (default: this
    code's), or (None, None, None) outside one. The digest tells apart two
    runs of one commit with different uncommitted changes."""

    def git(*args):
        cwd = folder or Path(__file__).resolve().parent
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None, None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        diff = hashlib.sha256(git("diff", "HEAD", "--binary").stdout.encode()).hexdigest()[:12] if dirty else None
        return head.stdout.strip(), dirty, diff
    except (OSError, subprocess.TimeoutExpired):
        return None, None, None


def device_name(device):
    """The GPU's name, or the CPU's with its core count and kind (which sets
    bf16's cost), and the kernels the environment sets: a run on an AMX CPU
    held to AVX2 kernels is not an AMX run."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        models = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
        name = models[0].strip() if models else name
    return f"{name}, {all_cores()} cores, {cpu_kind()}" + "".join(f", {limit}" for limit in kernel_limits())


def kernel_limits():
    """The environment's hold on torch's CPU kernels: ATen's vector width as
    torch applies it (it ignores a value it does not know, AVX2 in capitals
    among them), and oneDNN's ISA ceiling as set."""
    limits = []
    if aten := os.environ.get("ATEN_CPU_CAPABILITY"):
        limits.append(f"ATen {torch.backends.cpu.get_cpu_capability()} kernels (ATEN_CPU_CAPABILITY={aten})")
    limits += [
        f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if os.environ.get(name)
    ]
    return limits


def busy_cpu():
    """A warning line when other processes already keep the CPU busy (a
    1-minute load average of half the cores or more), else None: torch's
    threads then wait for one another, and timings mean little."""
    load, cores = os.getloadavg()[0], all_cores()
    if load < cores / 2:
        return None
    return (f"warning: the CPU is busy before measuring (load average {load:.1f} on {cores} cores): other "
            f"processes disturb these figures; measure alone, or pass --threads 1")  # fmt: skip


def cpu_kind():
    """What decides bf16's cost on this CPU: AMX, AVX-512 BF16, or neither
    (bf16 then runs on slow reference kernels)."""
    flags = set()
    with contextlib.suppress(OSError):
        flags = set(re.findall(r"\w+", Path("/proc/cpuinfo").read_text()))
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX-512 BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags else "no native bf16"


def commit_text(commit, dirty, diff=None):
    """A commit for results.md: `commit 0123456789ab`, with a note of uncommitted changes and their digest."""
    if commit is None:
        return "an unknown commit"
    return f"commit `{commit[:12]}`" + (" with uncommitted changes" if dirty else "") + (f" `{diff}`" if diff else "")


def run_markdown(run):
    commit = (
        "not a git checkout"
        if run["git_commit"] is None
        else commit_text(run["git_commit"], run["git_dirty"], run["git_diff"])
    )
    return (
        f"Seed {run['seed']}, {commit}, torch {run['torch']}, {run['device']} ({run['device_name']}), "
        f"bf16 {'on' if run['bf16'] else 'off'}.\n"
    )


def run_info(seed, device, bf16, git):
    """The run's provenance; `git` is git_commit()'s answer as the run started
    (train.py reads it first thing, so that a commit made while it trains is not its code)."""
    commit, dirty, diff = git
    return {
        "seed": seed,
        "git_commit": commit,
        "git_dirty": dirty,
        "git_diff": diff,
        "torch": torch.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "bf16": bf16,
    }
