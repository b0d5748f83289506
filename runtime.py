"""Where the work runs and how fast: the device, bf16 autocast, deterministic
kernels, and the CPU inference speed that the results table reports."""

import copy
import os
import time

import torch

import config


def device(choice, prog=None):
    """The torch device for DEVICE (auto: CUDA when there is one)."""
    if choice == "cuda" and not torch.cuda.is_available():
        config.fail("device", "cuda was asked for but torch sees no CUDA device; use --device cpu", prog)
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def autocast(device, amp):
    """A zero-argument context factory for bf16 autocast where asked and
    useful, and whether it is on.

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


def make_deterministic():
    """Same inputs, same bits: deterministic kernels where torch has them."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _median_seconds(run, repeats):
    """Median wall time of `repeats` calls of `run`: robust to the odd slow call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def cpu_speed(model, in_channels, image_size):
    """Inference speed on the CPU in float32, whatever device trained the model:
    median latency at batch 1 (ms) and throughput at batch 256 (images/s)."""
    model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.channels_last)
    single = torch.randn(1, in_channels, image_size, image_size).contiguous(memory_format=torch.channels_last)
    batch = torch.randn(256, in_channels, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(5):
            model(single)
        latency_ms = _median_seconds(lambda: model(single), 30) * 1000
        model(batch)
        throughput = 256 / _median_seconds(lambda: model(batch), 3)
    return latency_ms, throughput
