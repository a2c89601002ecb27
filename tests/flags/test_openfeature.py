"""``DualwriteProvider``: the OpenFeature SDK answers the same stages as ``dualwrite flags get``."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason
from typer.testing import CliRunner

from dualwrite.cli import app
from dualwrite.config import Settings
from dualwrite.flags import RedisFlagStore
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.openfeature import FLAG_KEY, DualwriteProvider
from tests.support import make_settings, unreachable_redis_settings

CUSTOMERS = {  # customer -> (stage, rule that decides it)
    "cus_default": ("legacy", "default"),
    "cus_pinned": ("shadow", "override"),
    "cus_scheduled": ("primary", "schedule"),
    "cus_moved": ("meter", "override"),
}


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> Settings:
    """Settings on the test's key prefix (the provider needs no Stripe)."""
    return make_settings(
        redis_url=redis_url, prefix=key_prefix, api_base="http://127.0.0.1:9", api_key=None
    )


async def _set_up(settings: Settings) -> None:
    redis = aioredis.Redis.from_url(settings.redis.url, decode_responses=True)
    store = RedisFlagStore(redis, KeySpace(settings.redis.key_prefix))
    try:
        await store.set_override("cus_pinned", Stage.SHADOW, actor="tests")
        await store.set_override("cus_moved", Stage.METER, actor="tests")
        await store.schedule("cus_scheduled", Stage.PRIMARY, int(time.time()) - 60, actor="tests")
    finally:
        await redis.aclose()


@pytest.fixture
def provider(settings: Settings) -> Iterator[DualwriteProvider]:
    """The provider, set on the OpenFeature API with the flags of ``CUSTOMERS`` in Redis."""
    asyncio.run(_set_up(settings))
    provider = DualwriteProvider(settings)
    api.set_provider_and_wait(provider)
    yield provider
    api.shutdown()


def cli_stages(redis_url: str, key_prefix: str) -> dict[str, tuple[str, str]]:
    """What ``dualwrite flags get`` prints for each customer: (stage, rule)."""
    env: dict[str, str | None] = {
        name: None for name in os.environ if name.startswith("DUALWRITE_")
    }
    env.update(
        DUALWRITE_REDIS__URL=redis_url, DUALWRITE_REDIS__KEY_PREFIX=key_prefix, COLUMNS="200"
    )
    result = CliRunner().invoke(app, ["flags", "get", *CUSTOMERS], env=env)
    assert result.exit_code == 0, result.output
    stages = {}
    for line in result.output.splitlines():
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if cells and cells[0] in CUSTOMERS:
            stages[cells[0]] = (cells[1], cells[2])
    return stages


class TestSameAsTheCli:
    """The provider, sync and async, answers what ``dualwrite flags get`` answers."""

    def test_sync_and_async_match_the_cli(
        self, provider: DualwriteProvider, redis_url: str, key_prefix: str
    ) -> None:
        """For customers in each stage, all three agree, and so does the rule behind it."""
        expected = cli_stages(redis_url, key_prefix)
        assert expected == CUSTOMERS
        client = api.get_client()
        for customer, (stage, rule) in expected.items():
            details = client.get_string_details(FLAG_KEY, "x", EvaluationContext(customer))
            assert (details.value, details.variant, details.error_code) == (stage, stage, None)
            assert details.flag_metadata["rule"] == rule

        async def evaluate_async() -> dict[str, tuple[str, str]]:
            try:
                answers = {}
                for customer in CUSTOMERS:
                    details = await client.get_string_details_async(
                        FLAG_KEY, "x", EvaluationContext(customer)
                    )
                    answers[customer] = (details.value, str(details.flag_metadata["rule"]))
                return answers
            finally:
                await provider.aclose()

        assert asyncio.run(evaluate_async()) == expected

    def test_reasons(self, provider: DualwriteProvider, settings: Settings) -> None:
        """Each rule maps to its OpenFeature reason; a flag change is seen at once."""
        client = api.get_client()

        def reason(customer: str) -> str | None:
            details = client.get_string_details(FLAG_KEY, "x", EvaluationContext(customer))
            return str(details.reason)

        assert reason("cus_default") == Reason.DEFAULT
        assert reason("cus_pinned") == Reason.TARGETING_MATCH
        assert reason("cus_scheduled") == Reason.TARGETING_MATCH

        async def change(kill: bool, percent: float) -> None:
            redis = aioredis.Redis.from_url(settings.redis.url, decode_responses=True)
            store = RedisFlagStore(redis, KeySpace(settings.redis.key_prefix))
            try:
                await store.set_rollout(Stage.SHADOW, percent, actor="tests")
                await store.set_kill(kill, actor="tests")
            finally:
                await redis.aclose()

        asyncio.run(change(kill=False, percent=100))
        deadline = time.monotonic() + 2
        while reason("cus_default") != Reason.SPLIT and time.monotonic() < deadline:
            time.sleep(0.01)  # the provider's cache drops on the change message
        assert reason("cus_default") == Reason.SPLIT
        asyncio.run(change(kill=True, percent=100))
        while reason("cus_moved") != Reason.DISABLED and time.monotonic() < deadline:
            time.sleep(0.01)
        details = client.get_string_details(FLAG_KEY, "x", EvaluationContext("cus_moved"))
        assert (details.value, details.reason) == ("legacy", Reason.DISABLED)


class TestErrors:
    """Errors come back as OpenFeature error codes with the caller's default value."""

    def test_error_codes(self, provider: DualwriteProvider) -> None:
        """Unknown key, wrong type, no targeting key and a bad customer id each have their code."""
        client = api.get_client()
        customer = EvaluationContext("cus_pinned")
        cases = [
            (client.get_string_details("other.flag", "d", customer), ErrorCode.FLAG_NOT_FOUND),
            (client.get_boolean_details(FLAG_KEY, True, customer), ErrorCode.TYPE_MISMATCH),
            (client.get_integer_details(FLAG_KEY, 3, customer), ErrorCode.TYPE_MISMATCH),
            (client.get_string_details(FLAG_KEY, "d"), ErrorCode.TARGETING_KEY_MISSING),
            (
                client.get_string_details(FLAG_KEY, "d", EvaluationContext("cus 1")),
                ErrorCode.INVALID_CONTEXT,
            ),
        ]
        for details, code in cases:
            assert details.error_code == code
            assert details.reason == Reason.ERROR
            assert details.value in ("d", True, 3)

    def test_redis_down_is_a_general_error(self, key_prefix: str) -> None:
        """When Redis cannot be read the caller gets its default and GENERAL, never an exception."""
        settings = unreachable_redis_settings(key_prefix)
        provider = DualwriteProvider(settings)
        try:
            details = provider.resolve_string_details(
                FLAG_KEY, "legacy", EvaluationContext("cus_1")
            )
        finally:
            provider.shutdown()
        assert (details.value, details.error_code) == ("legacy", ErrorCode.GENERAL)
        assert "safe stage" in (details.error_message or "")
