"""Settings: a TOML file (``--config`` or ``DUALWRITE_CONFIG``) overlaid by ``DUALWRITE_*`` variables.

This is the one module that reads the environment. Nested keys use ``__`` in variable names
(``DUALWRITE_REDIS__URL`` sets ``[redis] url``). The Stripe key comes only from ``STRIPE_API_KEY``:
a config file that holds one is refused, so that keys never land in a repository.

Every validation failure becomes a ``ConfigError`` naming the key, the value and the fix.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from dualwrite.exceptions import ConfigError
from dualwrite.models import Action, Stage
from dualwrite.redaction import redact
from dualwrite.redis_url import (
    CLUSTER_SCHEMES,
    SENTINEL_SCHEMES,
    SINGLE_SCHEMES,
    parse_cluster_url,
    parse_sentinel_url,
)

__all__ = [
    "DEFAULT_LEGACY_API_VERSION",
    "DEFAULT_REDIS_URL",
    "FieldSource",
    "FlagSettings",
    "GuardrailSettings",
    "ItemMapping",
    "LedgerSettings",
    "LimitSettings",
    "MeterMapping",
    "OutboxSettings",
    "ProxySettings",
    "ReconcileSettings",
    "RedisSettings",
    "ReportSettings",
    "SetPolicy",
    "Settings",
    "StripeSettings",
    "UsageRoute",
    "WebhookSettings",
    "default_spool_dir",
    "unknown_variables",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The last Stripe API version before ``2025-03-31.basil`` removed usage records.
DEFAULT_LEGACY_API_VERSION = "2025-02-24.acacia"
ENV_PREFIX = "DUALWRITE_"

SetPolicy = Literal["translate", "refuse"]
"""How a legacy ``action=set`` reaches a ``sum`` meter: as the difference from the last value set
at that timestamp (``translate``, logged as divergence), or not at all (``refuse``: HTTP 400)."""

SourceKind = Literal["path", "query", "json", "form", "header", "const"]
_SOURCE_RE = re.compile(r"^(path|query|json|form|header|const):(.+)$")
_VERSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$")


class _Frozen(BaseModel):
    # Attribute docstrings become field descriptions: the config template's comments
    # (``dualwrite.config_template``) are written from them.
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class RedisSettings(_Frozen):
    """Where shared state lives."""

    url: str = Field(
        default_factory=lambda: os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
        examples=[DEFAULT_REDIS_URL],
    )
    """Where shared state lives (flags, outbox, ledger, divergence log); defaults to $REDIS_URL,
    else redis://127.0.0.1:6379/0. One server (``redis://host:port/db``, ``rediss://`` for TLS,
    ``unix:///path/to/socket``), a Redis Cluster's seed nodes
    (``redis+cluster://10.0.0.1:7000,10.0.0.2:7000``, ``rediss+cluster://`` for TLS), or Redis
    Sentinel and the master it watches (``redis+sentinel://s1:26379,s2:26379/mymaster``)."""
    key_prefix: str = Field(default="dualwrite", min_length=1, max_length=64)
    """Every key starts with this (letters, digits, '_', '-', '.'); give each environment its own."""
    shards: int = Field(default=1, ge=1, le=1024)
    """Customers are spread over this many shards (outbox streams, ledgers), each one Redis Cluster
    slot; on a cluster, a few per master (16 for three masters)."""
    socket_timeout: float = Field(default=1.0, gt=0, le=60)
    """Seconds before a Redis call gives up; on the request path a timeout means "safe stage"."""
    connect_timeout: float = Field(default=1.0, gt=0, le=60)
    """Seconds before connecting to Redis gives up."""
    allow_eviction: bool = False
    """Start even when Redis's ``maxmemory-policy`` can evict keys (``allkeys-*``, ``volatile-*``).
    Off by default: an evicted outbox entry, ledger row or idempotency record is lost or doubled
    usage, so ``serve``, ``worker`` and the middleware refuse to start on such a Redis."""

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value.startswith(CLUSTER_SCHEMES):
            parse_cluster_url(value)  # raises ValueError naming the fix
        elif value.startswith(SENTINEL_SCHEMES):
            parse_sentinel_url(value)
        elif not value.startswith(SINGLE_SCHEMES):
            msg = (
                "must start with redis://, rediss:// or unix:// (one server, e.g. "
                "redis://127.0.0.1:6379/0), redis+cluster:// / rediss+cluster:// (a Redis "
                "Cluster's seed nodes, e.g. redis+cluster://10.0.0.1:7000,10.0.0.2:7000) or "
                "redis+sentinel:// / rediss+sentinel:// (sentinels and the master's name, e.g. "
                "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster)"
            )
            raise ValueError(msg)
        return value

    @field_validator("key_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-.]+", value):
            msg = "use letters, digits, '_', '-' or '.' only (braces would break Redis Cluster hash tags)"
            raise ValueError(msg)
        return value


class ProxySettings(_Frozen):
    """The proxy's HTTP limits (``dualwrite serve``): what one caller, or many, may hold open.

    Answered as HTTP servers answer: 431 for headers over a limit, 408 for a request not received
    in time, 503 (``Retry-After``) past the connection cap; each closes the connection.
    """

    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    """The request line and headers of one request, in bytes (a Stripe SDK sends about 1 KiB)."""
    max_headers: int = Field(default=100, ge=8, le=10_000)
    """Header fields per request."""
    header_timeout: float = Field(default=10.0, gt=0, le=3600)
    """Seconds to receive a request's line and headers, from its first byte (or from the
    connection, for its first request)."""
    body_timeout: float = Field(default=60.0, gt=0, le=3600)
    """Seconds to receive a request's whole body, once its headers are in."""
    max_connections: int = Field(default=4096, ge=1, le=1_000_000)
    """Connections open at once; more are answered 503 and closed. ``dualwrite serve`` raises
    the process's open-file limit to fit, or lowers this (with a warning) when it cannot."""
    keep_alive_timeout: int = Field(default=5, ge=1, le=3600)
    """Seconds an idle keep-alive connection is kept open after a response."""
    fast_path: bool = True
    """Relay forwarded requests as bytes over the proxy's own keep-alive connections to the
    upstream, without ASGI (``dualwrite.proxy._fast``); off: every request goes through the ASGI
    app and aiohttp."""


class StripeSettings(_Frozen):
    """How dualwrite reaches Stripe (or the local stand-in)."""

    api_base: str = "https://api.stripe.com"
    """Where Stripe is (point it at ``dualwrite stripe-standin`` for tests and demos)."""
    meter_events_base: str | None = Field(
        default=None, examples=["https://meter-events.stripe.com"]
    )
    """Base address of the v2 meter event stream; defaults to ``https://meter-events.stripe.com``
    for Stripe and to ``api_base`` for anything else (the stand-in serves both)."""
    legacy_api_version: str = DEFAULT_LEGACY_API_VERSION
    """Usage records only exist up to this API version; it is sent on every legacy write."""
    timeout: float = Field(default=20.0, gt=0, le=300)
    """Seconds one Stripe call may take; the outbox retries shadow writes that time out."""
    max_connections: int = Field(default=200, ge=1, le=10_000)
    """Size of the HTTP connection pool to Stripe."""
    meter_path: Literal["v1", "v2"] = "v1"
    """How meter events are sent: ``v1`` (one synchronous, validated call per event; 1,000/s and one
    call per customer at a time) or ``v2`` (the meter event stream: batches of 100, 10,000 events/s,
    validated later, refusals reported as error-report events)."""
    request_retries: int = Field(default=2, ge=0, le=10)
    """How often a retryable failure of the authoritative write (network, 409, 429, 5xx) is retried
    within the request, with the same idempotency key, before the caller gets the error."""
    request_retry_wait: float = Field(default=0.2, ge=0, le=10)
    """First wait between those retries, doubled each time; a longer ``Retry-After`` ends them."""

    @field_validator("api_base", "meter_events_base")
    @classmethod
    def _http_base(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            msg = "must be an http:// or https:// base address, e.g. https://api.stripe.com"
            raise ValueError(msg)
        return value.rstrip("/") if value else value

    @field_validator("legacy_api_version")
    @classmethod
    def _pre_basil(cls, value: str) -> str:
        if not _VERSION_RE.fullmatch(value):
            msg = "must look like 2025-02-24.acacia"
            raise ValueError(msg)
        if value[:10] >= "2025-03-31":
            msg = "usage records were removed in 2025-03-31.basil; use 2025-02-24.acacia or older"
            raise ValueError(msg)
        return value

    @property
    def stream_base(self) -> str:
        """The base address used for the v2 meter event stream."""
        if self.meter_events_base:
            return self.meter_events_base
        if self.api_base == "https://api.stripe.com":
            return "https://meter-events.stripe.com"
        return self.api_base


class FlagSettings(_Frozen):
    """Stage resolution."""

    safe_stage: Stage = Stage.LEGACY
    """Stage used when Redis cannot be reached."""
    cache_ttl: float = Field(default=5.0, ge=0, le=3600)
    """Seconds a resolution is kept locally; pub/sub drops it sooner on any change."""
    rollout_salt: str = Field(default="dualwrite-rollout-v1", min_length=1)
    """Mixed into the rollout hash; changing it reshuffles which customers are in a percentage."""


class OutboxSettings(_Frozen):
    """Shadow-write delivery."""

    run_in_process: bool = True
    """Start a worker inside the ASGI lifespan (the middleware and ``dualwrite serve``)."""
    batch_size: int = Field(default=100, ge=1, le=10_000)
    """Outbox entries a worker reads at once."""
    concurrency: int = Field(default=16, ge=1, le=1_000)
    """Stripe calls in flight per worker."""
    block_ms: int = Field(default=500, ge=1, le=60_000)
    """Milliseconds a worker waits for new entries in one read of the outbox stream."""
    claim_idle_seconds: float = Field(default=30.0, gt=0)
    """Entries a dead worker left pending are claimed after this many idle seconds."""
    backoff_base: float = Field(default=0.5, gt=0)
    """Retry backoff of a failed shadow write: this * 2^attempt seconds, with jitter, and at least
    Stripe's Retry-After."""
    backoff_max: float = Field(default=60.0, gt=0)
    """The longest retry backoff, in seconds."""
    max_age_seconds: float = Field(default=3 * 86400, gt=0)
    """An entry still failing after this long is dead-lettered."""
    spool: bool = True
    """Keep commits locally (fsynced) while Redis is unreachable, and replay them when it returns."""
    spool_dir: Path | None = Field(default=None, examples=["/var/lib/dualwrite/spool"])
    """Where (default: ``$XDG_STATE_HOME/dualwrite/spool``, else ``~/.local/state/dualwrite/spool``)."""
    spool_replay_seconds: float = Field(default=2.0, gt=0)
    """How often (seconds) a spool holding commits tries to replay them into Redis."""
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=4096)
    """The spool directory's cap: once full, new usage is refused with a retryable 503 before
    anything is written (back-pressure, never loss), until a replay empties it."""


class LedgerSettings(_Frozen):
    """Totals and the divergence log."""

    periods: Literal["billing", "day"] = "billing"
    """Ledger periods: each item's billing period (read from Stripe once per item and period), or
    the UTC day for everything."""
    divergence_maxlen: int = Field(default=100_000, ge=100)
    """Approximate cap of the divergence stream per shard (older entries are trimmed; counts stay)."""
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    """How long an Idempotency-Key is remembered (as long as Stripe keeps its own: 24 hours)."""
    inflight_lease_seconds: int = Field(default=60, ge=1)
    """A request that died mid-write lets a retry take over its identifier after this many
    seconds."""


class LimitSettings(_Frozen):
    """Stripe's rate limits, shared by every process through Redis (0 turns a limit off)."""

    legacy_per_second: float = Field(default=100.0, ge=0)
    """Usage-record writes per second for the whole account (Stripe: about 100/s)."""
    meter_per_second: float = Field(default=1000.0, ge=0)
    """v1 meter event writes per second (Stripe: 1,000/s in live mode)."""
    stream_events_per_second: float = Field(default=10000.0, ge=0)
    """Events per second through the v2 meter event stream (Stripe: 10,000/s)."""
    burst_seconds: float = Field(default=0.1, gt=0, le=10)
    """How much of a second's allowance may go out at once."""
    one_meter_call_per_customer: bool = True
    """At most one meter call in flight per customer and meter, as Stripe's v1 path requires."""
    turn_lease_seconds: float = Field(default=30.0, gt=0)
    """A held meter turn expires after this (a dead process cannot block a customer for longer)."""
    request_max_wait: float = Field(default=2.0, ge=0)
    """The longest an authoritative write waits for its turn before the caller gets a 429."""
    worker_max_wait: float = Field(default=30.0, ge=0)
    """The longest a shadow write waits for its turn before it is rescheduled."""


class ReportSettings(_Frozen):
    """The report's readiness rule."""

    readiness_closed_periods: int = Field(default=1, ge=1, le=24)
    """Closed periods a customer must spend wholly at its stage, both legs equal, to be ready."""
    readiness_max_difference_pct: float = Field(default=0.0, ge=0, le=100)
    """The largest difference between the legs (percent of the larger) such a period may have."""
    readiness_max_money_difference: int = Field(default=0, ge=0)
    """The largest invoice difference (in the currency's smallest unit, cents for USD) a period
    reconciled with ``--money`` may show for the customer to be ready for primary or meter."""


class GuardrailSettings(_Frozen):
    """The guard: when divergence sends a customer (or the whole rollout) back a stage."""

    enabled: bool = True
    """Run the guard inside ``dualwrite worker`` every ``interval_seconds``."""
    interval_seconds: float = Field(default=60.0, gt=0, le=86_400)
    """Seconds between two guard passes."""
    max_divergent_events: int = Field(default=0, ge=0)
    """A customer with more divergent events than this (failed or late-refused writes included)
    goes back one stage."""
    max_difference_pct: float = Field(default=1.0, ge=0, le=100)
    """A customer whose legs differ by more than this (percent of the larger leg, once nothing is
    pending) goes back one stage."""
    max_divergent_share_pct: float = Field(default=10.0, ge=0, le=100)
    """When more than this share of the checked customers tripped, the whole rollout goes back."""
    min_customers: int = Field(default=10, ge=1)
    """The global share is judged only over at least this many checked customers."""
    global_action: Literal["rollback", "kill"] = "rollback"
    """``rollback``: every rollout percentage and the default one stage back; ``kill``: the kill
    switch (every customer legacy). Both cancel pending cutovers."""
    lookback_days: int = Field(default=35, ge=1, le=400)
    """Only ledger periods overlapping the last this many days count."""


class ReconcileSettings(_Frozen):
    """``dualwrite reconcile``: reading Stripe's own totals back."""

    settle_seconds: int = Field(default=3600, ge=0)
    """A period is compared only once it ended at least this long ago: Stripe's summaries lag
    (meter event summaries are eventually consistent, and usage may still reach a period whose
    invoice is a draft)."""
    reads_per_second: float = Field(default=20.0, ge=0)
    """Stripe reads per second for the whole account, shared by every process through Redis
    (Stripe allows 100 requests/s per account in live mode, 25 in a sandbox, and 25/s per endpoint
    unless stated otherwise: docs.stripe.com/rate-limits; leave room for the app)."""


class WebhookSettings(_Frozen):
    """Stripe's error-report events (late refusals of meter events); the signing secret comes only
    from ``STRIPE_WEBHOOK_SECRET``."""

    path: str = "/_dualwrite/stripe/events"
    """Where the proxy, and the middleware, receive pushed events."""
    track_seconds: int = Field(default=86_400, ge=0)
    """How long each meter event written is remembered, to attribute a late refusal to its
    customer (about 300 bytes in Redis per event; 0 turns it off)."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            msg = "must start with '/', e.g. /_dualwrite/stripe/events"
            raise ValueError(msg)
        return value


class FieldSource(_Frozen):
    """Where one ``UsageEvent`` field comes from in a request: ``kind:name`` in the config file."""

    kind: SourceKind
    """path, query, json (dotted paths for nested objects), form, header or const."""
    name: str
    """The parameter, field or header name (or the literal value, for const)."""

    @classmethod
    def parse(cls, spec: str) -> FieldSource:
        """Parse ``"json:usage.quantity"``, ``"header:Idempotency-Key"``, ``"const:api_calls"`` …"""
        match = _SOURCE_RE.fullmatch(spec.strip())
        if not match:
            msg = (
                f"{spec!r} is not a field source; write kind:name with kind one of "
                "path, query, json, form, header, const (e.g. 'json:quantity')"
            )
            raise ValueError(msg)
        return cls(kind=match.group(1), name=match.group(2))


_ROUTE_FIELDS = (
    "customer",
    "event_name",
    "subscription_item",
    "quantity",
    "timestamp",
    "action",
    "identifier",
)


class UsageRoute(_Frozen):
    """A request of the user's app that reports usage, and where each event field lives in it."""

    method: str = "POST"
    """The HTTP method of the usage request."""
    path: str = Field(examples=["/api/usage/{customer}"])
    """Its path template, with ``{name}`` parameters."""
    customer: FieldSource | None = Field(default=None, examples=["path:customer"])
    """Where the Stripe customer id is. A source is ``kind:name`` with kind one of path, query,
    json (dotted paths for nested objects), form, header, or const (a literal value)."""
    event_name: FieldSource | None = Field(default=None, examples=["const:api_requests"])
    """The meter event name (or let [items] map the subscription item to it)."""
    subscription_item: FieldSource | None = Field(default=None, examples=["json:subscription_item"])
    """The legacy subscription item (si_...)."""
    quantity: FieldSource = Field(examples=["json:quantity"])
    """How much usage."""
    timestamp: FieldSource | None = Field(default=None, examples=["json:timestamp"])
    """Unix seconds or "now" (default: now, fixed once at intercept)."""
    action: FieldSource | None = Field(default=None, examples=["json:action"])
    """increment or set (default: default_action)."""
    identifier: FieldSource | None = Field(default=None, examples=["header:Idempotency-Key"])
    """The event's identifier (default: the Idempotency-Key header, else one is minted)."""
    default_action: Action = "increment"
    """The action when the request names none."""
    max_body_bytes: int = Field(default=64 * 1024, ge=1, le=16 * 1024 * 1024)
    """Larger bodies get HTTP 413."""

    @field_validator(*_ROUTE_FIELDS, mode="before")
    @classmethod
    def _parse_source(cls, value: Any) -> Any:
        # Per field (not per route), so that an error is located at routes.N.<field>.
        return FieldSource.parse(value) if isinstance(value, str) else value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"POST", "PUT", "PATCH", "GET", "DELETE"}:
            msg = "must be an HTTP method such as POST"
            raise ValueError(msg)
        return upper

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            msg = "must start with '/', e.g. /api/usage/{customer}"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> UsageRoute:
        params = set(re.findall(r"{([^}:]+)(?::[^}]*)?}", self.path))
        for name in _ROUTE_FIELDS:
            source = getattr(self, name)
            is_path = isinstance(source, FieldSource) and source.kind == "path"
            if is_path and source.name not in params:
                msg = (
                    f"{name} reads path parameter {source.name!r}, which {self.path!r} lacks; "
                    f"add {{{source.name}}} to the path or read {name} from elsewhere"
                )
                raise ValueError(msg)
        if self.customer is None and self.subscription_item is None:
            msg = "set customer (or subscription_item, with an [items] mapping)"
            raise ValueError(msg)
        return self


class MeterMapping(_Frozen):
    """A Billing Meter and how legacy usage maps onto it."""

    event_name: str = Field(min_length=1, max_length=100, examples=["api_requests"])
    """The Billing Meter's event name."""
    customer_payload_key: str = "stripe_customer_id"
    """The meter's payload key for the customer (as configured on the meter in Stripe)."""
    value_payload_key: str = "value"
    """The meter's payload key for the value."""
    set_policy: SetPolicy = "translate"
    """Legacy ``action=set`` has no meter twin: ``translate`` sends the difference from the value
    last set at that timestamp (``sum`` meters; logged as divergence of kind "translated");
    ``refuse`` answers HTTP 400 for customers whose stage writes meter events."""
    legacy_prices: tuple[str, ...] = Field(default=(), examples=[["price_1LegacyApiCalls"]])
    """Legacy metered price ids whose usage records belong to this meter (used by the proxy)."""
    lookup_keys: tuple[str, ...] = ()
    """Price lookup keys whose usage records belong to this meter (used by the proxy)."""
    meter_prices: dict[str, str] = Field(
        default_factory=dict, examples=[{"price_1LegacyApiCalls": "price_1MeteredApiCalls"}]
    )
    """Legacy price id → the meter-backed price that replaces it (``meters apply`` writes it;
    ``reconcile --money`` prices the meter leg with it)."""


class ItemMapping(_Frozen):
    """A subscription item known in advance: its customer and meter event name."""

    customer: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", max_length=255, examples=["cus_Example"])
    """The customer the item belongs to."""
    event_name: str = Field(
        pattern=r"^[A-Za-z0-9_\-.:]+$", max_length=100, examples=["api_requests"]
    )
    """The meter event name its usage goes to."""


class _FileSource(PydanticBaseSettingsSource):
    """Feeds the parsed config file in below the environment variables."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


_FIXES = {
    "redis.url": "set DUALWRITE_REDIS__URL or [redis] url to redis://host:6379/0",
    "stripe.legacy_api_version": "use 2025-02-24.acacia (the last version with usage records)",
    "flags.safe_stage": "use one of legacy, shadow, primary, meter",
    "meters": "give each [[meters]] table its own event_name",
}


class Settings(BaseSettings):
    """Everything dualwrite needs, read once and shared by the CLI, proxy, middleware and workers."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    _file_data: ClassVar[dict[str, Any]] = {}

    redis: RedisSettings = Field(default_factory=RedisSettings)
    stripe: StripeSettings = Field(default_factory=StripeSettings)
    flags: FlagSettings = Field(default_factory=FlagSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)
    guardrails: GuardrailSettings = Field(default_factory=GuardrailSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    routes: tuple[UsageRoute, ...] = ()
    """Usage routes of your app (the middleware): method, path template, and where each field of
    the usage event comes from."""
    meters: tuple[MeterMapping, ...] = ()
    """Meters: one table per Billing Meter event name."""
    items: dict[str, ItemMapping] = Field(default_factory=dict)
    """Subscription items known in advance (lets a route omit customer or event_name, and the
    proxy skip a Stripe read)."""
    stripe_api_key: SecretStr | None = Field(default=None, validation_alias="STRIPE_API_KEY")
    """The Stripe secret key (the middleware's writes, the workers, the operator commands)."""
    stripe_webhook_secret: SecretStr | None = Field(
        default=None, validation_alias="STRIPE_WEBHOOK_SECRET"
    )
    """The signing secret of the event destination receiving Stripe's error reports."""
    report_token: SecretStr | None = Field(default=None, validation_alias="DUALWRITE_REPORT_TOKEN")
    """The bearer token of the report page (``dualwrite.web``); unset, the page refuses everyone."""
    admin_token: SecretStr | None = Field(default=None, validation_alias="DUALWRITE_ADMIN_TOKEN")
    """The bearer token of the admin API (``dualwrite.admin``); unset, the API refuses everyone."""
    metrics_token: SecretStr | None = Field(
        default=None, validation_alias="DUALWRITE_METRICS_TOKEN"
    )
    """A bearer token ``/metrics`` asks for when set (``dualwrite.metrics``); unset, it is open."""
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per log line (``DUALWRITE_LOG_FORMAT``; ``dualwrite.logging``)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file_data = getattr(settings_cls, "_file_data", {})
        return (init_settings, env_settings, _FileSource(settings_cls, file_data))

    @field_validator("meters")
    @classmethod
    def _unique_meters(cls, meters: tuple[MeterMapping, ...]) -> tuple[MeterMapping, ...]:
        # A field validator, not a model one: the error then shows the meters, not every setting
        # (a model-level error's input holds them all, the Stripe key included).
        names = [meter.event_name for meter in meters]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            msg = f"event_name {duplicates[0]!r} appears in more than one [[meters]] table"
            raise ValueError(msg)
        return meters

    @classmethod
    def load(cls, config_path: str | Path | None = None, **overrides: Any) -> Settings:
        """Read the config file (argument, else ``DUALWRITE_CONFIG``, else none) and the environment.

        Raises:
            ConfigError: the file is missing or malformed, or a value is invalid.
        """
        path = config_path or os.environ.get("DUALWRITE_CONFIG")
        data = _read_config_file(Path(path)) if path else {}
        bound: type[Settings] = type(cls.__name__, (cls,), {"_file_data": data})
        try:
            return bound(**overrides)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source=str(path) if path else None)) from None
        except SettingsError as exc:
            # A section variable (DUALWRITE_REDIS=...) is parsed as JSON, and was not JSON.
            msg = (
                f"invalid configuration in the environment: {exc}; fix: a DUALWRITE_<SECTION> "
                "variable must hold a JSON object, or set one key at a time with "
                "DUALWRITE_<SECTION>__<KEY> (e.g. DUALWRITE_REDIS__URL)"
            )
            raise ConfigError(msg) from None

    def meter(self, event_name: str) -> MeterMapping:
        """The mapping for ``event_name`` (defaults when the meter is not configured)."""
        for meter in self.meters:
            if meter.event_name == event_name:
                return meter
        return MeterMapping(event_name=event_name)

    # -- secrets: ``<field>_value()`` each, an empty variable read as unset --------------------

    def stripe_api_key_value(self) -> str | None:
        """The Stripe secret key from ``STRIPE_API_KEY``, if set (and not empty)."""
        return _secret_value(self.stripe_api_key)

    def stripe_webhook_secret_value(self) -> str | None:
        """The event destination's signing secret from ``STRIPE_WEBHOOK_SECRET``, if set (and not
        empty)."""
        return _secret_value(self.stripe_webhook_secret)

    def report_token_value(self) -> str | None:
        """The report page's bearer token from ``DUALWRITE_REPORT_TOKEN``, if set (and not empty)."""
        return _secret_value(self.report_token)

    def admin_token_value(self) -> str | None:
        """The admin API's bearer token from ``DUALWRITE_ADMIN_TOKEN``, if set (and not empty)."""
        return _secret_value(self.admin_token)

    def metrics_token_value(self) -> str | None:
        """The ``/metrics`` bearer token from ``DUALWRITE_METRICS_TOKEN``, if set (and not empty)."""
        return _secret_value(self.metrics_token)

    def api_key(self) -> str | None:
        """``stripe_api_key_value()`` under its former name (kept for compatibility)."""
        return self.stripe_api_key_value()

    def webhook_secret(self) -> str | None:
        """``stripe_webhook_secret_value()`` under its former name (kept for compatibility)."""
        return self.stripe_webhook_secret_value()


