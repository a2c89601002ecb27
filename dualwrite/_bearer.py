"""Bearer tokens: the one set of rules every token gate follows, and ``BearerGate``.

The rules (the report page's ``TokenGate`` in ``dualwrite.web`` follows them too, adding a
browser sign-in; the admin API and ``/metrics`` sit behind ``BearerGate``):

* a token comes from the environment only and has at least ``MIN_TOKEN_LENGTH`` characters; a
  required token that is not configured, or too short, refuses every request (403), never an open
  endpoint (``token_problem`` says what to set);
* the credential is ``Authorization: Bearer <token>``, compared in constant time
  (``hmac.compare_digest``, ``bearer_matches``);
* a missing or wrong credential gets 401 with ``WWW-Authenticate: Bearer`` (``challenge``) and
  nothing else.

``BearerGate``'s refusals are Stripe-style JSON, and every response it lets through or refuses
carries ``Cache-Control: no-store``.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dualwrite._http import stripe_error

__all__ = [
    "MIN_TOKEN_LENGTH",
    "TOKEN_HINT",
    "BearerGate",
    "bearer_matches",
    "challenge",
    "token_problem",
]

#: The shortest token a gate accepts as configured.
MIN_TOKEN_LENGTH = 16

#: What a refusal tells the operator to set a token to.
TOKEN_HINT = (
    f"a random value of at least {MIN_TOKEN_LENGTH} characters, e.g. "
    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
)

_NO_STORE = (b"cache-control", b"no-store")


def token_problem(token: str | None, *, variable: str, what: str) -> str | None:
    """Why ``token`` cannot guard anything (``None``: it can): not set, or too short; the message
    starts with ``what`` and names ``variable`` and the fix."""
    if token is None:
        return f"{what}{variable} is not set. Set it to {TOKEN_HINT}."
    if len(token) < MIN_TOKEN_LENGTH:
        return f"{what}{variable} is too short. Set it to {TOKEN_HINT}."
    return None


def bearer_matches(header: bytes, token: bytes) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (constant-time compare)."""
    scheme, _, credential = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), token)


def challenge(realm: str, *, invalid: bool) -> str:
    """The ``WWW-Authenticate`` value of a 401: ``invalid`` when a credential was sent but wrong."""
    value = f'Bearer realm="{realm}"'
    return f'{value}, error="invalid_token"' if invalid else value


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
        self._realm = realm
        self._open = token is None and not required
        self._problem = (
            None
            if self._open
            else token_problem(token, variable=variable, what=f"{realm} is disabled: ")
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
        status, message, www_authenticate = refusal
        headers = {"WWW-Authenticate": www_authenticate} if www_authenticate else None
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
            return 401, message, challenge(self._realm, invalid=False)
        if bearer_matches(header, self._token):
            return None
        message = f"Invalid bearer token: send Authorization: Bearer <{self._variable}>."
        return 401, message, challenge(self._realm, invalid=True)
