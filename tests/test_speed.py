"""The fast paths change speed, not results; bench.py runs end to end."""

import json
import platform
import subprocess
import sys

import pytest

import bench
import checkpoint
from conftest import FAST, ROOT, run_script, write_cifar10


@pytest.fixture(scope="module")
def easy_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    write_cifar10(root / "data", per_class_train=12, per_class_test=6)
    return root


@pytest.mark.slow
def test_speed_options_give_the_accuracy_of_plain_float32(easy_cifar):
    """bf16 autocast + channels_last + torch.compile against float32 NCHW eager,
    same seed and data: test accuracy within 10 points (60 test images), both
    well above chance."""
    accuracy = {}
    for name, flags in {
        "plain": ["--amp", "off", "--no-channels-last", "--no-compile"],
        "fast": ["--amp", "bf16", "--channels-last", "--compile"],
    }.items():
        out = easy_cifar / name
        result = run_script(
            "train.py",
            "--data-dir",
            easy_cifar / "data",
            "--out-dir",
            out,
            *FAST,
            "--stages",
            "student",
            "--epochs",
            "15",
            *flags,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        accuracy[name] = checkpoint.load(out / "cifar10" / "student.pt")["metrics"]["test_acc"]
    assert accuracy["plain"] > 0.5 and accuracy["fast"] > 0.5, accuracy
    assert abs(accuracy["plain"] - accuracy["fast"]) <= 0.10, accuracy


@pytest.mark.slow
def test_bench_refuses_before_measuring(easy_cifar, tmp_path):
    """A path it cannot write, data it cannot read or too small for its batches: one line, before any work."""
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not an archive")
    for args, flag, message in [
        (["--out", tmp_path], "--out", "is a folder; give a file name"),
        (["--out-dir", easy_cifar / "data" / "cifar-10-python.tar.gz"], "--out-dir", "cannot write to"),
        (["--latency", "--out", tmp_path], "--out", "is a folder"),
        (["--data-dir", easy_cifar / "data"], "--steps", "120 training images, too few for 3 warm-up and 3 timed"),
        (["--workers", "-1"], "--workers", "must be >= 0"),
        (["--data-dir", tmp_path / "corrupt", "--out", tmp_path / "bench.json"], "--data-dir", "corrupt or unreadable"),
    ]:
        result = run_script("bench.py", "--quick", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
        assert f"error: argument {flag}: " in result.stderr and message in result.stderr
        assert not (tmp_path / "bench.json").exists()


@pytest.mark.slow
def test_bench_quick_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script(
        "bench.py", "--quick", "--data-dir", tmp_path / "none", "--out", out, "--batch-size", "32", "--workers", "1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["rows"]) == {
        "teacher training",
        "student training",
        "distilled training",
        "teacher inference",
        "student inference",
    }
    for row in figures["rows"].values():
        for key in (
            "ours",
            "conventional",
            "ratio",
            "flops_per_image",
            "gflops_per_second",
            "share_of_peak",
            "at_peak",
            "at_peak_ratio",
        ):
            assert row[key] > 0, (key, row)
    assert figures["peak_gflops_per_second"] > 0
    assert "ours / conventional" in result.stdout


def test_profile_parts_are_shares_of_the_operators_own_time():
    rows = [
        ("aten::convolution_backward", 40.0),
        ("autograd::engine::evaluate_function: ConvolutionBackward0", 10.0),
        ("aten::mkldnn_convolution", 20.0),
        ("GeluBackward0", 5.0),
        ("aten::gelu", 5.0),
        ("aten::max_pool2d_with_indices", 4.0),
        ("aten::native_batch_norm", 3.0),
        ("aten::fill_", 2.0),
        ("aten::zero_", 1.0),
        ("aten::take", 2.0),
        ("aten::index", 1.0),
        ("Optimizer.step#AdamW.step", 1.0),
        ("aten::_foreach_mul_", 1.0),
        ("aten::copy_", 5.0),
    ]
    shares = bench.group_parts(rows)
    assert shares == pytest.approx(
        {
            "convolution backward": 0.5,
            "convolution forward": 0.2,
            "GELU": 0.1,
            "max-pool": 0.04,
            "batch norm": 0.03,
            "fill_/zeroing": 0.03,
            "augmentation gather (take, index)": 0.03,
            "optimizer": 0.02,
            "other": 0.05,
        }
    )


@pytest.mark.slow
def test_bench_profile_writes_the_parts_of_each_path(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script(
        "bench.py", "--profile", "--quick", "--data-dir", tmp_path / "none", "--out", out, "--batch-size", "32",
        "--workers", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    profile = json.loads(out.read_text())["profile"]
    assert set(profile) == {"teacher training", "distilled training", "teacher inference"}
    for path in profile.values():
        assert path["step_ms"] > 0 and sum(path["parts"].values()) == pytest.approx(1.0)
        assert path["parts"]["convolution forward"] > 0
    assert profile["teacher training"]["parts"]["convolution backward"] > 0
    assert profile["teacher inference"]["parts"]["convolution backward"] == 0
    assert "| convolution backward |" in result.stdout


CHURN = """
import ctypes, resource
if {call}:
    import torch
    import runtime
    assert runtime.reuse_freed_memory(torch.device("cpu"))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def step():  # a training step's activations: blocks of 8 MB, written, then freed
    blocks = [libc.malloc(8 << 20) for _ in range(3)]
    for block in blocks:
        ctypes.memset(block, 1, 8 << 20)
    for block in blocks:
        libc.free(block)
step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's settings")
def test_freed_memory_is_reused_without_new_page_faults():
    """8 steps write 8 x 24 MB (49,152 pages of 4 KB); under glibc's defaults the heap is trimmed after
    each step, and the pages fault in again."""
    faults = {}
    for call in (False, True):
        done = subprocess.run([sys.executable, "-c", CHURN.format(call=call)], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        faults[call] = int(done.stdout)
    if faults[False] < 10_000:  # 55,039 on XEON-AMX; huge pages would hide the trimming
        pytest.skip(f"glibc's defaults fault only {faults[False]} pages here: nothing to reuse")
    assert faults[True] < 100, faults
