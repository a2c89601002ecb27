"""Keeping Stripe secrets out of anything dualwrite writes down: logs, Redis, reports, error bodies."""

from __future__ import annotations

import re

__all__ = ["mask_key", "redact"]

_SECRET_RE = re.compile(r"\b((?:sk|rk|pk|whsec|ek)_(?:test|live)?_?)([A-Za-z0-9]{4,})\b")


def mask_key(key: str) -> str:
    """Show a key as Stripe does in its own errors: its kind and last four characters only."""
    match = _SECRET_RE.fullmatch(key)
    if not match:
        return "****"
    return f"{match.group(1)}****{match.group(2)[-4:]}"


def redact(text: str) -> str:
    """Replace every Stripe key-like token in ``text`` by its masked form."""
    return _SECRET_RE.sub(lambda match: f"{match.group(1)}****{match.group(2)[-4:]}", text)
