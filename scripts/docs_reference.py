"""The documentation's generated reference pages, as an mkdocs hook (``mkdocs.yml`` ``hooks:``).

A page holding a line ``<!-- generated: NAME -->`` gets that line replaced, at every build, by:

* ``config``: every configuration key, by table, from the settings models (the walk the config
  template is written with: ``dualwrite.config_template.config_tables``);
* ``cli``: every command of ``dualwrite``, from the Typer app (usage, help, arguments, options);
* ``admin-api``: every operation of the admin API, from its OpenAPI document.

So the reference cannot drift from the code. ``python scripts/docs_reference.py NAME`` prints one.
"""

from __future__ import annotations

import html
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer

from dualwrite.admin import DEFAULT_ENDPOINTS
from dualwrite.admin._api import openapi
from dualwrite.cli import app as cli_app
from dualwrite.config import ENV_PREFIX
from dualwrite.config_template import config_tables, describe, environment_only, shown_value

MARKER = re.compile(r"^<!-- generated: (?P<name>[a-z-]+) -->$", re.MULTILINE)


def _cell(text: str) -> str:
    """Text for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    """Inline code for a table cell (a backtick inside is doubled around)."""
    text = _cell(text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


# -- configuration keys ---------------------------------------------------------------------------


def config_reference() -> str:
    """Every key, by table, with its default and what it does."""
    lines = [
        "Every key can also be set in the environment as "
        f"`{ENV_PREFIX}<SECTION>__<KEY>` (for example `{ENV_PREFIX}REDIS__URL`), which wins "
        "over the file. `dualwrite config init -` prints the same keys as a commented file.",
        "",
        "## Environment only",
        "",
        "Secrets are read only from the environment; a config file holding one is refused.",
        "",
        "| variable | what |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {_cell(text)} |" for name, text in environment_only()]
    for table in config_tables():
        title = table.header or "Top level"
        lines += ["", f"## `{title}`" if table.header else f"## {title}", ""]
        if table.description:
            lines += [table.description, ""]
        if table.example:
            lines += ["Not in the file by default: the template shows it as an example.", ""]
        lines += ["| key | default | what |", "|---|---|---|"]
        for key, field in table.keys:
            value = shown_value(field, example=table.example)
            shown = _code(value) if value is not None else "(none)"
            lines.append(f"| `{key}` | {shown} | {_cell(describe(field))} |")
    return "\n".join(lines) + "\n"


# -- the command line -----------------------------------------------------------------------------


def _commands(command: Any, path: list[str], parent: Any = None) -> Iterator[tuple[Any, Any]]:
    """Every command under ``command``, depth first, each with its context."""
    ctx = type(parent or typer.Context(command))(command, info_name=path[-1], parent=parent)
    yield command, ctx
    for name in getattr(command, "commands", {}) and command.list_commands(ctx):
        yield from _commands(command.commands[name], [*path, name], ctx)


def cli_reference() -> str:
    """Every command: usage, help, arguments and options."""
    root = typer.main.get_command(cli_app)
    lines: list[str] = []
    for command, ctx in _commands(root, ["dualwrite"]):
        if command.hidden:
            continue
        name = ctx.command_path
        level = "#" * min(2 + name.count(" "), 4)
        lines += [f"{level} `{name}`", ""]
        usage = " ".join([name, *command.collect_usage_pieces(ctx)])
        lines += ["```text", usage, "```", ""]
        if command.help:
            lines += [_help_text(command.help), ""]
        rows = []
        for param in command.get_params(ctx):
            if param.name in ("help", "install_completion", "show_completion"):
                continue
            record = param.get_help_record(ctx)
            if record is None:  # an argument
                shown = param.make_metavar(ctx)
                text = getattr(param, "help", None) or ""
            else:
                shown, text = record
            rows.append(f"| {_code(shown)} | {_cell(text)} |")
        if rows:
            lines += ["| argument or option | what |", "|---|---|", *rows, ""]
    return "\n".join(lines)


def _help_text(text: str) -> str:
    """A command's help as Markdown: Typer's paragraphs, with literal backticks kept."""
    paragraphs = [" ".join(part.split()) for part in text.split("\n\n")]
    return "\n\n".join(html.escape(part, quote=False) for part in paragraphs if part)


# -- the admin API --------------------------------------------------------------------------------


def admin_reference() -> str:
    """Every operation of the admin API: method and path, what it does, its parameters, body and
    replies, from the OpenAPI document the API serves."""
    document = openapi(DEFAULT_ENDPOINTS, server="/_dualwrite/admin", version="(this version)")
    schemas: dict[str, Any] = document["components"]["schemas"]
    lines = [
        document["info"]["description"],
        "",
        "Served under `/_dualwrite/admin` by `dualwrite serve`; every request needs "
        "`Authorization: Bearer $DUALWRITE_ADMIN_TOKEN`. `GET /_dualwrite/admin/openapi.json` "
        "returns the whole OpenAPI 3.1 document this page is made from.",
    ]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            summary = operation["summary"].rstrip(".")
            lines += ["", f"## `{method.upper()} {path}`", "", f"{summary}."]
            parameters = operation.get("parameters", [])
            if parameters:
                lines += ["", "| parameter | in | type | what |", "|---|---|---|---|"]
                for parameter in parameters:
                    lines.append(
                        f"| `{parameter['name']}` | {parameter['in']} | "
                        f"{_type(parameter['schema'], schemas)} | "
                        f"{_cell(parameter.get('description', ''))} |"
                    )
            body = operation.get("requestBody")
            if body is not None:
                schema = _resolve(body["content"]["application/json"]["schema"], schemas)
                lines += ["", "Body (JSON):", "", *_fields(schema, schemas)]
            reply = _resolve(
                operation["responses"]["200"]["content"]["application/json"]["schema"], schemas
            )
            lines += ["", f"Reply: `200` {_cell(reply.get('title', 'JSON'))}."]
            lines += ["", "Errors, in Stripe's error shape:", ""]
            lines += [
                f"- `{status}`: {_cell(answer['description'])}"
                for status, answer in operation["responses"].items()
                if status != "200"
            ]
    return "\n".join(lines) + "\n"


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """A schema with its ``$ref`` followed."""
    ref = schema.get("$ref")
    if ref is None:
        return schema
    resolved: dict[str, Any] = schemas[ref.rsplit("/", 1)[1]]
    return resolved


def _type(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    """A schema's type in a few words."""
    if "$ref" in schema:
        return _cell(_resolve(schema, schemas).get("title", "object"))
    if "enum" in schema:
        return " \\| ".join(f"`{value}`" for value in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(_type(part, schemas) for part in schema[key])
    if schema.get("type") == "array":
        return f"list of {_type(schema.get('items', {}), schemas)}"
    return str(schema.get("type", "any"))


def _fields(schema: dict[str, Any], schemas: dict[str, Any]) -> list[str]:
    """A body's fields as a table."""
    required = set(schema.get("required", []))
    rows = ["| field | type | required | what |", "|---|---|---|---|"]
    for name, field in schema.get("properties", {}).items():
        text = field.get("description") or _resolve(field, schemas).get("description", "")
        mark = "yes" if name in required else ""
        rows.append(f"| `{name}` | {_type(field, schemas)} | {mark} | {_cell(text)} |")
    return rows


# -- the hook -------------------------------------------------------------------------------------

GENERATORS: dict[str, Callable[[], str]] = {
    "config": config_reference,
    "cli": cli_reference,
    "admin-api": admin_reference,
}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """mkdocs hook: replace each ``<!-- generated: NAME -->`` line with that reference."""

    def generate(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in GENERATORS:
            msg = f"no generated reference named {name!r} (known: {', '.join(GENERATORS)})"
            raise ValueError(msg)
        return GENERATORS[name]()

    return MARKER.sub(generate, markdown)


if __name__ == "__main__":
    print(GENERATORS[sys.argv[1]]())
