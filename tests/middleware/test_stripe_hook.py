"""The stripe-python hook: usage records created through the SDK, dual-written in-process, against
the stand-in (stripe-python 12+ here; 11.x in a virtualenv of its own, ``TestStripe11``)."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe

from dualwrite.config import Settings
from dualwrite.exceptions import ConfigError
from dualwrite.models import Stage
from dualwrite.recorder import SyncRecorder
from dualwrite.stripe_hook import DualWriteHTTPClient, install, uninstall
from tests.apps_support import make_scenario, put_at
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.support import EVENT_NAME, LEGACY_VERSION, Scenario, make_settings


@pytest.fixture
def scenario(standin_url: str, standin) -> Scenario:
    """A customer on a legacy metered price."""
    return make_scenario(standin_url)


@pytest.fixture
def settings(standin_settings: SettingsFactory, scenario: Scenario) -> Settings:
    """The legacy price maps to the meter: the hook reads each item from Stripe once."""
    return standin_settings(
        meters=[{"event_name": EVENT_NAME, "legacy_prices": [scenario.legacy_price]}]
    )


@pytest.fixture
def recorder(settings: Settings) -> Iterator[SyncRecorder]:
    """The hook's recorder, closed after the test."""
    with SyncRecorder(config=settings) as made:
        yield made


def sdk_client(url: str, *, retries: int = 0) -> stripe.StripeClient:
    """An SDK client on the stand-in (its own HTTP client, as an app would have)."""
    return stripe.StripeClient(
        STRIPE_KEY,
        base_addresses={"api": url, "meter_events": url},
        max_network_retries=retries,
    )


@pytest.fixture
def client(standin_url: str, recorder: SyncRecorder) -> stripe.StripeClient:
    """An SDK client with the hook installed."""
    made = sdk_client(standin_url, retries=2)
    install(made, recorder)
    return made


