"""The config reference, generated from the config dataclasses themselves: each key's type,
default, allowed values and the comment that explains it in ``config.py``. The manual's
``docs/config.md`` is this module's output (``megdet config --list``), and a test compares the
two, so the reference cannot drift from the code that reads the keys."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from dataclasses import dataclass

from megdet import config


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, as an override writes it: solver.agvm.interval
    type: str
    default: str
    allowed: str
    meaning: str


@dataclass(frozen=True)
class Section:
    name: str  # "" for the top level (task)
    about: str
    keys: list[KeyDoc]


def sections(cls: type = config.Config) -> list[Section]:
    """Every leaf key of ``cls``, grouped by the section (nested dataclass) that holds it, in
    the order the dataclasses declare them."""
    found: list[Section] = []
    _walk(cls, "", found)
    return found


def _walk(cls: type, prefix: str, found: list[Section]) -> None:
    about, comments = explained(cls)
    leaves, nested = [], {}
    for item in dataclasses.fields(cls):
        key = f"{prefix}{item.name}"
        default = _default(item)
        if dataclasses.is_dataclass(default):  # one section for fields of the same type
            nested.setdefault(type(default), []).append(item.name)
            continue
        leaves.append(
            KeyDoc(key, _type(item.type), _yaml(default), _allowed(key, item), comments[item.name])
        )
    if leaves:
        found.append(Section(prefix.rstrip("."), about, leaves))
    for child, names in nested.items():
        name = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
        _walk(child, f"{prefix}{name}.", found)


def _default(item: dataclasses.Field):
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def _type(annotation: str) -> str:
    """``int | None`` as a config writer reads it: ``int or null``."""
    names = [
        "null" if part == "None" else part.replace("list[", "list of ").rstrip("]")
        for part in annotation.split(" | ")
    ]
    return " or ".join(names)


def _yaml(value) -> str:
    """A default as a YAML file or an override writes it."""
    if isinstance(value, str):
        return value or '""'
    return json.dumps(value)  # null, true, 0.0001, [8.0, 10.0]


def _allowed(key: str, item: dataclasses.Field) -> str:
    if key in config.CHOICES:
        return "one of " + ", ".join(config.CHOICES[key])
    if "interval" in item.metadata:
        return str(item.metadata["interval"])
    if item.type == "bool":
        return "true, false"
    return ""


TOOL_COMMENTS = ("fmt:", "noqa", "type:")  # for the formatter, linter, type checker: not docs


def explained(cls: type) -> tuple[str, dict[str, str]]:
    """A config dataclass's docstring, and each field's explanation: the comment lines right
    above it and the comment on its own lines, joined into one paragraph ("" where it has
    none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        comment = token.string.lstrip("#").strip()
        if token.type == tokenize.COMMENT and not comment.startswith(TOOL_COMMENTS):
            comments[token.start[0]] = comment
    text = {}
    definition = ast.parse(source).body[0]
    for node in definition.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row >= 1 and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        inline = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments]
        text[node.target.id] = " ".join(part for part in above + inline if part)
    return " ".join((ast.get_docstring(definition) or "").split()), text


def markdown() -> str:
    """``docs/config.md``: one table per section."""
    out = [
        "# Config reference",
        "",
        "Every key megdet reads, generated from `megdet/config.py` by `megdet config --list` "
        "(`make docs` writes this page; a test fails when the two differ). A preset "
        "(`megdet/configs/*.yaml`) lists only what differs from these defaults; a command "
        "line's `key=value` overrides come last (`train.batch_size=64`, "
        "`solver.steps=[5,8]`, `model.bn_size=null`). A key that does not exist, a value of "
        "the wrong type or outside its range stops the command with one line naming the "
        "key (exit code 2). `megdet config PRESET [key=value ...]` prints the config a run "
        "would get.",
    ]
    for section in sections():
        out += ["", f"## {section.name}" if section.name else "## Top level", ""]
        if section.about:
            out += [section.about, ""]
        out += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for key in section.keys:
            cells = [f"`{key.key}`", key.type, f"`{key.default}`", key.allowed]
            cells.append(key.meaning)
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(out) + "\n"
