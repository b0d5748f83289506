"""Imports point downward: every top-level module's imports, read with ast,
obey the rules of the README's layout section."""

import ast

from conftest import ROOT

# Lowest first: a module imports only modules that come before it here.
LAYERS = ["config", "runtime", "distributed", "models", "datafiles", "data", "checkpoint", "optim", "distill",
          "pretrained", "export", "report", "plan", "stages", "train", "predict", "bench"]  # fmt: skip
SCRIPTS = {"train", "predict", "bench"}  # run, never imported (tests may)
DATA = {"datafiles", "data"}
ALONE = {"models": set(), "distill": {"models"}}  # modules whose local imports are these alone


def local_imports(source, modules):
    """The repo's modules that `source` imports, anywhere in it (a function's import counts)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & modules


def broken_rules(imports):
    """One line per broken rule of {module: the local modules it imports}."""
    problems = []
    for module, imported in sorted(imports.items()):
        if module not in LAYERS:
            problems.append(f"{module}.py is not in LAYERS: place it there, below the modules that import it")
            continue
        for other in sorted(imported):
            if other in SCRIPTS:
                problems.append(f"{module} imports {other}: nothing imports a script")
            elif module in ALONE and other not in ALONE[module]:
                allowed = ", ".join(sorted(ALONE[module])) or "no module of the repo"
                problems.append(f"{module} imports {other}: it may import {allowed} alone")
            elif module in DATA and other in ("checkpoint", "models"):
                problems.append(f"{module} imports {other}: the data modules know nothing of checkpoints or models")
            elif other in LAYERS and LAYERS.index(other) >= LAYERS.index(module):
                problems.append(f"{module} imports {other}: imports point downward ({other} is not below {module})")
    return problems


def test_every_module_imports_downward_only():
    modules = {path.stem for path in ROOT.glob("*.py")}
    imports = {path.stem: local_imports(path.read_text(), modules) for path in ROOT.glob("*.py")}
    assert broken_rules(imports) == []


def test_each_rule_catches_its_break():
    modules = set(LAYERS) | {"newcomer"}
    assert local_imports("import os\nimport data\nfrom models import build\ndef f():\n    import train\n", modules) == {
        "data",
        "models",
        "train",
    }
    assert broken_rules({"report": {"train"}, "checkpoint": {"predict"}}) == [
        "checkpoint imports predict: nothing imports a script",
        "report imports train: nothing imports a script",
    ]
    assert broken_rules({"models": {"config"}, "distill": {"data", "models"}}) == [
        "distill imports data: it may import models alone",
        "models imports config: it may import no module of the repo alone",
    ]
    assert broken_rules({"data": {"checkpoint"}, "datafiles": {"models"}}) == [
        "data imports checkpoint: the data modules know nothing of checkpoints or models",
        "datafiles imports models: the data modules know nothing of checkpoints or models",
    ]
    assert broken_rules({"checkpoint": {"report"}, "config": {"config"}}) == [
        "checkpoint imports report: imports point downward (report is not below checkpoint)",
        "config imports config: imports point downward (config is not below config)",
    ]
    assert broken_rules({"newcomer": set()}) == [
        "newcomer.py is not in LAYERS: place it there, below the modules that import it"
    ]
    assert broken_rules({"report": {"export", "checkpoint", "datafiles"}, "distill": {"models"}}) == []
