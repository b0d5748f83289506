"""train.py under torchrun: several processes train one model, rank 0 writes."""

import json
import subprocess
import sys

import pytest

import models
from conftest import FAST, ROOT, write_cifar10

torch_distributed = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not torch_distributed.is_available() or not torch_distributed.is_gloo_available(),
                                reason="torch was built without gloo")


def torchrun(*args, processes=2, timeout=600):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(ROOT / "train.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_two_processes_run_the_pipeline_and_write_once(tmp_path):
    write_cifar10(tmp_path / "data", per_class_train=12, per_class_test=6)
    out = tmp_path / "out"
    result = torchrun("--data-dir", tmp_path / "data", "--out-dir", out, *FAST, "--epochs", "15,2,2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("results (cifar10") == 1  # rank 0 speaks for the job
    assert result.stdout.count("== teacher:") == 1
    folder = out / "cifar10"
    for stage, epochs in (("teacher", 15), ("student", 2), ("distilled", 2)):
        assert not (folder / f"{stage}.last.pt").exists()
        log = [json.loads(line) for line in (folder / f"{stage}.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == list(range(1, epochs + 1))  # one writer, one line per epoch
    results = json.loads((folder / "results.json").read_text())
    assert set(results) == {"teacher", "student", "distilled"}
    # gradients averaged over the two halves of each batch still train: the easy data is learnt
    assert models.load_checkpoint(folder / "teacher.pt")["metrics"]["test_acc"] > 0.5
