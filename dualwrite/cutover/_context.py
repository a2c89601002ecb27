"""``CutoverContext``: what the guard and the rollbacks use of ``CutoverOps``, as a ``Protocol``.

``CutoverOps`` (``_ops``) builds the guard and delegates its rollbacks to ``_rollback``; both call
back into the operations. Typing that call-back with this protocol, not with the class, keeps the
import graph one-way (``_ops`` imports ``_guard`` and ``_rollback``, never the reverse).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from dualwrite.config import Settings
    from dualwrite.cutover._models import OperationResult
    from dualwrite.cutover._prices import ItemChecks
    from dualwrite.flags import FlagSnapshot, RedisFlagStore
    from dualwrite.keys import KeySpace
    from dualwrite.models import Stage

__all__ = ["CutoverContext"]


class CutoverContext(Protocol):
    """The operations' Redis, flags and clock, and the rollbacks the guard makes through them."""

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis client the operations use."""

    @property
    def keys(self) -> KeySpace:
        """The key layout."""

    @property
    def settings(self) -> Settings:
        """The settings the operations read."""

    @property
    def store(self) -> RedisFlagStore:
        """The flag store every change goes through."""

    def now(self) -> int:
        """The operations' clock, in whole seconds."""

    async def nows(self, customers: Iterable[str]) -> dict[str, int]:
        """Each customer's "now": its Stripe test clock's frozen time, else the operations' clock."""

    async def forget_price_move(self, customer: str, *, actor: str, reason: str) -> None:
        """Record that ``customer``'s pending price move was released in Stripe."""

    def item_checks(self, operation: str) -> ItemChecks:
        """Stripe reads and releases for one rollback."""

    async def stage_of(self, customer: str) -> tuple[Stage, FlagSnapshot]:
        """The customer's stage now, and the flags it was resolved from."""

    async def rollback(
        self,
        customers: Sequence[str],
        *,
        to: Stage | None = None,
        actor: str,
        reason: str = "",
        force: bool = False,
        dry_run: bool = False,
        operation: str = "rollback",
    ) -> OperationResult:
        """Pin each customer a stage back (or to ``to``) and clear its schedule."""

    async def step_back_all(
        self, *, actor: str, reason: str, dry_run: bool = False
    ) -> OperationResult:
        """Every percentage rollout and the default one stage back."""

    async def kill(self, *, actor: str, reason: str, dry_run: bool = False) -> OperationResult:
        """Turn the kill switch on and cancel pending cutovers."""
