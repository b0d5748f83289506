"""What a run reports: MACs against a hand count, the latency figures' form,
the compression report, curves.png and the run's provenance."""

import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

import bench
import models
import report
from conftest import FAST, ROOT, run_script, write_cifar10

STAGES = ("teacher", "student", "distilled")


def test_macs_of_airnet_xs_match_a_hand_count():
    # output pixels x output channels x (input channels x kernel area), layer by layer; a 2x2 max-pool
    # follows the first convolution of each stage (31 -> 15 -> 7 -> 3)
    expected = (
        31 * 31 * 24 * (3 * 2 * 2)  # whitening: 2x2, no padding, 3 -> 24 channels (12 filters, both signs)
        + 31 * 31 * 16 * (24 * 9)
        + 15 * 15 * 16 * (16 * 9)  # stage 1: 16 channels
        + 15 * 15 * 32 * (16 * 9)
        + 7 * 7 * 32 * (32 * 9)  # stage 2: 32 channels
        + 7 * 7 * 40 * (32 * 9)
        + 3 * 3 * 40 * (40 * 9)  # stage 3: 40 channels
        + 40 * 10
    )  # the linear head
    assert report.macs_per_image(models.build("airnet_xs", 10), 3, 32) == expected == 6_299_248


def test_ratios_and_the_report_line():
    rows = {
        "teacher": {
            "model": "t",
            "params": 1000,
            "macs": 5e6,
            "checkpoint_bytes": 4e6,
            "test_acc": 0.90,
            "latency_ms": 0.8,
            "latency_p90_ms": 0.9,
            "throughput": 1000.0,
            "pytorch": {"latency_ms": 1.6, "latency_p90_ms": 1.8, "throughput": 500.0},
        },
        "student": {
            "model": "s",
            "params": 100,
            "macs": 1e6,
            "checkpoint_bytes": 4e5,
            "test_acc": 0.80,
            "latency_ms": 0.2,
            "latency_p90_ms": 0.25,
            "throughput": 5000.0,
            "pytorch": {"latency_ms": 0.5, "latency_p90_ms": 0.6, "throughput": 2500.0},
        },
    }
    rows["distilled"] = {**rows["student"], "test_acc": 0.83}
    ratios = report.ratios(rows)
    assert ratios["checkpoint_bytes"] == pytest.approx(0.1) and ratios["macs"] == pytest.approx(0.2)
    assert ratios["latency_ms"] == pytest.approx(0.25)
    assert ratios["accuracy_lost_points"] == pytest.approx(10) and ratios["accuracy_won_back_points"] == pytest.approx(
        3
    )
    text = report.compression_markdown(
        {"rows": rows, "student_vs_teacher": ratios, "engine": "ONNX Runtime x", "onnx_error": None,
         "throughput_threads": 2}
    )  # fmt: skip
    assert len({line.count("|") for line in text.splitlines() if line.startswith("|")}) == 1  # the columns line up
    assert (
        "| student | s | 100 | 1.00 M | 0.40 MB | 80.00% | 0.200 / 0.250 ms | 0.500 / 0.600 ms | 5,000 img/s "
        "| 2,500 img/s |"
    ) in text
    assert (
        "Student / teacher: checkpoint 0.10x, MACs 0.20x, ONNX Runtime latency 0.25x (4.0 times as fast); the student "
        "alone "
        "loses 10.00 points of test accuracy, distillation wins back 3.00."
    ) in text
    assert report.ratios({"teacher": rows["teacher"]}) is None


def test_speed_figures_have_their_form(monkeypatch):
    monkeypatch.setattr(report, "LATENCY_CALLS", 10)
    monkeypatch.setattr(report, "THROUGHPUT_REPEATS", 2)
    figures = report.latency_table({"net": models.build("airnet_xs", 10)}, 3, 32)
    assert set(figures["net"]) == {"eager", "onnxruntime"}
    for by_threads in figures["net"].values():
        assert set(by_threads) == {1, report.all_cores()}
        for s in by_threads.values():
            assert 0 < s["latency_ms"] <= s["latency_p90_ms"] and s["throughput"] > 0
    assert "| net | ONNX Runtime | 1 |" in report.latency_markdown(figures)


