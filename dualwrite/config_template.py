"""The config template: every key of the settings models, with its default and what it does.

``render_template()`` writes it from ``dualwrite.config.Settings`` (the field docstrings are the
comments; ``config_tables()`` is the walk it shares with the documentation's reference page), so
a key added to a model is in the template as soon as it is regenerated; the copy shipped in the
package (``config_template.toml``, what ``dualwrite config init`` writes) and the repository's
``config/dualwrite.toml`` are that text, and a test fails while either differs. Regenerate both
with::

    python -m dualwrite.config_template

Sections holding lists or maps of tables (``[[meters]]``, ``[[routes]]``, ``[items.<si>]``) are
written as commented-out examples: a new file changes nothing until its owner says so.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from importlib.resources import files
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from dualwrite.config import ENV_PREFIX, Settings, model_of

__all__ = [
    "REGENERATE",
    "REPOSITORY_COPY",
    "TEMPLATE_NAME",
    "ConfigTable",
    "config_tables",
    "describe",
    "environment_only",
    "packaged_template",
    "render_template",
    "shown_value",
]

#: The packaged template's file name, beside this module.
TEMPLATE_NAME = "config_template.toml"
#: The repository's copy, relative to the repository root.
REPOSITORY_COPY = Path("config") / "dualwrite.toml"
#: The command that rewrites both from the models.
REGENERATE = "python -m dualwrite.config_template"

_WIDTH = 100
_HEADER = (
    "dualwrite configuration: every key, with its default and what it does.",
    "Written by `dualwrite config init`, generated from the settings models "
    f"({REGENERATE}). Point dualwrite at it with --config/-c or DUALWRITE_CONFIG; "
    "`dualwrite config check` validates it and tries Redis and Stripe.",
    f"Every key can also come from the environment, {ENV_PREFIX}<SECTION>__<KEY> (e.g. "
    f"{ENV_PREFIX}REDIS__URL=redis://cache:6379/0), which wins over this file. Secrets come ONLY "
    "from the environment (a file holding one is refused):",
)


def packaged_template() -> str:
    """The template shipped inside the package (what ``dualwrite config init`` writes)."""
    return files("dualwrite").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class ConfigTable:
    """One table of the settings as the template and the reference show it: its keys, with their
    fields (defaults, descriptions, examples)."""

    name: str
    """The table's name (``""``: the keys at the top of the file)."""
    header: str
    """How the template writes it: ``[redis]``, ``[[meters]]``, ``[items.si_Example]``."""
    description: str
    example: bool
    """A list or map of tables: written as a commented-out example."""
    keys: tuple[tuple[str, FieldInfo], ...]


def environment_only() -> list[tuple[str, str]]:
    """The values read only from the environment (secrets): variable, what it is."""
    return [
        (str(field.validation_alias), describe(field))
        for field in Settings.model_fields.values()
        if field.validation_alias
    ]


def config_tables() -> list[ConfigTable]:
    """Every key of ``Settings``, by table: the top-level keys first, then each section."""
    top: list[tuple[str, FieldInfo]] = []
    tables: list[ConfigTable] = []
    for name, field in Settings.model_fields.items():
        if field.validation_alias:
            continue
        model = model_of(field.annotation)
        if model is None:
            top.append((name, field))
            continue
        origin = getattr(field.annotation, "__origin__", None)
        if origin is None:  # one table: [redis]
            header, description = f"[{name}]", _docstring(model.__doc__)
        else:  # a list ([[meters]]) or a map ([items.<si>]) of tables: an example
            header = f"[{name}.si_Example]" if origin is dict else f"[[{name}]]"
            description = describe(field)
        keys = tuple(model.model_fields.items())
        tables.append(ConfigTable(name, header, description, origin is not None, keys))
    return [ConfigTable("", "", "", False, tuple(top)), *tables]


def shown_value(field: FieldInfo, *, example: bool = False) -> str | None:
    """The key's value as the template shows it, in TOML (None: no default)."""
    value = _shown_value(field, example=example)
    return None if value is None else _toml(value)


def render_template() -> str:
    """The template, written from ``Settings`` now."""
    lines: list[str] = []
    for paragraph in _HEADER:
        lines += [*_comment(paragraph), "#"]
    for variable, description in environment_only():
        lines += _comment(f"  {variable}: {description}", indent="    ")
    lines.append("")
    top, *tables = config_tables()
    for key, field in top.keys:
        lines += [*_comment(describe(field)), _assignment(key, field), ""]
    for table in tables:
        lines += _table(table)
    return "\n".join(lines).rstrip("\n") + "\n"


def _table(table: ConfigTable) -> list[str]:
    if not table.example:
        lines = [*_comment(table.description), table.header]
        for key, inner in table.keys:
            lines += [*_comment(describe(inner)), _assignment(key, inner)]
        return [*lines, ""]
    lines = [*_comment(table.description), f"# {table.header}"]
    for key, inner in table.keys:
        lines += [*_comment(describe(inner)), f"# {_assignment(key, inner, example=True)}"]
    return [*lines, ""]


def describe(field: FieldInfo) -> str:
    """A field's docstring on one line, its RST literals as Markdown ones."""
    return _docstring(field.description or "")


def _docstring(text: str | None) -> str:
    # RST literals read as Markdown ones in a TOML comment.
    return " ".join((text or "").split()).replace("``", "`")


def _comment(text: str, *, indent: str = "") -> list[str]:
    if not text:
        return []
    return [
        f"# {line}".rstrip()
        for line in textwrap.wrap(
            text, _WIDTH - 2, subsequent_indent=indent, break_on_hyphens=False
        )
    ]


def _assignment(key: str, field: FieldInfo, *, example: bool = False) -> str:
    value = _shown_value(field, example=example)
    if value is None:
        return f"# {key} = {_toml(field.examples[0])}" if field.examples else f"# {key} ="
    return f"{key} = {_toml(value)}"


def _shown_value(field: FieldInfo, *, example: bool) -> Any:
    """The value the template shows: the default; an example where the default depends on the
    environment (a factory) or, in an example table, where there is one."""
    if field.examples and (example or field.default_factory is not None):
        return field.examples[0]
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return None
    return field.default


def _toml(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            msg = f"a template value must be finite, got {value}"
            raise ValueError(msg)
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    msg = f"no TOML form for {value!r}"
    raise TypeError(msg)


def _write(root: Path) -> Iterator[Path]:
    text = render_template()
    for path in (Path(__file__).with_name(TEMPLATE_NAME), root / REPOSITORY_COPY):
        if path.parent.is_dir():
            path.write_text(text, encoding="utf-8")
            yield path


if __name__ == "__main__":
    for written in _write(Path(__file__).resolve().parent.parent):
        print(f"wrote {written}")
