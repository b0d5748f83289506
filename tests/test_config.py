"""Editing config.py: each constant takes what a person would type there, and a
value that cannot be used is one line naming the constant, never a traceback."""

import re
import shutil
import sys

import pytest

import checkpoint
import config
from conftest import ROOT, assert_one_line_error, run_script, write_cifar10


@pytest.fixture
def edit(monkeypatch):
    """Set constants of config.py, as an edit of the file would, for config.parse in this process."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setenv("COLUMNS", "1000")  # --help on one line per option, so that no '--no-flip' is broken

    def edit(**constants):
        for name, value in constants.items():
            monkeypatch.setattr(config, name, value)

    return edit


def default_in_help(text, option):
    """The default that --help shows for `option` (its flag and metavar, as in the option list)."""
    return " ".join(text.split()).split(f" {option} ", 1)[1].split(" (default: ", 1)[1].split(")")[0]


def test_every_constant_has_a_kind():
    assert set(config.KINDS) == set(config.defaults())


def test_the_constants_as_shipped_are_already_in_the_types_the_code_uses():
    for name, value in config.defaults().items():
        assert repr(value) == repr(getattr(config, name)), name


NATURAL = [  # constants as a person writes them -> what the code sees (repr: 4 and 4.0, lists and tuples differ)
    ({"EPOCHS": 1}, {"EPOCHS": (1, 1, 1)}),
    ({"EPOCHS": [3]}, {"EPOCHS": (3, 3, 3)}),
    ({"EPOCHS": [12, 8, 8]}, {"EPOCHS": (12, 8, 8)}),
    ({"LR": 8e-3}, {"LR": (0.008, 0.008, 0.008)}),
    ({"LR": 1}, {"LR": (1.0, 1.0, 1.0)}),
    ({"LR": [0.01, 0.02, 0.03]}, {"LR": (0.01, 0.02, 0.03)}),
    ({"ADAM_BETAS": [0.9, 0.99]}, {"ADAM_BETAS": (0.9, 0.99)}),
    ({"LR_MILESTONES": [0.5, 0.75]}, {"LR_MILESTONES": (0.5, 0.75)}),
    ({"LR_MILESTONES": 0.5}, {"LR_MILESTONES": (0.5,)}),
    ({"WEIGHT_DECAY": 0, "TEMPERATURE": 4}, {"WEIGHT_DECAY": 0.0, "TEMPERATURE": 4.0}),
    ({"FLIP": False, "TTA": False}, {"FLIP": False, "TTA": False}),
]


@pytest.mark.parametrize("written,seen", NATURAL, ids=[repr(w) for w, _ in NATURAL])
def test_a_constant_written_naturally_reaches_the_code_in_its_own_type(edit, written, seen):
    edit(**written)
    cfg = config.parse([])
    assert {name: repr(cfg[name]) for name in seen} == {name: repr(value) for name, value in seen.items()}


def test_a_typed_flag_wins_over_an_edited_constant_in_the_constants_type(edit):
    edit(EPOCHS=1, WEIGHT_DECAY=0)  # the flag's type is the constant's kind, not the edited value's type
    cfg = config.parse(["--epochs", "2", "--weight-decay", "0.01"])
    assert cfg["EPOCHS"] == (2, 2, 2) and cfg["WEIGHT_DECAY"] == 0.01


REFUSED = [  # constant = value -> what the one line says it accepts
    ("EPOCHS", "ten", "must be one or three integers > 0"),
    ("EPOCHS", 0, "must be one or three integers > 0"),
    ("EPOCHS", [1, 2], "must be one or three integers > 0"),
    ("EPOCHS", 2.5, "must be one or three integers > 0"),
    ("LR", "fast", "must be one or three finite numbers > 0"),
    ("LR", -1, "must be one or three finite numbers > 0"),
    ("ADAM_BETAS", 0.9, "must be two numbers in [0, 1)"),
    ("LR_MILESTONES", [0.5, 2], "must be fractions between 0 and 1"),
    ("WEIGHT_DECAY", "0", "must be a number"),
    ("TEMPERATURE", True, "must be a number"),
    ("BATCH_SIZE", 12.5, "must be an integer"),
    ("FLIP", "yes", "must be True or False"),
    ("FLIP", 1, "must be True or False"),
    ("DATASET", 10, "must be a string, in quotes"),
    ("ALPHA", 2, "must be in [0, 1]"),
]


@pytest.mark.parametrize("name,value,accepts", REFUSED, ids=[f"{n}={v!r}" for n, v, _ in REFUSED])
def test_a_constant_that_cannot_be_used_is_one_line_naming_it_in_config_py(edit, capsys, name, value, accepts):
    edit(**{name: value})
    with pytest.raises(SystemExit) as stop:
        config.parse([])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"train.py: error: config.py: {name} = {value!r}: {accepts}\n"


MISNAMED = [  # constants added, renamed or deleted -> the one line
    ({"TEMPRATURE": 4.0}, (), "config.py: TEMPRATURE = 4.0: no such setting; did you mean TEMPERATURE?"),
    ({"SEEED": 1}, ("SEED",), "config.py: SEEED = 1: no such setting; did you mean SEED?"),
    ({"MY_KNOB": 3}, (), "config.py: MY_KNOB = 3: no such setting; a new setting needs its type in KINDS (a helper: "
                          "_NOT_KNOBS)"),
    ({}, ("SEED", "DKD_BETA"), "config.py sets no DKD_BETA, SEED (renamed or deleted?); put the line back (git diff "
                               "config.py shows it)"),
]  # fmt: skip


@pytest.mark.parametrize("added,deleted,line", MISNAMED, ids=["misspelt", "renamed", "new", "deleted"])
@pytest.mark.parametrize("program", ["train.py", "predict.py"])
def test_a_constant_misnamed_in_config_py_is_one_line(monkeypatch, capsys, added, deleted, line, program):
    monkeypatch.setattr(sys, "argv", [program])
    for name, value in added.items():
        monkeypatch.setattr(config, name, value, raising=False)
    for name in deleted:
        monkeypatch.delattr(config, name)
    with pytest.raises(SystemExit) as stop:
        config.parse([], names=["OUT_DIR", "DEVICE"] if program == "predict.py" else None)
    assert stop.value.code == 2 and capsys.readouterr().err == f"{program}: error: {line}\n"


def test_a_bad_typed_value_is_still_named_by_its_flag(edit, capsys):
    with pytest.raises(SystemExit) as stop:
        config.parse(["--epochs", "0"])
    line = "train.py: error: argument --epochs: must be one or three integers > 0 (got (0, 0, 0))\n"
    assert stop.value.code == 2 and capsys.readouterr().err == line


def test_a_recipe_takes_the_same_forms_as_the_constants(edit, monkeypatch):
    recipe = {"EPOCHS": 2, "LR": 0.1, "WEIGHT_DECAY": 0, "ADAM_BETAS": [0.8, 0.9],
              "DATASETS": {"cifar10": {"ALPHA": 1}}}  # fmt: skip
    monkeypatch.setitem(config.RECIPES, "mine", recipe)
    cfg = config.parse(["--recipe", "mine"])
    assert [repr(cfg[name]) for name in ("EPOCHS", "LR", "WEIGHT_DECAY", "ADAM_BETAS", "ALPHA")] == [
        "(2, 2, 2)", "(0.1, 0.1, 0.1)", "0.0", "(0.8, 0.9)", "1.0",
    ]  # fmt: skip


BAD_RECIPES = [  # a recipe -> where the one line says config.py sets the value, and what it accepts
    ({"EPOCHS": "ten"}, "RECIPES['mine']['EPOCHS'] = 'ten': must be one or three integers > 0"),
    ({"EPOCHS": 0}, "RECIPES['mine']['EPOCHS'] = 0: must be one or three integers > 0"),
    ({"DATASETS": {"cifar10": {"TEMPERATURE": 0}}},
     "RECIPES['mine']['DATASETS']['cifar10']['TEMPERATURE'] = 0: must be a finite number > 0"),
    ({"NETWORKS": {"airnet_xs": {"LR": "x"}}},
     "RECIPES['mine']['NETWORKS']['airnet_xs']['LR'] = 'x': must be one or three finite numbers > 0"),
    ({"NETWORKS": {("airnet_m", "airnet_xs"): {"FLIP": 0}}},
     "RECIPES['mine']['NETWORKS'][('airnet_m', 'airnet_xs')]['FLIP'] = 0: must be True or False"),
    ({"EPOCH": 5}, "RECIPES['mine']['EPOCH'] = 5: no such setting; did you mean EPOCHS?"),
    ({"lr": 0.1}, "RECIPES['mine']['lr'] = 0.1: no such setting; did you mean LR?"),
    ({"NETWORK": {}}, "RECIPES['mine']['NETWORK'] = {}: no such setting; did you mean NETWORKS?"),
    ({"VERBOSE": 1}, "RECIPES['mine']['VERBOSE'] = 1: no such setting; the settings are the constants of config.py"),
    ({"NETWORKS": {("airnet_l", "airnet_m", "airnet_xs"): {"LR": 0.1}}},
     "RECIPES['mine']['NETWORKS'][('airnet_l', 'airnet_m', 'airnet_xs')] = {'LR': 0.1}: "
     "must be keyed by a student's name or a (teacher, student) pair"),
    ({"DATASETS": {"cifar100": {"ALPHA": 1, "TEMPRATURE": 1}}},
     "RECIPES['mine']['DATASETS']['cifar100']['TEMPRATURE'] = 1: no such setting; did you mean TEMPERATURE?"),
    ({"DATASETS": {"cifar-100": {"ALPHA": 1}}},
     f"RECIPES['mine']['DATASETS']['cifar-100'] = {{'ALPHA': 1}}: {config.RULES['DATASET']('cifar-100')}"),
    ({"NETWORKS": {("airnet_m", "resnet8x2"): {"LR": 0.1}}},
     f"RECIPES['mine']['NETWORKS'][('airnet_m', 'resnet8x2')] = {{'LR': 0.1}}: {config.RULES['STUDENT']('resnet8x2')}"),
]  # fmt: skip


@pytest.mark.parametrize("recipe,line", BAD_RECIPES, ids=[line.split(" = ")[0] for _, line in BAD_RECIPES])
def test_a_recipe_value_that_cannot_be_used_is_one_line_naming_its_place(edit, monkeypatch, capsys, recipe, line):
    monkeypatch.setitem(config.RECIPES, "mine", recipe)
    with pytest.raises(SystemExit) as stop:
        config.parse(["--recipe", "mine"])
    assert stop.value.code == 2 and capsys.readouterr().err == f"train.py: error: config.py: {line}\n"


def test_help_shows_the_edited_defaults_as_they_are_typed(edit, capsys):
    edit(EPOCHS=1, LR=8e-3, ADAM_BETAS=[0.9, 0.99], WEIGHT_DECAY=0, FLIP=False)
    with pytest.raises(SystemExit) as stop:
        config.parse(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    shown = {"--epochs INT[,INT,INT]": "1", "--lr FLOAT[,FLOAT,FLOAT]": "0.008", "--adam-betas FLOAT,...": "0.9,0.99",
             "--weight-decay FLOAT": "0", "--flip, --no-flip": "--no-flip"}  # fmt: skip
    assert {option: default_in_help(text, option) for option in shown} == shown


# ---------------------------------------------------------------- edited copies of config.py, through train.py


def edited_copy(folder, **constants):
    """A copy of the repo's scripts whose config.py says NAME = <source text> for each of `constants`."""
    folder.mkdir()
    for script in ROOT.glob("*.py"):
        shutil.copy(script, folder)
    text = (folder / "config.py").read_text()
    for name, source in constants.items():
        line = re.compile(rf"^{name} = .*?(  # .*)?$", flags=re.M)
        text, count = line.subn(lambda m, name=name, source=source: f"{name} = {source}{m[1] or ''}", text, count=1)
        assert count == 1, name
    (folder / "config.py").write_text(text)
    return folder


