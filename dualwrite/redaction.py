"""Keeping Stripe secrets out of anything dualwrite writes down: logs, Redis, reports, error bodies."""

from __future__ import annotations

import re

__all__ = ["mask_key", "redact"]

# A key's kind (sk_live_, rk_test_, whsec_ …) then its secret part; "_" inside the secret part is
# allowed, so that a key followed by more text still masks whole.
_SECRET_RE = re.compile(
    r"(?<![A-Za-z0-9])((?:sk|rk|pk|whsec|ek)_(?:test_|live_)?)(?!(?:test|live)_)"
    r"([A-Za-z0-9][A-Za-z0-9_]{3,})"
)


def _masked(match: re.Match[str]) -> str:
    secret = match.group(2)
    # Real keys are long; for a short one, its last four characters would be most of it.
    tail = secret[-4:] if len(secret) >= 16 else ""
    return f"{match.group(1)}****{tail}"


def mask_key(key: str) -> str:
    """Show a key as Stripe does in its own errors: its kind and last four characters only."""
    match = _SECRET_RE.fullmatch(key)
    return _masked(match) if match else "****"


def redact(text: str) -> str:
    """Replace every Stripe key-like token in ``text`` by its masked form."""
    return _SECRET_RE.sub(_masked, text)
