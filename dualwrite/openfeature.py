"""``DualwriteProvider``: customers' migration stages through the OpenFeature SDK.

::

    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext
    from dualwrite.openfeature import DualwriteProvider

    api.set_provider(DualwriteProvider(settings))
    client = api.get_client()
    stage = client.get_string_value("dualwrite.stage", "legacy", EvaluationContext("cus_123"))

The flag ``dualwrite.stage`` (``flag_key=`` changes it) is a string flag: the stage the customer
named by the evaluation context's ``targeting_key`` resolves to, exactly as ``dualwrite flags get``
and the engine resolve it (kill switch, override, schedule, rollout, default), cached and dropped
on every flag change like the engine's. The variant is the stage; the reason is ``DISABLED`` (kill
switch), ``TARGETING_MATCH`` (override or schedule), ``SPLIT`` (rollout) or ``DEFAULT``; the
metadata carry dualwrite's own rule (``rule``), its explanation (``detail``) and, for a schedule,
when the answer may change (``valid_until``).

Errors come back as OpenFeature error codes with the caller's default value: another flag key
``FLAG_NOT_FOUND``, a non-string evaluation of the stage ``TYPE_MISMATCH``, no targeting key
``TARGETING_KEY_MISSING``, a targeting key that is no customer id ``INVALID_CONTEXT``, and Redis
unreadable ``GENERAL`` (where dualwrite itself would answer the safe stage).

Async evaluations use a resolver in the caller's event loop (the one given as ``resolver=``, e.g.
an engine's, or one the provider opens per loop; ``aclose()`` closes it); sync evaluations run on
an event loop thread of the provider's own, stopped by ``shutdown()``.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TypeVar

try:
    from openfeature.evaluation_context import EvaluationContext
    from openfeature.exception import ErrorCode
    from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType, Reason
    from openfeature.provider import AbstractProvider, Metadata
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    msg = "dualwrite.openfeature needs the OpenFeature SDK: pip install 'dualwrite[openfeature]'"
    raise ImportError(msg) from exc


from dualwrite.config import Settings
from dualwrite.flags import Resolution, ResolutionReason, StageResolver
from dualwrite.flags._codec import CUSTOMER_RE
from dualwrite.stores import Stores

__all__ = ["FLAG_KEY", "SYNC_TIMEOUT", "DualwriteProvider"]

#: The flag key the provider answers by default.
FLAG_KEY = "dualwrite.stage"
#: The longest a sync evaluation waits for its answer.
SYNC_TIMEOUT = 5.0

T = TypeVar("T")
_REASONS: dict[ResolutionReason, Reason] = {
    "kill": Reason.DISABLED,
    "override": Reason.TARGETING_MATCH,
    "schedule": Reason.TARGETING_MATCH,
    "rollout": Reason.SPLIT,
    "default": Reason.DEFAULT,
}


def _error(default: T, code: ErrorCode, message: str) -> FlagResolutionDetails[T]:
    return FlagResolutionDetails(
        value=default, reason=Reason.ERROR, error_code=code, error_message=message
    )


class DualwriteProvider(AbstractProvider):
    """An OpenFeature provider answering customers' stages (see the module docstring).

    Args:
        settings: Redis and the flags' settings.
        resolver: a started ``StageResolver`` to share for async evaluations (an engine's); it
            must belong to the event loop that evaluates.
        flag_key: the key of the stage flag.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: StageResolver | None = None,
        flag_key: str = FLAG_KEY,
    ) -> None:
        super().__init__()
        self._settings = settings
        self._shared = resolver
        self.flag_key = flag_key
        self._per_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[Stores, StageResolver]
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def get_metadata(self) -> Metadata:
        """The provider's name."""
        return Metadata(name="dualwrite")

    # -- the stage flag ----------------------------------------------------------------------

    def resolve_string_details(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        """The customer's stage (sync: answered by the provider's own event loop thread)."""
        target = self._target(flag_key, default_value, evaluation_context)
        if isinstance(target, FlagResolutionDetails):
            return target
        future = asyncio.run_coroutine_threadsafe(self._explain(target), self._background())
        try:
            resolution = future.result(SYNC_TIMEOUT)
        except FutureTimeoutError:
            future.cancel()
            return _error(default_value, ErrorCode.GENERAL, "stage lookup timed out")
        return self._details(resolution, default_value)

    async def resolve_string_details_async(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        """The customer's stage (async: resolved in the caller's event loop)."""
        target = self._target(flag_key, default_value, evaluation_context)
        if isinstance(target, FlagResolutionDetails):
            return target
        return self._details(await self._explain(target), default_value)

    def _target(
        self, flag_key: str, default: str, context: EvaluationContext | None
    ) -> str | FlagResolutionDetails[str]:
        """The customer to resolve, or the error to answer."""
        unknown = self._unknown_flag(flag_key, default)
        if unknown is not None:
            return unknown
        customer = context.targeting_key if context is not None else None
        if not customer:
            return _error(
                default,
                ErrorCode.TARGETING_KEY_MISSING,
                "set the evaluation context's targeting_key to the Stripe customer id",
            )
        if not CUSTOMER_RE.fullmatch(customer):
            return _error(
                default,
                ErrorCode.INVALID_CONTEXT,
                "targeting_key must be a Stripe customer id (1-255 letters, digits, '_' or '-')",
            )
        return customer

    def _details(self, resolution: Resolution, default: str) -> FlagResolutionDetails[str]:
        if resolution.reason == "safe":
            return _error(default, ErrorCode.GENERAL, resolution.detail)
        metadata: dict[str, str | float] = {"rule": resolution.reason, "detail": resolution.detail}
        if resolution.valid_until is not None:
            metadata["valid_until"] = resolution.valid_until
        stage = resolution.stage.value
        return FlagResolutionDetails(
            value=stage,
            variant=stage,
            reason=_REASONS[resolution.reason],
            flag_metadata=metadata,
        )

    async def _explain(self, customer: str) -> Resolution:
        return await (await self._resolver()).explain(customer)

    async def _resolver(self) -> StageResolver:
        """The shared resolver, else this event loop's own (opened and subscribed once)."""
        if self._shared is not None:
            return self._shared
        loop = asyncio.get_running_loop()
        held = self._per_loop.get(loop)
        if held is None:
            stores = Stores.open(self._settings)
            resolver = StageResolver(stores.redis, stores.keys, self._settings.flags)
            held = self._per_loop[loop] = (stores, resolver)
            await resolver.start()
        return held[1]

    # -- other types: the stage is a string ----------------------------------------------------

    def _unknown_flag(self, flag_key: str, default: T) -> FlagResolutionDetails[T] | None:
        """``FLAG_NOT_FOUND`` for any key but the stage flag's, else None."""
        if flag_key == self.flag_key:
            return None
        return _error(default, ErrorCode.FLAG_NOT_FOUND, f"dualwrite knows only {self.flag_key}")

    def _not_a_string(self, flag_key: str, default: T) -> FlagResolutionDetails[T]:
        return self._unknown_flag(flag_key, default) or _error(
            default, ErrorCode.TYPE_MISMATCH, f"{self.flag_key} is a string flag"
        )

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        """Not a dualwrite flag type: an error."""
        return self._not_a_string(flag_key, default_value)

    def resolve_integer_details(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        """Not a dualwrite flag type: an error."""
        return self._not_a_string(flag_key, default_value)

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        """Not a dualwrite flag type: an error."""
        return self._not_a_string(flag_key, default_value)

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        """Not a dualwrite flag type: an error."""
        return self._not_a_string(flag_key, default_value)

    # -- lifecycle -----------------------------------------------------------------------------

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        """Start the event loop thread that answers sync evaluations."""
        self._background()

    def _background(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="dualwrite-openfeature", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def shutdown(self) -> None:
        """Stop the sync evaluations' event loop thread and close its Redis connection."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._close_current(), loop)
        try:
            future.result(SYNC_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(SYNC_TIMEOUT)
            loop.close()

    async def aclose(self) -> None:
        """Close the resolver and Redis connection the provider opened for this event loop."""
        await self._close_current()

    async def _close_current(self) -> None:
        held = self._per_loop.pop(asyncio.get_running_loop(), None)
        if held is not None:
            stores, resolver = held
            await resolver.aclose()
            await stores.aclose()
