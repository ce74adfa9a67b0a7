"""The config reference is generated from the code, and what it says is what the code does."""

import dataclasses
import functools
from pathlib import Path

import pytest

from megdet.cli import main
from megdet.config import CHOICES, Config, ConfigError, config_from_dict, config_to_dict
from megdet.config_reference import explained, markdown, sections

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _expand(key: str) -> list[str]:
    """``data.{train,val}.json`` -> ``data.train.json``, ``data.val.json``."""
    if "{" not in key:
        return [key]
    head, rest = key.split("{", 1)
    names, tail = rest.split("}", 1)
    return [f"{head}{name}{tail}" for name in names.split(",")]


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in tree.items():
        if isinstance(value, dict):
            keys |= _leaves(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_docs_config_md_is_the_generated_reference():
    assert DOCS.read_text() == markdown(), (
        "docs/config.md differs from megdet/config.py: run `make docs` (or `megdet config "
        "--list > docs/config.md`) and commit the result"
    )


def test_every_key_is_listed_once_with_an_explanation():
    listed = [key for section in sections() for doc in section.keys for key in _expand(doc.key)]
    assert sorted(listed) == sorted(_leaves(config_to_dict(Config())))
    unexplained = [doc.key for s in sections() for doc in s.keys if not doc.meaning.strip()]
    assert not unexplained, f"add a comment to these fields in megdet/config.py: {unexplained}"
    assert all(section.about for section in sections() if section.name)


def test_comments_are_read_from_above_and_beside_a_field():
    @dataclasses.dataclass
    class Example:
        """What it is."""

        # Two lines
        # above.
        above: int = 1
        beside: int = 2  # one beside
        # fmt: off

        # Above and
        both: int = dataclasses.field(
            default=3
        )  # beside, on the statement's last line
        # fmt: on

        bare: int = 4
        tooled: int = 5  # noqa: E501

    about, comments = explained(Example)
    assert about == "What it is."
    assert comments == {
        "above": "Two lines above.",
        "beside": "one beside",
        "both": "Above and beside, on the statement's last line",
        "bare": "",
        "tooled": "",
    }


@functools.cache
def _by_key() -> dict[str, object]:
    return {key: doc for s in sections() for doc in s.keys for key in _expand(doc.key)}


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_listed_choices_are_what_validation_accepts(key):
    doc = _by_key()[key]
    listed = doc.allowed.removeprefix("one of ").split(", ")
    assert listed == list(CHOICES[key])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(_nested(key, "not-a-choice"))


def _nested(key: str, value) -> dict:
    raw: dict = {"train": {"epochs": 1}}
    node = raw
    *parents, last = key.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return raw


def _edges(allowed: str) -> tuple[float, float]:
    """The value just outside a listed range (">= 1", "> 0", "in [0, 1)") at its low end, and
    the lowest value inside it (an open end: half a unit in)."""
    if allowed.startswith(">= "):
        low = float(allowed[3:])
        return low - 1, low
    if allowed.startswith("> "):
        low = float(allowed[2:])
        return low, low + 0.5
    low = float(allowed[3:].split(",")[0].strip("[( "))
    return (low, low + 0.5) if allowed[3] == "(" else (low - 1, low)


RANGED = sorted(k for k, doc in _by_key().items() if doc.allowed[:1] in (">", "i"))


@pytest.mark.parametrize("key", RANGED)
def test_listed_ranges_are_what_validation_accepts(key):
    """Just below the range the reference lists: refused, naming the key; its lowest value
    accepted (lists, whose length and order are checked too, only the first)."""
    doc = _by_key()[key]
    bad, good = _edges(doc.allowed)
    if doc.type.startswith(("int", "list of int")):
        bad, good = int(bad), int(good) if float(good).is_integer() else int(good) + 1
    if doc.type.startswith("list"):
        bad = [bad]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(_nested(key, bad))
    if not doc.type.startswith("list"):
        config_from_dict(_nested(key, good))


def test_megdet_config_prints_the_reference_and_resolved_presets(capsys):
    assert main(["config", "--list"]) == 0
    assert capsys.readouterr().out == markdown()
    assert main(["config", "default", "train.batch_size=64"]) == 0
    assert "batch_size: 64" in capsys.readouterr().out
    assert main(["config", "default", "train.batch_size=0"]) == 2
    assert "train.batch_size: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["config"]) == 2
    assert "give a preset" in capsys.readouterr().err