@pytest.fixture(scope="module")
def tiny_cifar10(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("data"), per_class_train=3, per_class_test=1).parent


TINY = ("--teacher airnet_s --student airnet_xs --batch-size 16 --val-size 10 --device cpu "
        "--no-compression-report").split()  # fmt: skip
FORMS = {  # an edit of config.py -> the settings the distilled stage was trained with, and --help's defaults
    "one number per stage": (
        {"EPOCHS": "1", "LR": "8e-3"},
        {"EPOCHS": [1, 1, 1], "LR": [0.008, 0.008, 0.008]},
        {"--epochs INT[,INT,INT]": "1", "--lr FLOAT[,FLOAT,FLOAT]": "0.008"},
    ),
    "a list for a tuple": (
        {"EPOCHS": "[1, 1, 1]", "ADAM_BETAS": "[0.9, 0.99]", "LR_SCHEDULE": '"step"', "LR_MILESTONES": "[0.5]"},
        {"EPOCHS": [1, 1, 1], "ADAM_BETAS": [0.9, 0.99], "LR_MILESTONES": [0.5]},
        {"--epochs INT[,INT,INT]": "1,1,1", "--adam-betas FLOAT,...": "0.9,0.99", "--lr-milestones FLOAT,...": "0.5"},
    ),
    "an int for a float": (
        {"EPOCHS": "1", "WEIGHT_DECAY": "0", "TEMPERATURE": "4", "LABEL_SMOOTHING": "0"},
        {"WEIGHT_DECAY": 0.0, "TEMPERATURE": 4.0, "LABEL_SMOOTHING": 0.0},
        {"--weight-decay FLOAT": "0", "--temperature FLOAT": "4", "--label-smoothing FLOAT": "0"},
    ),
    "True or False": (
        {"EPOCHS": "1", "FLIP": "False", "TTA": "False", "CHANNELS_LAST": "False"},
        {"FLIP": False, "TTA": False, "CHANNELS_LAST": False},
        {"--flip, --no-flip": "--no-flip", "--tta, --no-tta": "--no-tta"},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_an_edited_config_py_shows_in_help_and_trains(tmp_path, tiny_cifar10, form):
    constants, trained_with, shown = FORMS[form]
    repo = edited_copy(tmp_path / "repo", **constants)
    result = run_script(repo / "train.py", "--help", cwd=repo, env={"COLUMNS": "1000"})
    assert result.returncode == 0, result.stderr
    assert {option: default_in_help(result.stdout, option) for option in shown} == shown
    out = tmp_path / "out"
    result = run_script(repo / "train.py", "--data-dir", tiny_cifar10, "--out-dir", out, *TINY, cwd=repo)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = checkpoint.load(out / "cifar10" / "distilled.pt")["config"]
    assert {name: repr(saved[name]) for name in trained_with} == {k: repr(v) for k, v in trained_with.items()}


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["--help"], ["--epochs", "2"]], ids=["run", "help", "typed-epochs"])
def test_a_config_py_value_that_cannot_be_used_stops_train_py_with_one_line(tmp_path, args):
    repo = edited_copy(tmp_path / "repo", EPOCHS='"ten"')
    result = run_script(repo / "train.py", "--out-dir", tmp_path / "out", *args, cwd=repo)
    assert_one_line_error(result, code=2)
    assert result.stderr == "train.py: error: config.py: EPOCHS = 'ten': must be one or three integers > 0\n"
    assert not (tmp_path / "out").exists()
