"""Structured logs: one JSON object per line, secrets scrubbed.

``DUALWRITE_LOG_FORMAT=json`` (or ``log_format = "json"`` in the config file) makes ``dualwrite
serve`` and ``dualwrite worker`` log through ``JsonFormatter``::

    {"ts": "2026-11-25T23:59:01.123Z", "level": "warning", "logger": "dualwrite.flags",
     "message": "stage lookup failed ...", "customer": "cus_123"}

Fields: ``ts`` (UTC, milliseconds), ``level``, ``logger``, ``message``, then every ``extra=``
field of the call at the top level (one that would overwrite those four is kept as
``extra_<name>``), and ``exc`` / ``stack`` when there is a traceback. Every string, extras and
tracebacks included, goes through ``scrub()``: Stripe keys are masked (``dualwrite.redaction``),
and so are bearer tokens, passwords in URLs (``redis://:pw@host``) and ``token=`` query
parameters (the report page accepts one in a URL, which access logs would otherwise keep).
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel

from dualwrite.redaction import redact

__all__ = [
    "JsonFormatter",
    "LogFormat",
    "ScrubbingFormatter",
    "configure_logging",
    "log_config",
    "scrub",
]

LogFormat = Literal["text", "json"]
"""How log lines look: ``text`` for people, ``json`` for log pipelines."""

_CORE = ("ts", "level", "logger", "message")
# Attributes every LogRecord has: whatever else a record carries came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's coloured copy of the message
}
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_TOKEN_PARAM_RE = re.compile(r"(?i)([?&](?:token|access_token)=)[^&\s\"']+")
_URL_PASSWORD_RE = re.compile(r"(://[^/:@\s]*:)[^@/\s]+@")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def scrub(text: str) -> str:
    """``text`` with Stripe keys masked, and bearer tokens, URL passwords and ``token=``
    parameters hidden."""
    text = redact(text)
    text = _BEARER_RE.sub(r"\1****", text)
    text = _URL_PASSWORD_RE.sub(r"\1****@", text)
    return _TOKEN_PARAM_RE.sub(r"\1****", text)


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-ready data, every string scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth > 5:
        return scrub(repr(value))
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(mode="json"), depth + 1)
    if isinstance(value, dict):
        return {scrub(str(key)): _plain(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item, depth + 1) for item in value]
    return scrub(str(value))


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        ts = datetime.fromtimestamp(record.created, tz=UTC)
        entry: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            entry[f"extra_{key}" if key in _CORE else key] = _plain(value)
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = scrub(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class ScrubbingFormatter(logging.Formatter):
    """A plain text formatter whose lines go through ``scrub()``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a text line, scrubbed."""
        return scrub(super().format(record))


def log_config(log_format: LogFormat = "text", *, level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for dualwrite's and uvicorn's loggers, on stderr.

    Also usable as uvicorn's ``log_config``.
    """
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if log_format == "json"
        else {"()": ScrubbingFormatter, "fmt": _TEXT_FORMAT}
    )
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "dualwrite",
        "stream": "ext://sys.stderr",
    }
    # One handler, on the root logger: every library's lines come out in the same format, and
    # dualwrite's and uvicorn's loggers only set their level.
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"dualwrite": formatter},
        "handlers": {"dualwrite": handler},
        "root": {"handlers": ["dualwrite"], "level": "WARNING"},
        "loggers": {
            name: {"level": level, "handlers": [], "propagate": True}
            for name in ("dualwrite", "uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def configure_logging(log_format: LogFormat = "text", *, level: str = "INFO") -> None:
    """Send dualwrite's (and uvicorn's) logs to stderr in ``log_format``."""
    logging.config.dictConfig(log_config(log_format, level=level))
