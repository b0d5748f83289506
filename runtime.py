"""Where the work runs and in what precision: the device, bf16 autocast and
deterministic kernels, and the memory freed tensors leave."""

import ctypes
import os
import platform

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


def reuse_freed_memory(device):
    """Keep the memory of freed tensors in the process for the next step's.

    glibc hands a freed block above its mmap threshold back to the system, and
    trims the free top of its heap past twice that threshold (both move with
    the blocks freed so far); CPU training steps then fault their activations
    into fresh zeroed pages. With both limits fixed high the CIFAR-10 pipeline
    faults 2 to 9 times less often and runs 2 to 5% faster (docs/speed.md),
    with the same results bit for bit. Returns whether the settings were
    taken: only glibc has them, and only a run on the CPU gains."""
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    # 32 MB: the largest mmap threshold glibc documents on 64-bit systems
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30))


def counted(n, noun):
    """'1 epoch', '2 epochs': a count with its noun in the right number (nouns that take an s)."""
    return f"{n:,} {noun}{'s' * (n != 1)}"
