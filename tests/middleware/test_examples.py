"""The examples, run as written against the stand-in, with customers at all four stages: the Flask
and Django apps under gunicorn, the Celery task in a real worker, the SDK hook and the direct API
as scripts. Every customer's totals are read back through Stripe's summary endpoints. The README
and the documentation show each example as it is in ``examples/``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import uuid

import pytest
import redis

from dualwrite.config import Settings
from tests.apps_support import (
    REPO,
    Shop,
    consumer_pid,
    example_environment,
    free_port,
    gunicorn,
    outbox_consumers,
    send_usage,
    wait_for_totals,
    wait_listening,
)
from tests.conftest import SettingsFactory

#: Blocks that show a file: a ``<!-- file: PATH -->`` line, then a fenced block.
FILE_BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)```", re.DOTALL)


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """The examples' settings, as the test sees them (its prefix, the stand-in)."""
    return standin_settings()


@pytest.fixture
def shop(settings: Settings, standin_url: str, standin) -> Shop:
    """One customer at each stage."""
    return Shop.build(settings, standin_url)


@pytest.fixture
def environment(redis_url: str, key_prefix: str, standin_url: str) -> dict[str, str]:
    """The examples' environment for this test."""
    return example_environment(redis_url, key_prefix, standin_url)


def assert_totals(standin_url: str, shop: Shop) -> None:
    """Stripe holds exactly what each customer's stage should have written."""
    totals = wait_for_totals(standin_url, shop)
    assert totals["held"] == totals["wanted"]


def run(argv: list[str], environment: dict[str, str]) -> str:
    """Run an example script; its standard output (the test fails with its stderr)."""
    result = subprocess.run(
        argv, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class TestReadme:
    """The README's and the documentation's snippets are the example files, so the tests run
    what they show."""

    def test_blocks_equal_the_files(self):
        """Every ``<!-- file: ... -->`` block of the README and of ``docs/`` is that file's
        content, byte for byte; the documentation shows every example."""
        pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
        shown: set[str] = set()
        for page in pages:
            for match in FILE_BLOCK.finditer(page.read_text()):
                shown.add(match["path"])
                assert match["body"] == (REPO / match["path"]).read_text(), (page, match["path"])
        assert {
            "examples/dualwrite.toml",
            "examples/record_usage.py",
            "examples/record_usage_async.py",
            "examples/flask_app/app.py",
            "examples/django_app/project/wsgi.py",
            "examples/django_app/project/views.py",
            "examples/celery_task.py",
            "examples/sdk_hook.py",
            "examples/starlette_app.py",
        } <= shown


class TestWebApps:
    """The Flask and Django examples under gunicorn (pre-fork, app preloaded in the master)."""

    @pytest.mark.parametrize(
        "app", ["examples.flask_app.app:app", "examples.django_app.project.wsgi:application"]
    )
    def test_app_records_every_stage(
        self, app, environment, shop, standin_url, redis_url, key_prefix, settings
    ):
        """Usage posted to the app is written at each customer's stage; each worker process
        started its own outbox worker, after the fork."""
        with gunicorn(app, environment, workers=2) as server:
            send_usage(server.url, shop, per_customer=10, threads=4)
            assert_totals(standin_url, shop)
            pids = [
                consumer_pid(name) for name in outbox_consumers(redis_url, key_prefix, settings)
            ]
            assert pids and set(pids) <= server.workers
            assert len(pids) == len(set(pids))  # once per process
            assert server.process.pid not in pids  # never the master, before the fork


class TestAsgiApp:
    """The Starlette example under uvicorn (the middleware's lifespan starts its worker)."""

    def test_app_records_every_stage(self, environment, shop, standin_url):
        """Usage posted to examples/starlette_app.py is written at each customer's stage."""
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "examples.starlette_app:app", "--port", str(port)]
        process = subprocess.Popen([*argv, "--log-level", "warning"], cwd=REPO, env=environment)
        try:
            wait_listening(port, process)
            send_usage(f"http://127.0.0.1:{port}", shop, per_customer=10, threads=4)
            assert_totals(standin_url, shop)
        finally:
            process.terminate()  # uvicorn shuts down gracefully, then re-raises the signal
            assert process.wait(timeout=60) in (0, -signal.SIGTERM)


class TestScripts:
    """The direct API and the SDK hook, as scripts."""

    @pytest.mark.parametrize("script", ["record_usage.py", "record_usage_async.py"])
    def test_record_usage(self, script, environment, shop, standin_url):
        """The direct API's scripts record at each stage; run again with the same identifier,
        they get the first outcome and record nothing twice."""
        for number, customer in enumerate(shop.customers):
            scenario = customer.scenario
            argv = [sys.executable, f"examples/{script}", scenario.customer, scenario.item]
            identifier = f"job-{uuid.uuid4().hex[:8]}"
            first = run([*argv, "5", identifier], environment)
            assert first.split()[:2] == [customer.stage.value, "True"]
            if number == 1:
                assert run([*argv, "5", identifier], environment) == first
            customer.sent += 5
        assert_totals(standin_url, shop)

    def test_sdk_hook(self, environment, shop, standin_url):
        """examples/sdk_hook.py on this SDK (12+: raw_request) writes at each stage."""
        environment["DUALWRITE_METERS"] = (
            f'[{{"event_name": "api_requests", "legacy_prices": ["{shop.legacy_price}"]}}]'
        )
        arguments = []
        for customer in shop.customers:
            arguments += [f"{customer.scenario.item}=3", f"{customer.scenario.item}=4"]
            customer.sent += 7
        out = run([sys.executable, "examples/sdk_hook.py", *arguments], environment)
        assert len(out.splitlines()) == len(arguments)
        assert_totals(standin_url, shop)


class TestCelery:
    """examples/celery_task.py in a real Celery worker (prefork pool), Redis as broker."""

    def test_tasks_record_every_stage(self, environment, shop, standin_url, key_prefix, redis_url):
        """Tasks sent to the worker record at each stage; the broker's keys live under the
        test's prefix (cleaned with it)."""
        from celery import Celery

        broker = environment["DUALWRITE_REDIS__URL"]
        environment |= {"CELERY_BROKER_URL": broker, "CELERY_KEY_PREFIX": f"{key_prefix}:celery:"}
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "examples.celery_task",
                "worker",
                "--pool=prefork",
                "--concurrency=2",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "--loglevel=WARNING",
            ],
            cwd=REPO,
            env=environment,
        )
        prefix = {"global_keyprefix": environment["CELERY_KEY_PREFIX"]}
        client = Celery("test-client", broker=broker, backend=broker)
        redis_client = redis.Redis.from_url(redis_url)
        client.conf.broker_transport_options = prefix
        client.conf.result_backend_transport_options = prefix
        try:
            results = []
            for customer in shop.customers:
                for quantity in (2, 5):
                    scenario = customer.scenario
                    results.append(
                        client.send_task(
                            "report_usage", args=[scenario.customer, scenario.item, quantity]
                        )
                    )
                    customer.sent += quantity
            assert [result.get(timeout=60) for result in results] == [True] * len(results)
            assert any(
                redis_client.scan_iter(f"{key_prefix}:celery:*celery-task-meta-*", count=10_000)
            )
            assert_totals(standin_url, shop)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
            client.close()
            redis_client.close()
