"""The Django example under gunicorn with 4 sync workers: 2,000 usage requests for customers at all
four stages while Stripe fails 5 % of calls, exact totals in Stripe, shadow writes delivered by the
workers' own outbox workers."""

from __future__ import annotations

import asyncio

import pytest

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from tests.apps_support import (
    Shop,
    consumer_pid,
    example_environment,
    gunicorn,
    outbox_consumers,
    send_usage,
    wait_for_totals,
)
from tests.conftest import SettingsFactory

WORKERS = 4
CUSTOMERS_PER_STAGE = 2
REQUESTS = 2_000


def outbox_depth(settings: Settings) -> tuple[int, int]:
    """(outstanding, pending) entries of the outbox."""

    async def read() -> tuple[int, int]:
        engine = DualWriteEngine.from_settings(settings)
        try:
            depth = await engine.outbox.depth()
            return depth.outstanding, depth.pending
        finally:
            await engine.aclose()

    return asyncio.run(read())


@pytest.mark.slow
def test_django_under_gunicorn_records_2000_requests_exactly(
    standin_settings: SettingsFactory, standin_url, standin, redis_url, key_prefix
):
    """With 5 % of Stripe calls failing (500, 503, 429, 409), every unit is counted once on each
    leg its customer's stage writes (client retries with the same Idempotency-Key included), and
    each worker process ran one outbox worker, started after the fork, that delivered the shadow
    writes."""
    settings = standin_settings()
    shop = Shop.build(settings, standin_url, per_stage=CUSTOMERS_PER_STAGE)
    environment = example_environment(
        redis_url,
        key_prefix,
        standin_url,
        DUALWRITE_OUTBOX__BACKOFF_BASE="0.05",
        DUALWRITE_OUTBOX__BACKOFF_MAX="0.5",
    )
    standin.faults.configure(rate=0.05, kinds=("500", "503", "429", "409"), seed=17)
    app = "examples.django_app.project.wsgi:application"
    with gunicorn(app, environment, workers=WORKERS, preload=True) as server:
        workers = server.workers
        assert len(workers) == WORKERS
        per_customer = REQUESTS // len(shop.customers)
        sent = send_usage(server.url, shop, per_customer=per_customer, threads=8)
        assert sent > REQUESTS  # the retried requests came on top of the 2,000
        standin.faults.clear()  # Stripe's summaries are read without faults
        totals = wait_for_totals(standin_url, shop, timeout=120)
        assert totals["held"] == totals["wanted"]
        assert outbox_depth(settings) == (0, 0)  # delivered by the workers, nothing left over
        assert sum(standin.faults.injected.values()) > 50  # the faults did happen
        pids = [consumer_pid(name) for name in outbox_consumers(redis_url, key_prefix, settings)]
    assert sorted(pids) == sorted(workers)  # one outbox worker per worker process
    assert server.process.pid not in pids  # none in the master, before the fork