def default_spool_dir() -> Path:
    """Where the spool lives when ``[outbox] spool_dir`` is not set: ``$XDG_STATE_HOME/dualwrite/spool``,
    else ``~/.local/state/dualwrite/spool``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "dualwrite" / "spool"


#: ``DUALWRITE_*`` variables read outside the settings' sections.
_OTHER_VARIABLES = ("CONFIG", "REPORT_TOKEN", "ADMIN_TOKEN", "METRICS_TOKEN")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``DUALWRITE_*`` variables of ``environ`` (default: this process's environment) that set
    nothing, each with the closest real one (or None)."""
    names = os.environ if environ is None else environ
    known = [ENV_PREFIX + name for name in _OTHER_VARIABLES]
    for section in keys_at(("",)):
        known.append(ENV_PREFIX + section.upper())
        known += [f"{ENV_PREFIX}{section.upper()}__{key.upper()}" for key in keys_at((section, ""))]
    found = []
    for name in sorted(names):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            found.append((name, did_you_mean(name.upper(), known)))
    return found


def _secret_value(secret: SecretStr | None) -> str | None:
    """A secret's value; ``None`` when unset or empty (``STRIPE_API_KEY=`` means no key)."""
    return (secret.get_secret_value() or None) if secret is not None else None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = (
            f"config file {str(path)!r} cannot be read ({exc.strerror}); "
            "fix the --config path or DUALWRITE_CONFIG"
        )
        raise ConfigError(msg) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"config file {str(path)!r} is not valid TOML: {exc}"
        raise ConfigError(msg) from None
    section = data.get("stripe")
    stripe_section = section if isinstance(section, dict) else {}
    for key in (
        "stripe_api_key",
        "STRIPE_API_KEY",
        "api_key",
        "stripe_webhook_secret",
        "STRIPE_WEBHOOK_SECRET",
    ):
        if key in data or key in stripe_section:
            msg = (
                f"config file {str(path)!r} holds a Stripe key ({key}); remove it and set the "
                "STRIPE_API_KEY environment variable instead (keys never belong in files)"
            )
            raise ConfigError(msg)
    for field, variable in (
        ("report_token", "DUALWRITE_REPORT_TOKEN"),
        ("admin_token", "DUALWRITE_ADMIN_TOKEN"),
        ("metrics_token", "DUALWRITE_METRICS_TOKEN"),
    ):
        for key in (field, variable):
            if key in data:
                msg = (
                    f"config file {str(path)!r} holds a token ({key}); remove it and set the "
                    f"{variable} environment variable instead (secrets never belong in files)"
                )
                raise ConfigError(msg)
    return data