def test_bench_latency_writes_its_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "LATENCY_CALLS", 10)
    monkeypatch.setattr(report, "THROUGHPUT_REPEATS", 2)
    bench.main(["--latency", "--teacher", "airnet_s", "--student", "airnet_xs", "--out", str(tmp_path / "l.json")])
    figures = json.loads((tmp_path / "l.json").read_text())
    assert set(figures["latency"]) == {"teacher", "student"} and figures["teacher"] == "airnet_s"
    assert "student / teacher, ONNX Runtime, batch 1, 1 thread: latency" in capsys.readouterr().out


def png_size(path):
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR"
    return struct.unpack(">II", blob[16:24])


def write_logs(folder, epochs, validated=True):
    for stage, count in zip(STAGES, epochs):
        lines = [
            json.dumps(
                {
                    "epoch": e,
                    "loss": 2.0 / e,
                    "train_acc": 0.5,
                    "val_acc": 0.1 * e if validated else None,
                    "lr": 0.1,
                    "images": 100,
                    "seconds": 1.0,
                }
            )
            for e in range(1, count + 1)
        ]
        (folder / f"{stage}.jsonl").write_text("\n".join(lines) + "\n")


def test_curves_draw_one_series_per_stage_from_the_logs(tmp_path):
    write_logs(tmp_path, (3, 2, 2))
    figure = report.draw_curves(tmp_path, STAGES)
    assert png_size(tmp_path / "curves.png") == (
        report.CURVES_SIZE[0] * report.CURVES_DPI,
        report.CURVES_SIZE[1] * report.CURVES_DPI,
    )
    loss, accuracy = figure.axes
    assert [line.get_label() for line in loss.get_lines()] == list(STAGES)
    assert len({line.get_color() for line in loss.get_lines()}) == 3
    assert list(loss.get_lines()[0].get_xdata()) == [1, 2, 3] and list(accuracy.get_lines()[0].get_ydata()) == [
        pytest.approx(10),
        pytest.approx(20),
        pytest.approx(30),
    ]
    assert loss.get_xlabel() == "epoch" and loss.get_ylabel() and accuracy.get_ylabel()


def test_curves_without_a_validation_split_say_so(tmp_path):
    write_logs(tmp_path, (2, 1, 1), validated=False)
    figure = report.draw_curves(tmp_path, STAGES)
    assert len(figure.axes[0].get_lines()) == 3 and not figure.axes[1].get_lines()
    assert "no validation split" in figure.axes[1].texts[0].get_text()