def usage_record(
    client: stripe.StripeClient, item: str, quantity: object, **options: object
) -> stripe.StripeObject:
    """stripe-python 12+'s way to the legacy endpoint: raw_request at a pre-basil version."""
    response = client.raw_request(
        "post",
        f"/v1/subscription_items/{item}/usage_records",
        quantity=quantity,
        stripe_version=LEGACY_VERSION,
        **options,
    )
    return client.deserialize(response, api_mode="V1")


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``condition`` until it holds (the in-process worker delivers shadow writes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the shadow write was not delivered"
        time.sleep(0.02)


def wait_for_meter(standin, customer: str, total: float) -> None:
    """Wait until the customer's meter holds ``total``."""
    wait_until(lambda: standin.meter_total(customer, EVENT_NAME) >= total)


def wait_for_legacy(standin, item: str, total: int) -> None:
    """Wait until the item's usage records hold ``total``."""
    wait_until(lambda: standin.legacy_total(item) >= total)


class TestUsageRecords:
    """Usage records created through the SDK are written at the customer's stage."""

    @pytest.mark.parametrize("stage", list(Stage))
    def test_each_stage(self, client, settings, scenario, standin, stage):
        """Each stage writes its legs; the SDK gets a usage_record either way."""
        put_at(settings, scenario.customer, stage)
        record = usage_record(client, scenario.item, 6)
        assert record["object"] == "usage_record" and record["quantity"] == 6
        meter = 6 if stage is not Stage.LEGACY else 0
        if stage is Stage.SHADOW:
            wait_for_meter(standin, scenario.customer, meter)
        if stage in (Stage.PRIMARY, Stage.METER):
            assert record["id"].startswith("mbur_dw_")  # ours: the meter was authoritative
        else:
            assert not record["id"].startswith("mbur_dw_")  # Stripe's own reply, passed through
        legacy = 6 if stage is not Stage.METER else 0
        if stage is Stage.PRIMARY:
            wait_for_legacy(standin, scenario.item, legacy)
        assert standin.legacy_total(scenario.item) == legacy
        assert standin.meter_total(scenario.customer, EVENT_NAME) == meter

    def test_sdk_retry_with_its_idempotency_key_records_once(
        self, client, settings, scenario, standin
    ):
        """Stripe fails the first attempt (500): the SDK retries with its one Idempotency-Key,
        and the usage is counted once on each leg."""
        put_at(settings, scenario.customer, Stage.SHADOW)
        standin.faults.refuse(
            path=rf"/v1/subscription_items/{scenario.item}/usage_records",
            status=500,
            type="api_error",
            message="injected",
            count=1,
        )
        record = usage_record(client, scenario.item, 4)
        assert record["quantity"] == 4
        attempts = [
            entry
            for entry in standin.requests
            if entry.path.endswith("/usage_records") and entry.method == "POST"
        ]
        assert len(attempts) == 2
        assert len({entry.idempotency_key for entry in attempts}) == 1
        wait_for_meter(standin, scenario.customer, 4)
        assert standin.legacy_total(scenario.item) == 4
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 4

    def test_same_idempotency_key_twice_records_once(self, client, settings, scenario, standin):
        """An app calling twice with its own idempotency key gets one record, replayed."""
        put_at(settings, scenario.customer, Stage.METER)
        first = usage_record(client, scenario.item, 3, idempotency_key="app-key-1")
        again = usage_record(client, scenario.item, 3, idempotency_key="app-key-1")
        assert first["id"] == again["id"]
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 3

    def test_bad_input_is_stripes_invalid_request_error(self, client, scenario, standin):
        """A negative quantity raises the SDK's InvalidRequestError naming the parameter."""
        with pytest.raises(stripe.InvalidRequestError) as raised:
            usage_record(client, scenario.item, -2)
        assert raised.value.param == "quantity"
        assert standin.legacy_total(scenario.item) == 0

    def test_network_error_reaches_the_sdk_as_its_own(self, recorder, scenario, standin):
        """Stripe unreachable for the SDK's own request: its APIConnectionError, as without
        the hook (dualwrite still reads the item through its own writer)."""
        dead = sdk_client("http://127.0.0.1:9")
        install(dead, recorder)
        with pytest.raises(stripe.APIConnectionError):
            usage_record(dead, scenario.item, 1)
        assert standin.legacy_total(scenario.item) == 0

    def test_async_calls(self, client, settings, scenario, standin):
        """raw_request_async is intercepted too, its Stripe call made on the caller's loop."""
        put_at(settings, scenario.customer, Stage.SHADOW)

        async def call() -> Any:
            try:
                return await client.raw_request_async(
                    "post",
                    f"/v1/subscription_items/{scenario.item}/usage_records",
                    quantity=8,
                    stripe_version=LEGACY_VERSION,
                )
            finally:
                await client._requestor._client.close_async()

        response = asyncio.run(call())
        assert response.code == 200
        wait_for_meter(standin, scenario.customer, 8)
        assert standin.legacy_total(scenario.item) == 8

    def test_unmapped_item_goes_to_stripe_only(
        self, standin_settings, scenario, standin, standin_url
    ):
        """An item whose price maps to no meter is forwarded as is and not dual-written."""
        settings = standin_settings()  # [[meters]] without legacy_prices
        put_at(settings, scenario.customer, Stage.SHADOW)
        with SyncRecorder(config=settings) as recorder:
            client = sdk_client(standin_url)
            install(client, recorder)
            usage_record(client, scenario.item, 5)
        assert standin.legacy_total(scenario.item) == 5
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 0


class TestOtherRequests:
    """Everything but usage-record creation goes to Stripe through the SDK's own client."""

    def test_other_calls_pass_through(self, client, scenario, standin):
        """Retrieving a customer and listing usage summaries work unchanged."""
        assert client.v1.customers.retrieve(scenario.customer).id == scenario.customer
        response = client.raw_request(
            "get",
            f"/v1/subscription_items/{scenario.item}/usage_record_summaries",
            stripe_version=LEGACY_VERSION,
        )
        assert response.code == 200

    def test_install_wraps_the_client_once_and_uninstall_restores_it(self, recorder, standin_url):
        """Installing twice keeps one wrapper; uninstall gives the SDK's client back."""
        client = sdk_client(standin_url)
        own = client._requestor._client
        first = install(client, recorder)
        second = install(client, recorder)
        assert client._requestor._client is second and second.inner is own
        assert first.inner is own
        uninstall(client)
        assert client._requestor._client is own

    def test_module_level_install(self, recorder, monkeypatch):
        """install(stripe, ...) wraps stripe.default_http_client (made as the SDK would)."""
        monkeypatch.setattr(stripe, "default_http_client", None)
        hooked = install(stripe, recorder)
        assert stripe.default_http_client is hooked
        assert isinstance(hooked.inner, stripe.HTTPClient)
        uninstall(stripe)
        assert stripe.default_http_client is hooked.inner

    def test_install_on_something_else_is_refused(self, recorder):
        """A clear error naming what install() takes."""
        with pytest.raises(ConfigError, match=r"stripe module or a stripe\.StripeClient"):
            install(object(), recorder)  # type: ignore[arg-type]

    def test_the_hook_is_a_stripe_http_client(self, client):
        """The SDK keeps its retry logic: the hook is a stripe.HTTPClient subclass."""
        assert isinstance(client._requestor._client, DualWriteHTTPClient)


# ------------------------------------------------------------------------ stripe-python 11.x

#: An app's own pin: stripe-python 11.x, the last with the usage-record methods.
STRIPE11_PIN = "stripe>=11,<12"

#: Where the stripe-python 11.x virtualenvs are kept between runs, one per checkout and set of
#: dualwrite's requirements (rebuilt when they change).
STRIPE11_VENVS = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dualwrite-tests"
)


