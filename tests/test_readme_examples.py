"""The examples of README.md's 'Extending' section work as written: each block,
run as if appended to the module its first line names, registers a model, a
method or a dataset that the rest of the code then uses by name."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config
import data
import datafiles
import distill
import models
from conftest import ROOT

MODULES = {"models.py": (models, "MODELS"), "distill.py": (distill, "METHODS"), "data.py": (data, "DATASETS"),
           "datafiles.py": (datafiles, None)}  # fmt: skip


def examples():
    """{file named in the block's first line: the block} for the python blocks under '## Extending'."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Extending\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return {block.splitlines()[0].removeprefix("#").strip(): block for block in blocks}


def run_example(file, monkeypatch):
    """Run the README's block for `file` in that module's namespace, against a
    copy of its registry (restored after the test); the names it registered."""
    module, registry = MODULES[file]
    before = dict(getattr(module, registry))
    monkeypatch.setattr(module, registry, dict(before))
    exec(compile(examples()[file], f"README.md, the {file} example", "exec"), dict(vars(module)))
    added = sorted(set(getattr(module, registry)) - set(before))
    assert len(added) == 1, f"the {file} example should register one name in {registry}, registered {added}"
    return added[0]


def test_one_example_for_each_registry():
    assert sorted(examples()) == sorted(MODULES)


def test_the_model_example_builds_and_learns_as_a_student(monkeypatch):
    name = run_example("models.py", monkeypatch)
    assert config.RULES["STUDENT"](name) is None  # --student NAME is accepted
    for channels in (3, 1):
        out = models.build(name, 10, channels).forward_features(torch.randn(4, channels, 32, 32))
        assert out["logits"].shape == (4, 10) and out["stages"] and out["pooled"].shape[0] == 4
    student, teacher = models.build(name, 10, dropout=0.1), models.build("resnet8", 10)
    sample = torch.randn(2, 3, 32, 32)
    method = distill.build_method("fitnet", config.defaults(), student, teacher, sample)  # a feature method
    objective = distill.Distillation(student, teacher, method)
    loss, logits = objective(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert logits.shape == (4, 10) and student.head.weight.grad.abs().sum() > 0


def test_the_method_example_gives_the_loss_it_describes(monkeypatch):
    name = run_example("distill.py", monkeypatch)
    cfg = config.parse(["--method", name, "--alpha", "0.25"])  # --method NAME is accepted
    method = distill.build_method(name, cfg, models.build("resnet8", 10), models.build("resnet8", 10))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=generator, requires_grad=True)
    labels = torch.randint(0, 10, (8,), generator=generator)
    # a teacher whose logits are the student's plus 1: the squared difference is exactly 1
    loss = method.loss({"logits": logits}, {"logits": logits.detach() + 1}, labels)
    assert loss.item() == pytest.approx(0.75 * F.cross_entropy(logits, labels).item() + 0.25 * 1.0)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_the_dataset_example_loads_the_file_it_describes(monkeypatch, tmp_path):
    loader = {}
    exec(compile(examples()["datafiles.py"], "README.md, the datafiles.py example", "exec"), vars(datafiles), loader)
    monkeypatch.setattr(datafiles, "load_npz", loader["load_npz"], raising=False)
    name = run_example("data.py", monkeypatch)
    assert config.RULES["DATASET"](name) is None  # --dataset NAME is accepted
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8),
        "train_y": np.arange(40) % 2,
        "test_x": rng.integers(0, 256, (10, 3, 8, 8), dtype=np.uint8),
        "test_y": np.arange(10) % 2,
        "classes": np.array(["even", "odd"]),
    }
    np.savez(tmp_path / f"{name}.npz", **arrays)
    loaded = data.load(name, tmp_path, val_size=10, seed=0)
    assert loaded.classes == ["even", "odd"]
    assert (len(loaded.train_y), len(loaded.val_y), len(loaded.test_y)) == (30, 10, 10)
    assert torch.equal(loaded.test_x, torch.from_numpy(arrays["test_x"]))
    assert loaded.val_y.bincount().tolist() == [5, 5]  # the validation split is stratified
    with pytest.raises(datafiles.DataError, match=f"{name}.npz"):
        data.load(name, tmp_path / "elsewhere")