def test_uncommitted_changes_are_named_by_their_digest(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    git("init", "-q")
    (tmp_path / "train.py").write_text("EPOCHS = 12\n")
    git("add", "train.py")
    git("commit", "-q", "-m", "first")
    commit, dirty, diff = report.git_commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and (dirty, diff) == (False, None)
    digests = []
    for epochs in (8, 5, 8):
        (tmp_path / "train.py").write_text(f"EPOCHS = {epochs}\n")
        again, dirty, diff = report.git_commit(tmp_path)
        assert again == commit and dirty and re.fullmatch(r"[0-9a-f]{12}", diff)
        digests.append(diff)
    assert digests[0] != digests[1] and digests[0] == digests[2]  # one digest for one change
    assert report.commit_text(commit, True, digests[0]) == f"commit `{commit[:12]}` with uncommitted changes `{diff}`"


def test_outside_a_git_checkout_there_is_no_commit(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    git = report.git_commit()
    assert git == (None, None, None)
    assert "not a git checkout" in report.run_markdown(report.run_info(3, torch.device("cpu"), False, git))


def test_the_cpu_name_says_which_kernels_the_environment_sets(monkeypatch):
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    plain = report.device_name(torch.device("cpu"))
    assert plain.endswith(f"{report.all_cores()} cores, {report.cpu_kind()}")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # torch reads it once, at start
    assert report.device_name(torch.device("cpu")) == (
        f"{plain}, ATen AVX2 kernels (ATEN_CPU_CAPABILITY=avx2), ONEDNN_MAX_CPU_ISA=AVX2"
    )


@pytest.mark.slow
@pytest.mark.parametrize("typed", ["avx2", "AVX2"])
def test_the_cpu_name_gives_the_aten_kernels_torch_applies(typed):
    """torch takes ATEN_CPU_CAPABILITY in lower case only: the name gives what it applied, not what was typed."""
    code = "import torch, report\nprint(report.device_name(torch.device('cpu')))\n"
    code += "print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": typed}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    name, applied = result.stdout.splitlines()
    assert applied == "AVX2" or typed != "avx2"
    assert name.endswith(f", ATen {applied} kernels (ATEN_CPU_CAPABILITY={typed})")


@pytest.mark.slow
def test_a_run_writes_curves_the_compression_report_and_its_provenance(tmp_path):
    write_cifar10(tmp_path / "data", per_class_train=4, per_class_test=2)
    args = [
        "--data-dir",
        tmp_path / "data",
        "--out-dir",
        tmp_path / "out",
        *FAST,
        "--seed",
        "3",
        "--compression-report",
    ]
    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "out" / "cifar10"
    assert png_size(folder / "curves.png") == (1000, 400)
    series = report.curve_series(folder, STAGES)
    assert set(series) == set(STAGES) and all(s["epoch"] == [1] for s in series.values())

    results = json.loads((folder / "results.json").read_text())
    run = results["run"]
    assert run["seed"] == 3 and run["torch"] == torch.__version__ and run["device"] == "cpu"
    assert isinstance(run["bf16"], bool) and run["device_name"]
    assert run["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", run["git_commit"])
    assert_compression_report(results, folder)
    markdown = (folder / "results.md").read_text()
    assert "## Compression" in markdown and "Student / teacher: checkpoint" in markdown
    assert "![training curves](curves.png)" in markdown and "Seed 3" in markdown
    assert [(r["stage"], r["action"]) for r in results["plan"]] == [(stage, "train") for stage in STAGES]
    assert "## Plan" in markdown and "| distilled | train | airnet_xs, 1 epoch, lr 0.008, method kd" in markdown

    code = ("git_commit", "git_dirty", "git_diff")
    for stage in STAGES:  # each stage names the code that trained it, the run's
        row = results["stages"][stage]
        assert [row[k] for k in code] == [run[k] for k in code] and not row["kept"]
        assert row["earlier_code"] == []
    assert "kept from earlier runs" not in markdown

    (folder / "curves.png").unlink()  # a run that trains nothing still draws the stages it skipped
    for stage, metrics in (
        ("student", {"git_commit": "0123456789abcdef" * 2 + "01234567", "git_dirty": True, "git_diff": None}),
        ("teacher", {"git_commit": None, "git_dirty": None, "git_diff": None}),
    ):  # as if other code had trained the student, and code outside a git checkout the teacher
        saved = torch.load(folder / f"{stage}.pt", weights_only=True)
        saved["metrics"].update(metrics)
        torch.save(saved, folder / f"{stage}.pt")
    again = run_script("train.py", *args, "--stages", "student")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skipping" in again.stdout and png_size(folder / "curves.png") == (1000, 400)
    line = (
        "kept from earlier runs: teacher (trained at an unknown commit), student (trained at commit "
        "`0123456789ab` with uncommitted changes)"
    )  # the distilled stage's teacher file changed: left out
    assert line in again.stdout and line in (folder / "results.md").read_text()
    results = json.loads((folder / "results.json").read_text())
    rows = results["stages"]
    assert rows["teacher"]["kept"] and rows["teacher"]["git_commit"] is None and "distilled" not in rows
    assert rows["teacher"]["earlier_code"] == [] and "resumed under other code" not in again.stdout
    assert [r["action"] for r in results["plan"]] == ["keep", "keep", "skip"]


def assert_compression_report(results, folder):
    """Every stage measured, and the student and the distilled student, one network, timed once."""
    rows = results["compression"]["rows"]
    assert list(rows) == list(STAGES)
    for stage, row in rows.items():
        assert row["checkpoint_bytes"] == (folder / f"{stage}.pt").stat().st_size
        assert row["params"] == results["stages"][stage]["params"]
        assert row["test_acc"] == results["stages"][stage]["test_acc"]
        for speed in (row, row["pytorch"]):  # ONNX Runtime, then PyTorch
            assert 0 < speed["latency_ms"] <= speed["latency_p90_ms"] and speed["throughput"] > 0
        assert row["macs"] > 0
    assert rows["student"]["macs"] == rows["distilled"]["macs"] < rows["teacher"]["macs"]
    timed = ("latency_ms", "throughput", "pytorch")
    assert {k: rows["student"][k] for k in timed} == {k: rows["distilled"][k] for k in timed}
    ratios = results["compression"]["student_vs_teacher"]
    assert ratios["macs"] == pytest.approx(rows["student"]["macs"] / rows["teacher"]["macs"])


def test_a_failed_export_or_report_still_writes_the_results(tmp_path, monkeypatch, capsys):
    """The report comes after training: an exporter that cannot convert an op
    (torch 2.11's, on AirNet's global max-pool) loses only the ONNX Runtime
    figures, and any other failure of the report only the report."""

    def fails(*args, **kwargs):
        raise RuntimeError("No ONNX function found for aten.adaptive_max_pool2d\n(a long stack)")

    monkeypatch.setattr(report, "LATENCY_CALLS", 10)
    monkeypatch.setattr(report.export, "write_onnx", fails)
    stages = {"student": {"model": "airnet_xs", "test_acc": 0.5}}
    summary = {"stages": stages, "run": report.run_info(0, torch.device("cpu"), False, (None, None, None))}
    (tmp_path / "student.pt").write_bytes(b"w" * 500)
    model = models.build("airnet_xs", 10)
    for failed in ("export", "report"):
        report.write_results(tmp_path, "cifar10", "| table |\n", summary, {"student": tmp_path / "student.pt"}, 3,
                             32, {"student": model})  # fmt: skip
        results, markdown = json.loads((tmp_path / "results.json").read_text()), (tmp_path / "results.md").read_text()
        assert results["stages"] == stages
        reason = "RuntimeError: No ONNX function found for aten.adaptive_max_pool2d"
        if failed == "export":
            assert results["compression"]["onnx_error"] == reason
            row = results["compression"]["rows"]["student"]
            assert "latency_ms" not in row and row["pytorch"]["throughput"] > 0 and row["macs"] == 6_299_248
            assert f"| 0.5 kB | 50.00% | n/a | {report.latency_text(row['pytorch'])} | n/a |" in markdown
            assert f"ONNX Runtime figures n/a: exporting to ONNX failed ({reason})" in markdown
            assert "has no ONNX Runtime figures" in capsys.readouterr().err
            monkeypatch.setattr(report, "macs_per_image", fails)
        else:
            assert results["compression"] == {"error": reason}
            assert f"Not measured: the compression report failed ({reason})" in markdown
            assert "compression report skipped" in capsys.readouterr().err


@pytest.mark.parametrize("load,warned", [(0.4, False), (1.0, True), (3.9, True)])
def test_bench_warns_when_other_processes_keep_the_cpu_busy(monkeypatch, load, warned):
    monkeypatch.setattr(report.os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(report, "all_cores", lambda: 2)
    line = report.busy_cpu()
    assert (line is not None) == warned
    if warned:
        assert line.startswith(f"warning: the CPU is busy before measuring (load average {load:.1f} on 2 cores)")
