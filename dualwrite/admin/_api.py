"""The admin API's machinery: endpoints declared as data, validated with pydantic, described in
OpenAPI from the same declarations.

An ``Endpoint`` names its method, path, handler and models (path parameters, query, JSON body,
response). ``routes()`` turns endpoints into Starlette routes that validate every input before the
handler runs (bad input: 400 with Stripe's error shape, naming the parameter; nothing changed) and
map dualwrite's errors to statuses; ``openapi()`` writes the OpenAPI 3.1 document from the same
endpoints and models, so the schema cannot drift from what is served. Adding an operation is one
``Endpoint(...)`` in a tuple that ``AdminApp`` serves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dualwrite._http import stripe_error
from dualwrite.exceptions import ApiError, ConflictError, StoreUnavailableError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from dualwrite.config import Settings
    from dualwrite.engine import DualWriteEngine
    from dualwrite.flags import RedisFlagStore
    from dualwrite.keys import KeySpace

__all__ = [
    "MAX_BODY_BYTES",
    "AdminContext",
    "ApiError",
    "Call",
    "Endpoint",
    "ErrorBody",
    "ErrorDetail",
    "openapi",
    "routes",
]

M = TypeVar("M", bound=BaseModel)

#: The largest JSON body an admin request may carry.
MAX_BODY_BYTES = 64 * 1024
_REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    """The inside of ``ErrorBody``."""

    type: str
    message: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    """Stripe's error shape: ``{"error": {"type", "message", "code"?, "param"?}}``."""

    error: ErrorDetail


@dataclass(frozen=True, slots=True)
class AdminContext:
    """What handlers work with: the settings, Redis, the key layout and the flag store."""

    settings: Settings
    redis: aioredis.Redis
    keys: KeySpace
    flags: RedisFlagStore
    engine: DualWriteEngine | None = None
    """The engine the API shares (the proxy's), if any."""
    clock: Callable[[], float] = time.time


@dataclass(frozen=True, slots=True)
class Call:
    """One request's validated inputs."""

    path: BaseModel | None
    query: BaseModel | None
    body: BaseModel | None

    def path_as(self, model: type[M]) -> M:
        """The path parameters as ``model``."""
        return _as(self.path, model)

    def query_as(self, model: type[M]) -> M:
        """The query parameters as ``model``."""
        return _as(self.query, model)

    def body_as(self, model: type[M]) -> M:
        """The JSON body as ``model``."""
        return _as(self.body, model)


def _as(value: BaseModel | None, model: type[M]) -> M:
    if not isinstance(value, model):
        msg = f"the endpoint declares no {model.__name__} input"
        raise TypeError(msg)
    return value


