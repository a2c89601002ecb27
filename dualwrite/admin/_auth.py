"""``BearerGate``: a JSON API answers only to ``Authorization: Bearer <token>``.

The API sibling of the report page's ``TokenGate`` (``dualwrite.web``): the same token rules (at
least 16 characters, from the environment only, compared in constant time with
``hmac.compare_digest``), without cookies or sign-in pages, and with Stripe-style JSON refusals:

* a required token that is not configured (or too short): 403 for every request, never an open API;
* a missing or wrong credential: 401 with ``WWW-Authenticate: Bearer`` and nothing else.

Every response, refusals included, carries ``Cache-Control: no-store``.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dualwrite.middleware import stripe_error
from dualwrite.web._auth import MIN_TOKEN_LENGTH

__all__ = ["BearerGate"]

_NO_STORE = (b"cache-control", b"no-store")
_TOKEN_HINT = (
    f"a random value of at least {MIN_TOKEN_LENGTH} characters, e.g. "
    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
)


class BearerGate:
    """Lets a request through to ``app`` only with the bearer token (see the module docstring).

    Args:
        app: the API behind the gate.
        token: the configured token (``None``: not set).
        variable: the environment variable the token comes from (named in refusals).
        realm: the ``WWW-Authenticate`` realm.
        required: without a token, refuse everything (True) or let everything through (False).
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str | None,
        *,
        variable: str,
        realm: str,
        required: bool = True,
    ) -> None:
        self.app = app
        self._realm = f'Bearer realm="{realm}"'
        self._open = token is None and not required
        self._problem: str | None = None
        if token is None and required:
            self._problem = f"{realm} is disabled: {variable} is not set. Set it to {_TOKEN_HINT}."
        elif token is not None and len(token) < MIN_TOKEN_LENGTH:
            self._problem = (
                f"{realm} is disabled: {variable} is too short. Set it to {_TOKEN_HINT}."
            )
        self._token = (token or "").encode()
        self._variable = variable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open:
            await self.app(scope, receive, send)
            return

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), _NO_STORE]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send_no_store)
            return
        status, message, challenge = refusal
        headers = {"WWW-Authenticate": challenge} if challenge else None
        response = stripe_error(status, message, headers=headers)
        await response(scope, receive, send_no_store)

    def _refusal(self, scope: Scope) -> tuple[int, str, str | None] | None:
        """``None`` to let the request through, else (status, message, challenge)."""
        if self._problem is not None:
            return 403, self._problem, None
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        if not header:
            message = f"No bearer token: send Authorization: Bearer <{self._variable}>."
            return 401, message, self._realm
        scheme, _, credential = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self._token):
            return None
        message = f"Invalid bearer token: send Authorization: Bearer <{self._variable}>."
        return 401, message, f'{self._realm}, error="invalid_token"'
