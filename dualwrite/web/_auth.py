"""``TokenGate``: the report page answers only to the bearer token in ``DUALWRITE_REPORT_TOKEN``.

The scheme:

* API clients send ``Authorization: Bearer <token>``. When that header is present it alone decides.
* A browser signs in once: through the form on the 401 page (``POST <root>/login``: the token never
  appears in a URL or an access log), or by opening any page with ``?token=<token>``. Either sets a
  cookie and redirects (303) to the page without the token.
* The cookie holds HMAC-SHA256 of a fixed label keyed with the token, not the token itself. It is
  ``HttpOnly``, ``SameSite=Strict``, scoped to the app's path, ``Secure`` over https, and expires
  after 12 hours. Changing the token invalidates every cookie.
* No token configured, or one shorter than 16 characters: every request is refused (403), never an
  open page. A missing or wrong credential: 401 with ``WWW-Authenticate: Bearer`` and no data.
  These token rules are ``dualwrite._bearer``'s, shared with the admin API's and ``/metrics``'s
  ``BearerGate``.

Every response, refusals included, carries ``Cache-Control: no-store`` and a content security policy
that allows no script at all.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs, quote, urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dualwrite._bearer import MIN_TOKEN_LENGTH, bearer_matches, challenge, token_problem
from dualwrite.web._render import page

__all__ = ["COOKIE_MAX_AGE", "COOKIE_NAME", "LOGIN_PATH", "MIN_TOKEN_LENGTH", "TokenGate"]

COOKIE_NAME = "dualwrite_report"
COOKIE_MAX_AGE = 12 * 3600
LOGIN_PATH = "/login"
_MAX_FORM_BYTES = 4096
_COOKIE_LABEL = b"dualwrite report cookie v1"
_REALM = "dualwrite report"
_SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class TokenGate:
    """Lets a request through to ``app`` only with the report token (see the module docstring).

    Args:
        app: the report pages.
        token: ``DUALWRITE_REPORT_TOKEN`` (``None``: not set, so every request is refused).
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self._problem = token_problem(token, variable="DUALWRITE_REPORT_TOKEN", what="")
        self._token = (token or "").encode()
        self._cookie = hmac.new(self._token, _COOKIE_LABEL, hashlib.sha256).hexdigest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS]
            await send(message)

        refusal = await self._check(Request(scope, receive))
        if refusal is None:
            await self.app(scope, receive, send_secured)
        else:
            await refusal(scope, receive, send_secured)

    async def _check(self, request: Request) -> Response | None:
        """``None`` to let the request through, else the response that answers it."""
        root = request.scope.get("root_path", "")
        if self._problem is not None:
            return page(
                "message.html",
                root=root,
                status=403,
                title="Report disabled",
                message=self._problem,
            )
        header = request.headers.get("authorization")
        if header is not None:
            if bearer_matches(header.encode("latin-1"), self._token):
                return None
            return self._unauthorized(request, invalid=True)
        route = _route(request.scope)
        if route == LOGIN_PATH and request.method == "POST":
            return await self._login(request, root)
        if "token" in request.query_params:
            if not self._valid(request.query_params["token"].encode()):
                return self._unauthorized(request, invalid=True)
            return self._signed_in(request, _without_token(request))
        if hmac.compare_digest(
            request.cookies.get(COOKIE_NAME, "").encode(), self._cookie.encode()
        ):
            return None
        return self._unauthorized(request, invalid=False)

    def _valid(self, credential: bytes) -> bool:
        return hmac.compare_digest(credential, self._token)

    async def _login(self, request: Request, root: str) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_FORM_BYTES:
                return PlainTextResponse("Request body too large.", status_code=413)
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
        token = form.get("token", [""])[0]
        target = _safe_target(form.get("next", [""])[0], root)
        if not self._valid(token.encode()):
            return self._unauthorized(request, invalid=True, target=target)
        return self._signed_in(request, target)

    def _signed_in(self, request: Request, target: str) -> Response:
        root = request.scope.get("root_path", "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            self._cookie,
            max_age=COOKIE_MAX_AGE,
            path=f"{root}/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    def _unauthorized(
        self, request: Request, *, invalid: bool, target: str | None = None
    ) -> Response:
        root = request.scope.get("root_path", "")
        return page(
            "login.html",
            root=root,
            status=401,
            headers={"WWW-Authenticate": challenge(_REALM, invalid=invalid)},
            invalid=invalid,
            target=target or _without_token(request),
        )


def _route(scope: Scope) -> str:
    """The path below the app's mount point (``root_path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _without_token(request: Request) -> str:
    """The request's own path and query, less any ``token`` parameter."""
    path = quote(request.scope["path"])
    if _route(request.scope) == LOGIN_PATH:
        return f"{request.scope.get('root_path', '')}/"
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
    return f"{path}?{urlencode(query)}" if query else path


def _safe_target(target: str, root: str) -> str:
    """Where to go after signing in: a path of this app only (no open redirect), else its root."""
    home = f"{root}/"
    if (
        not target.startswith(home)
        or target.startswith("//")
        or "\\" in target
        or any(ord(char) < 0x21 for char in target)
        or target.partition("?")[0] == f"{root}{LOGIN_PATH}"
    ):
        return home
    return target
