"""The Jinja2 environment of the report page: autoescaping on, secrets redacted from every value.

Customer ids, event names, errors and audit reasons are untrusted text; autoescaping makes them inert,
and ``finalize`` runs every printed string through ``redact`` so that no Stripe key-like token is ever
shown, whatever a message carried.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from starlette.responses import HTMLResponse

from dualwrite.models import utc_time
from dualwrite.pricing import format_amount
from dualwrite.redaction import redact

__all__ = ["page"]

# A billing period id: ``20261101T000000Z/20261201T000000Z`` (start included, end excluded).
_BILLING_PERIOD_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})T\d{6}Z/(\d{4})(\d{2})(\d{2})T\d{6}Z$")


def _finalize(value: Any) -> Any:
    # Markup is already escaped (and built by us); anything else that prints as text is redacted.
    if isinstance(value, Markup) or not isinstance(value, str):
        return value
    return redact(value)


def _number(value: int) -> str:
    return f"{value:,}"


def _signed(value: int) -> str:
    return f"{value:+,}" if value else "0"


def _percent(value: float) -> str:
    return f"{value:+.2f} %"


def _when(at: float) -> str:
    return utc_time(at)


def _share(percent: float) -> str:
    # A rollout share as `dualwrite flags rollout` prints it: 25 %, 12.5 %.
    return f"{percent:g} %"


def _period(period: str) -> str:
    match = _BILLING_PERIOD_RE.fullmatch(period)
    if match is None:
        return period
    y1, m1, d1, y2, m2, d2 = match.groups()
    return f"{y1}-{m1}-{d1} → {y2}-{m2}-{d2}"


def _money(amount: int, currency: str, signed: bool = False) -> str:
    return format_amount(amount, currency, signed=signed and bool(amount))


def _urlpart(value: str) -> str:
    return quote(value, safe="")


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("dualwrite.web", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        num=_number,
        signed=_signed,
        percent=_percent,
        when=_when,
        share=_share,
        period=_period,
        money=_money,
        urlpart=_urlpart,
    )
    return env


_ENV = _environment()


def page(
    template: str,
    *,
    root: str,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """Render ``template`` with ``root`` (the app's mount path, for links) and ``context``."""
    context.setdefault("nav", None)
    html = _ENV.get_template(template).render(root=root, **context)
    return HTMLResponse(html, status_code=status, headers=headers)