def stripe11_venv() -> Path:
    """Where this checkout's 11.x virtualenv lives: named by the checkout and its declared
    requirements (read from pyproject.toml, not from an installed copy's metadata)."""
    from tests.apps_support import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    recipe = [STRIPE11_PIN, str(REPO), *project["project"]["dependencies"]]
    digest = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:12]
    return STRIPE11_VENVS / f"venv-stripe11-{digest}"


def stripe11_python() -> Path:
    """The Python of a virtualenv made as an app pinned to stripe-python 11.x installs dualwrite:
    the app's pin first, then ``pip install -e <this checkout>`` with nothing skipped (no
    ``--no-deps``): pip must resolve dualwrite's requirements around the 11.x already there, and
    ``pip check`` must find them all met. Editable, so the code run is this checkout's; made once
    and reused while the checkout's requirements stay the same."""
    from tests.apps_support import REPO

    venv = stripe11_venv()
    python = venv / "bin" / "python"
    done = venv / "installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / "venv-stripe11.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one test run builds it; another waits, then reuses it
        if done.exists() and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        for step in ([*pip, "install", STRIPE11_PIN], [*pip, "install", "-e", str(REPO)]):
            result = subprocess.run(step, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"{' '.join(step[3:])} failed:\n{result.stderr}"
        checked = subprocess.run([*pip, "check"], capture_output=True, text=True)
        assert checked.returncode == 0, f"pip check in {venv}:\n{checked.stdout}"
        done.touch()
    return python


@pytest.mark.slow
class TestStripe11:
    """An app pinned to stripe-python 11.x installs dualwrite normally, keeps its 11.x, and runs
    examples/sdk_hook.py (both usage-record methods) and an operator command on it."""

    def test_install_keeps_the_apps_stripe_11(self):
        """``pip install dualwrite`` after the app's 11.x pin leaves stripe at 11.x, and the
        installed dualwrite declares a stripe requirement 11.x meets."""
        python = stripe11_python()
        probe = (
            "import importlib.metadata as m, stripe; "
            "print(stripe.VERSION); "
            "print(*[r for r in m.requires('dualwrite') if r.startswith('stripe')])"
        )
        found = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, check=True
        )
        version, requirement = found.stdout.splitlines()
        assert version.startswith("11."), version
        assert requirement.startswith("stripe>=11"), requirement

    def test_sdk_hook_example_on_stripe_11(
        self, redis_url, key_prefix, standin_url, standin, tmp_path
    ):
        """Module-level create_usage_record and the client's usage_records.create are
        dual-written at every stage; a 500 the SDK retries records once; ``dualwrite meters
        plan`` (the installed command) reads the account through 11.x."""
        from tests.apps_support import REPO, Shop, example_environment, wait_for_totals

        python = stripe11_python()
        settings = make_settings(
            redis_url=redis_url, prefix=key_prefix, api_base=standin_url, api_key=STRIPE_KEY
        )
        shop = Shop.build(settings, standin_url)
        environment = example_environment(redis_url, key_prefix, standin_url) | {
            "DUALWRITE_METERS": json.dumps(
                [{"event_name": EVENT_NAME, "legacy_prices": [shop.legacy_price]}]
            )
        }
        del environment["PYTHONPATH"]  # dualwrite comes from the virtualenv's install
        arguments = []
        for customer in shop.customers:
            arguments += [f"{customer.scenario.item}=3", f"{customer.scenario.item}=4"]
            customer.sent += 7
        shadow = next(c for c in shop.customers if c.stage is Stage.SHADOW)
        standin.faults.refuse(
            path=rf"/v1/subscription_items/{shadow.scenario.item}/usage_records",
            status=500,
            type="api_error",
            message="injected",
            count=1,
        )
        result = subprocess.run(
            [str(python), "examples/sdk_hook.py", *arguments],
            cwd=REPO,
            env=environment,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.splitlines()) == len(arguments)
        assert standin.faults.injected.get("refused") == 1  # the SDK retried it
        totals = wait_for_totals(standin_url, shop)
        assert totals["held"] == totals["wanted"]

        planned = subprocess.run(
            [str(python.parent / "dualwrite"), "meters", "plan", "--json"],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert planned.returncode == 0, planned.stderr
        plan = json.loads(planned.stdout)
        [meter] = [m for m in plan["meters"] if shop.legacy_price in m["prices"]]
        assert (meter["event_name"], meter["action"]) == (EVENT_NAME, "exists"), meter