#: Where every key is listed, for error messages: a command that exists wherever dualwrite is
#: installed (``config/dualwrite.toml`` is only in the source repository).
TEMPLATE_HINT = "`dualwrite config init -` prints every key with its default"


def _describe(exc: ValidationError, *, source: str | None) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(part) for part in loc) or "(top level)"
        value = error.get("input")
        shown = "<secret>" if "api_key" in key.lower() else _short(value)
        reason = error["msg"].removeprefix("Value error, ")
        if "api_key" in key.lower():
            fix = "set the Stripe key in the STRIPE_API_KEY environment variable only"
        elif error["type"] == "extra_forbidden":
            lines.append(f"{key}: no such key; fix: {_unknown_key_fix(loc)}")
            continue
        else:
            fix = _FIXES.get(key, _generic_fix(key))
        lines.append(f"{key} = {shown}: {reason}; fix: {fix}")
    where = f" in {source} or the environment" if source else " in the environment"
    return f"invalid configuration{where}:\n  " + "\n  ".join(lines)


def keys_at(loc: tuple[str | int, ...]) -> list[str]:
    """The keys the config accepts beside the one at ``loc`` (``("redis", "urll")``: the
    ``[redis]`` keys); empty when ``loc`` leads nowhere known."""
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        if isinstance(part, int) or part.isdigit():
            continue  # an index into [[routes]] or [[meters]]: same model
        field = model.model_fields.get(str(part))
        if field is None:
            if model is Settings:
                return []
            continue  # an [items.<si>] name
        inner = model_of(field.annotation)
        if inner is None:
            return []
        model = inner
    return [
        name
        for name, field in model.model_fields.items()
        if not (model is Settings and field.validation_alias)
    ]


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (directly, or as the items of a tuple or dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_of(arg)
        if found is not None:
            return found
    return None


def did_you_mean(name: str, choices: list[str]) -> str | None:
    """The closest of ``choices`` to a misspelled ``name``, if one is close enough."""
    lowered = {choice.lower(): choice for choice in choices}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def _unknown_key_fix(loc: tuple[str | int, ...]) -> str:
    name = str(loc[-1]) if loc else ""
    known = keys_at(loc)
    guess = did_you_mean(name, known)
    where = (
        f"[{'.'.join(str(p) for p in loc[:-1] if not isinstance(p, int))}]"
        if len(loc) > 1
        else "the top level"
    )
    if guess is not None:
        return f"did you mean {guess!r}? ({TEMPLATE_HINT})"
    if known:
        return f"remove it; the keys of {where} are {', '.join(known)}"
    return f"remove it or correct its spelling ({TEMPLATE_HINT})"


def _generic_fix(key: str) -> str:
    top = key.split(".")[0]
    env = ENV_PREFIX + "__".join(part.upper() for part in key.split(".") if not part.isdigit())
    if top in {"routes", "meters", "items"}:
        return f"correct [{top}] in the config file ({TEMPLATE_HINT})"
    return f"correct it in the config file or set {env} ({TEMPLATE_HINT})"


_URL_PASSWORD_RE = re.compile(r"(://[^/:@\s]*:)[^@/\s]+@")


def _short(value: Any) -> str:
    """A value for an error message: Stripe keys and URL passwords masked, long values cut."""
    text = _URL_PASSWORD_RE.sub(r"\1****@", redact(repr(value)))
    return text if len(text) <= 80 else text[:77] + "..."
