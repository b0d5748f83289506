"""Where the work runs and in what precision: the device, bf16 autocast and
deterministic kernels."""

import os

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


def counted(n, noun):
    """'1 epoch', '2 epochs': a count with its noun in the right number (nouns that take an s)."""
    return f"{n:,} {noun}{'s' * (n != 1)}"
