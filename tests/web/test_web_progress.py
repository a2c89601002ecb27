"""The report page's migration progress: customers per stage at each day's end, replayed from the
flag audit log; and rollout shares shown as the CLI shows them."""

from __future__ import annotations

import pytest

from dualwrite.flags import RedisFlagStore
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.web import report_app
from dualwrite.web._progress import DAY, migration_progress
from tests.web.test_web import BEARER, client_for, web_settings

pytestmark = pytest.mark.anyio

SALT = "dualwrite-rollout-v1"
#: Noon of a day, so that "three days ago" and its day's end are unambiguous.
NOW = 1_900_000_000 - 1_900_000_000 % DAY + DAY // 2


class Clock:
    """A settable clock for the flag store's audit times."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_customers_per_stage_over_days(redis_client, key_prefix):
    """Changes made days apart show on the days they were made, and not before."""
    clock = Clock(NOW - 3 * DAY)
    store = RedisFlagStore(redis_client, KeySpace(key_prefix), clock=clock)
    customers = ["cus_a", "cus_b", "cus_c"]
    await store.set_override("cus_a", Stage.SHADOW, actor="t")  # three days ago
    clock.now = NOW - DAY
    await store.set_override("cus_a", Stage.PRIMARY, actor="t")  # yesterday
    await store.set_default(Stage.SHADOW, actor="t")
    clock.now = NOW
    await store.schedule("cus_c", Stage.PRIMARY, int(NOW - 60), actor="t")  # earlier today

    days = await migration_progress(store, customers, now=NOW, salt=SALT, days=5)
    by_day = {day.day: day.counts for day in days}
    assert days[0].day == "now"
    assert by_day["now"] == {"legacy": 0, "shadow": 1, "primary": 2, "meter": 0}
    yesterday, before, three, four = (
        days[1].counts,
        days[2].counts,
        days[3].counts,
        days[4].counts,
    )
    assert yesterday == {"legacy": 0, "shadow": 2, "primary": 1, "meter": 0}
    assert before == {"legacy": 2, "shadow": 1, "primary": 0, "meter": 0}
    assert three == before  # the change three days ago was made at noon: in that day's end
    assert four == {"legacy": 3, "shadow": 0, "primary": 0, "meter": 0}
    assert all(day.known for day in days)
    assert days[0].share("primary") == pytest.approx(200 / 3)


async def test_progress_page_and_rollout_shares(redis_url, key_prefix, standin_url, redis_client):
    """/progress shows the table (counts equal to the replay) and the flags page shows shares
    as `flags rollout` prints them (12.5 %, not 12.5 or 12.50)."""
    settings = web_settings(redis_url, key_prefix, standin_url)
    store = RedisFlagStore(redis_client, KeySpace(key_prefix))
    await store.set_override("cus_x", Stage.SHADOW, actor="t")
    await store.set_rollout(Stage.SHADOW, 12.5, actor="t")
    async with report_app(settings) as app, client_for(app, headers=BEARER) as client:
        page = await client.get("/progress")
        flags = await client.get("/flags")
    assert page.status_code == 200, page.text
    assert 'data-day="now"' in page.text
    assert '<td class="num" data-stage="shadow">1</td>' in page.text
    assert "Migration progress" in page.text and 'aria-current="page">Progress' in page.text
    assert "<dd>12.5 %</dd>" in flags.text