Handler = Callable[[AdminContext, Call], Awaitable[BaseModel]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One operation of the admin API."""

    method: str
    path: str
    """Below the API's mount point, with Starlette parameters: ``/customers/{customer}``."""
    handler: Handler
    summary: str
    response: type[BaseModel]
    path_params: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    tag: str = "flags"
    errors: tuple[int, ...] = field(default=())
    """Statuses the handler itself may answer besides the common ones (e.g. 409)."""
    max_body: int = MAX_BODY_BYTES
    """The largest JSON body this operation accepts (a cohort of customers needs more)."""

    @property
    def operation_id(self) -> str:
        """A stable id for the OpenAPI document (``put_customers_customer_override``)."""
        words = [part.strip("{}") for part in self.path.split("/") if part]
        return "_".join([self.method.lower(), *words]).replace("-", "_").replace(".", "_")


# -- serving -------------------------------------------------------------------------------------


def routes(endpoints: Iterable[Endpoint], context: AdminContext) -> list[Route]:
    """Starlette routes for ``endpoints``: one per path, dispatching on the method."""
    by_path: dict[str, dict[str, Endpoint]] = {}
    for endpoint in endpoints:
        by_path.setdefault(endpoint.path, {})[endpoint.method] = endpoint
    return [
        Route(path, _dispatcher(methods, context), methods=list(methods))
        for path, methods in by_path.items()
    ]


def _dispatcher(
    methods: dict[str, Endpoint], context: AdminContext
) -> Callable[[Request], Awaitable[Response]]:
    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        endpoint = methods[method]
        try:
            call = Call(
                path=_validate(endpoint.path_params, dict(request.path_params), strict=False),
                query=_validate(endpoint.query, _query(request), strict=False),
                body=await _body(endpoint.body, request, endpoint.max_body),
            )
            result = await endpoint.handler(context, call)
        except ApiError as exc:
            return stripe_error(
                exc.status, exc.message, error_type=exc.error_type, code=exc.code, param=exc.param
            )
        except ConflictError as exc:
            return stripe_error(409, str(exc), code="lock_timeout")
        except StoreUnavailableError:
            # The store's message names the action only; the response says no more than that.
            return stripe_error(
                503,
                "Redis is unavailable; nothing was read or changed. Retry shortly.",
                error_type="api_error",
                headers={"Retry-After": "5"},
            )
        return JSONResponse(result.model_dump(mode="json"))

    return dispatch


def _query(request: Request) -> dict[str, Any]:
    params = request.query_params
    repeated = sorted({key for key in params if len(params.getlist(key)) > 1})
    if repeated:
        raise ApiError(400, f"{repeated[0]} is given more than once", param=repeated[0])
    return dict(params)


async def _body(
    model: type[BaseModel] | None, request: Request, limit: int = MAX_BODY_BYTES
) -> BaseModel | None:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"The request body is larger than {limit} bytes.")
    if model is None:
        if raw.strip():
            raise ApiError(400, "This operation takes no request body.")
        return None
    if not raw.strip():
        raise ApiError(400, "A JSON object is required as the request body.")
    try:
        data = json.loads(raw, parse_float=_json_number, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return _validate(model, data, strict=True)


def _json_number(text: str) -> int | float:
    """A JSON number with a fraction part: ``568.0`` is the integer 568 (as JSON Schema counts it),
    so that an integer field takes it under strict validation; ``2.5`` stays a float."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _no_constant(name: str) -> None:
    """``NaN`` and ``Infinity`` are not JSON (Python's parser accepts them by default)."""
    raise ValueError(f"{name} is not a JSON value")


def _validate(model: type[M] | None, data: dict[str, Any], *, strict: bool) -> M | None:
    """``data`` as ``model`` (strict: JSON types as declared; lax: query and path strings)."""
    if model is None:
        if data:
            name = sorted(data)[0]
            raise ApiError(400, f"Received unknown parameter: {name}", param=name)
        return None
    try:
        if strict:
            return model.model_validate_json(json.dumps(data), strict=True)
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        reason = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            raise ApiError(400, f"Received unknown parameter: {param}", param=param) from None
        message = f"Invalid {param}: {reason}" if param else reason
        raise ApiError(400, message, param=param) from None


# -- describing ----------------------------------------------------------------------------------

_COMMON_ERRORS = {
    401: "Missing or wrong bearer token.",
    403: "The API is disabled: no token configured.",
    503: "Redis is unavailable.",
}
_ERROR_DESCRIPTIONS = {
    400: "Invalid input; nothing changed.",
    404: "Unknown path.",
    409: "A concurrent change; retry.",
    413: "Request body too large.",
    502: "Stripe refused a call or could not be reached; no flag changed (the message says "
    "which call, Stripe's status and code, and any Stripe object already created).",
}


def openapi(endpoints: Iterable[Endpoint], *, server: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing ``endpoints``, served under ``server``."""
    endpoints = list(endpoints)
    inputs = [
        (model, "validation")
        for endpoint in endpoints
        for model in (endpoint.path_params, endpoint.query, endpoint.body)
        if model is not None
    ]
    outputs = [(endpoint.response, "serialization") for endpoint in endpoints]
    refs, defs = models_json_schema(
        [*inputs, *outputs, (ErrorBody, "serialization")],  # type: ignore[list-item]
        ref_template=_REF,
    )
    schemas = defs.get("$defs", {})
    error_ref = refs[ErrorBody, "serialization"]
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        operation: dict[str, Any] = {
            "operationId": endpoint.operation_id,
            "summary": endpoint.summary,
            "tags": [endpoint.tag],
            "parameters": [
                *_parameters(endpoint.path_params, "path", schemas, refs),
                *_parameters(endpoint.query, "query", schemas, refs),
            ],
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {
                        "application/json": {"schema": refs[endpoint.response, "serialization"]}
                    },
                },
            },
        }
        if endpoint.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[endpoint.body, "validation"]}},
            }
        statuses = {400, 413, *_COMMON_ERRORS, *endpoint.errors}
        if endpoint.path_params is not None:
            statuses.add(404)
        for status in sorted(statuses):
            description = _COMMON_ERRORS.get(status) or _ERROR_DESCRIPTIONS.get(status, "Error")
            operation["responses"][str(status)] = {
                "description": description,
                "content": {"application/json": {"schema": error_ref}},
            }
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dualwrite admin API",
            "version": version,
            "description": (
                "Read and change customers' migration stages (the same operations as "
                "`dualwrite flags`), and move them between stages as `dualwrite rollout`, "
                "`cutover`, `rollback` and `guard` do. Every change is audited. Errors use "
                "Stripe's shape."
            ),
        },
        "servers": [{"url": server or "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _parameters(
    model: type[BaseModel] | None, where: str, schemas: dict[str, Any], refs: dict[Any, Any]
) -> list[dict[str, Any]]:
    """A model's fields as OpenAPI parameters (its schema inlined from ``schemas``)."""
    if model is None:
        return []
    schema = schemas[refs[model, "validation"]["$ref"].rsplit("/", 1)[-1]]
    required = set(schema.get("required", []))
    return [
        {
            "name": name,
            "in": where,
            "required": where == "path" or name in required,
            "schema": {key: value for key, value in prop.items() if key != "title"},
            **({"description": prop["description"]} if "description" in prop else {}),
        }
        for name, prop in schema.get("properties", {}).items()
    ]
