"""train.py under torchrun: which process this is, joining the job, and what
the processes of a job agree on.

torchrun starts one process per GPU (on one or several machines) and tells
each its rank. Every process trains on its share of each batch and DDP
averages the gradients, so BATCH_SIZE and LR mean the same whatever the
number of processes; the master process alone evaluates, prints and writes.
"""

import contextlib
import datetime
import os

import torch

ddp_rank = int(os.environ.get("RANK", 0))
ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
ddp = ddp_world_size > 1
master_process = ddp_rank == 0


def ddp_init(device):
    """Join the torchrun job, if there is one; returns this process's device."""
    if not ddp:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ddp_local_rank)
        torch.cuda.set_device(device)
    # the others wait for the master while it downloads or decodes the data: longer than NCCL's 10-minute default
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(hours=1),
        device_id=device if device.type == "cuda" else None,
    )
    return device


@contextlib.contextmanager
def in_turns():
    """Run the block (a download, a cache to build) first on the master, then on
    the first process of every other machine, then on the rest: each finds the
    files the ones before it wrote, where they share a folder."""
    turn = 0 if master_process else 1 if ddp_local_rank == 0 else 2
    for _ in range(turn if ddp else 0):
        torch.distributed.barrier()
    yield
    for _ in range(2 - turn if ddp else 0):
        torch.distributed.barrier()


def ddp_sum(sums):
    """An epoch's running sums over every process, in place; the first
    non-finite step is the earliest any process saw (DDP spreads a non-finite
    gradient to every process one step later)."""
    never = torch.iinfo(torch.int64).max
    seen = torch.tensor(sums.seen, device=sums.correct.device)
    first_bad = torch.where(sums.first_bad < 0, never, sums.first_bad)
    for tensor, op in ((sums.loss_sum, "SUM"), (sums.correct, "SUM"), (seen, "SUM"), (first_bad, "MIN")):
        torch.distributed.all_reduce(tensor, getattr(torch.distributed.ReduceOp, op))
    sums.first_bad = torch.where(first_bad == never, -1, first_bad)
    sums.loss_sum /= ddp_world_size
    sums.seen = int(seen)


def ddp_agreed_stop(signum, device):
    """The signal that asked to stop (`signum`, or None), as every process
    hears it: a signal may reach the processes at different steps, so they
    agree at the end of each epoch."""
    if not ddp:
        return signum
    stop = torch.tensor(signum or 0, device=device)
    torch.distributed.all_reduce(stop, torch.distributed.ReduceOp.MAX)
    return int(stop) or None
