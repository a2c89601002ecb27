"""``dualwrite.testing`` keeps every name it exported before the stand-in became its own package."""

from __future__ import annotations

import dualwrite.testing
import stripe_standin

EXPORTED_BEFORE_THE_MOVE = [
    "ASYNC_ERROR_CODES",
    "FAULT_KINDS",
    "FaultInjector",
    "RedisServerError",
    "RedisServerProcess",
    "RequestLogEntry",
    "RunningStandin",
    "StandinClock",
    "StripeStandin",
    "legacy_price_params",
    "meter_params",
    "redis_binary",
    "run_standin",
    "serve_app",
    "serve_standin",
]
"""``dualwrite.testing.__all__`` at the branch point of issue 15 (other branches import these)."""


class TestReexports:
    """The thin re-exports of ``dualwrite.testing``."""

    def test_every_name_still_exported(self) -> None:
        """Every name exported before the move is still in ``__all__`` and importable."""
        assert set(EXPORTED_BEFORE_THE_MOVE) <= set(dualwrite.testing.__all__)
        assert all(hasattr(dualwrite.testing, name) for name in dualwrite.testing.__all__)

    def test_all_is_sorted(self) -> None:
        """``__all__`` is sorted (ruff's RUF022 order)."""
        names = dualwrite.testing.__all__
        assert names == sorted(names, key=lambda n: (not n.isupper(), not n[:1].isupper(), n))

    def test_stand_in_names_are_the_packages_own_objects(self) -> None:
        """A re-exported stand-in name is the very object of ``stripe_standin``, not a copy."""
        own = {"RedisServerError", "RedisServerProcess", "redis_binary"}
        shared = set(dualwrite.testing.__all__) - own
        assert shared <= set(stripe_standin.__all__)
        for name in shared:
            assert getattr(dualwrite.testing, name) is getattr(stripe_standin, name)
