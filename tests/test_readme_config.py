"""README.md's configuration table lists every constant of config.py's knobs
block, with its default, so that the table cannot drift from the code."""

import re

import config
from conftest import ROOT

ROW = re.compile(r"\| `([A-Z][A-Z0-9_]*)` \| `([^`]*)` \| (.+) \|")


def readme_rows():
    """{constant: (default as shown, meaning)} from the table under '## Configuration'."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return {m[1]: (m[2], m[3]) for m in map(ROW.fullmatch, section.splitlines()) if m}


def shown(value):
    """A default as the table shows it: True/False, tuples comma-separated, an empty string as ""."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value) if value != "" else '""'


def drift(rows, knobs):
    """(constants without a row, rows that name no constant)."""
    return sorted(set(knobs) - set(rows)), sorted(set(rows) - set(knobs))


def test_every_constant_has_a_row_and_every_row_a_constant():
    missing, unknown = drift(readme_rows(), config.defaults())
    assert not missing, f"README.md's configuration table lacks a row for {', '.join(missing)}"
    assert not unknown, f"README.md's configuration table names no constant of config.py: {', '.join(unknown)}"


def test_a_constant_added_to_config_without_a_row_is_caught(monkeypatch):
    monkeypatch.setattr(config, "NEW_KNOB", 3, raising=False)
    monkeypatch.setitem(config.KINDS, "NEW_KNOB", int)  # a new setting has its type in KINDS
    assert "NEW_KNOB" in config.defaults()
    assert drift(readme_rows(), config.defaults()) == (["NEW_KNOB"], [])


def test_a_row_without_a_constant_is_caught():
    rows = {**readme_rows(), "GONE_KNOB": ("1", "a constant that was removed")}
    assert drift(rows, config.defaults()) == ([], ["GONE_KNOB"])


def test_the_defaults_shown_are_those_of_config():
    rows = readme_rows()
    wrong = {name: (rows[name][0], shown(value)) for name, value in config.defaults().items() if name in rows}
    wrong = {name: pair for name, pair in wrong.items() if pair[0] != pair[1]}
    assert not wrong, f"README.md shows other defaults than config.py (README, config): {wrong}"


def test_every_row_says_what_the_constant_means():
    assert all(len(meaning.strip()) > 3 for _, meaning in readme_rows().values())


def test_shown_defaults():
    assert [shown(v) for v in (True, False, (12, 8, 8), (0.9, 0.99), "", "cifar10", 0, 0.05)] == [
        "True",
        "False",
        "12,8,8",
        "0.9,0.99",
        '""',
        "cifar10",
        "0",
        "0.05",
    ]
