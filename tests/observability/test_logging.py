"""Structured logs (``dualwrite.logging``): one JSON object per line, and no secret in any of them."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from dualwrite.logging import JsonFormatter, ScrubbingFormatter, log_config, scrub

STRIPE_SECRET = "sk_live_51LoggingTestSecretKey0000XYZW"
TOKEN = "token-that-must-never-be-logged-42"
REDIS_PASSWORD = "redis-pw-never-logged"


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    """A log record as ``logger.warning(message, *args, extra=extra)`` makes it."""
    logger = logging.getLogger("dualwrite.tests")
    made = logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, message, args, None, extra=extra
    )
    return made


class TestJsonFormatter:
    """Each record is one JSON object with the core fields, its extras, and no secret."""

    def test_core_fields_and_extras(self) -> None:
        """ts, level, logger, message, then the extras; a clashing extra keeps its value aside."""
        line = JsonFormatter().format(
            record("delivered %d entries", 3, customer="cus_1", attempt=2, level="mine")
        )
        assert "\n" not in line
        entry = json.loads(line)
        assert entry["level"] == "warning"
        assert entry["logger"] == "dualwrite.tests"
        assert entry["message"] == "delivered 3 entries"
        assert (entry["customer"], entry["attempt"], entry["extra_level"]) == ("cus_1", 2, "mine")
        assert entry["ts"].endswith("Z") and len(entry["ts"]) == len("2026-11-25T23:59:01.123Z")

    def test_secrets_are_scrubbed_everywhere(self) -> None:
        """Keys, tokens and URL passwords are hidden in messages, args, extras and tracebacks."""
        try:
            msg = f"Stripe refused {STRIPE_SECRET}"
            raise RuntimeError(msg)
        except RuntimeError:
            exc_info = sys.exc_info()
        made = record(
            "calling with %s via redis://:%s@db:6379/0",
            STRIPE_SECRET,
            REDIS_PASSWORD,
            headers={"Authorization": f"Bearer {TOKEN}"},
            url=f"/_dualwrite/?token={TOKEN}&page=2",
            keys=[STRIPE_SECRET],
        )
        made.exc_info = exc_info
        line = JsonFormatter().format(made)
        entry = json.loads(line)
        for secret in (STRIPE_SECRET, TOKEN, REDIS_PASSWORD):
            assert secret not in line
        assert entry["message"].startswith("calling with sk_live_****XYZW")
        assert entry["url"] == "/_dualwrite/?token=****&page=2"
        assert entry["headers"] == {"Authorization": "Bearer ****"}
        assert "RuntimeError: Stripe refused sk_live_****XYZW" in entry["exc"]

    def test_text_lines_are_scrubbed_too(self) -> None:
        """The text format hides the same secrets."""
        formatter = ScrubbingFormatter("%(levelname)s %(name)s: %(message)s")
        line = formatter.format(record("key %s", STRIPE_SECRET))
        assert line == "WARNING dualwrite.tests: key sk_live_****XYZW"
        assert scrub("nothing secret") == "nothing secret"

    def test_log_config_routes_uvicorn_and_dualwrite(self) -> None:
        """The dictConfig sends dualwrite's and uvicorn's loggers through the JSON formatter."""
        config = log_config("json", level="DEBUG")
        assert config["formatters"]["dualwrite"]["()"] is JsonFormatter
        assert config["root"]["handlers"] == ["dualwrite"]
        for name in ("dualwrite", "uvicorn", "uvicorn.access"):
            assert config["loggers"][name] == {"level": "DEBUG", "handlers": [], "propagate": True}


# ------------------------------------------------------------------------------ the CLI, end to end


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def dualwrite_process(args: list[str], env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    """Run ``python -m dualwrite ARGS``; yields the file its stderr goes to; SIGTERM at the end."""
    stderr = tmp_path / "stderr.log"
    stdout = tmp_path / "stdout.log"
    with stderr.open("wb") as err, stdout.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dualwrite", *args], env=env, stdout=out, stderr=err
        )
        try:
            yield stderr
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)


def wait_for(url: str, headers: dict[str, str]) -> httpx.Response:
    """GET ``url`` until the process started in the background answers."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return httpx.get(url, headers=headers, timeout=2)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def json_lines(path: Path) -> list[dict[str, object]]:
    """Every line of a log file, each parsed as JSON (fails on a line that is not)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, "the process logged nothing"
    return [json.loads(line) for line in lines]


def base_env(redis_url: str, key_prefix: str) -> dict[str, str]:
    """The environment of a dualwrite process for this test, JSON logs on."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DUALWRITE_") and k not in ("STRIPE_API_KEY", "REDIS_URL")
    }
    env.update(
        DUALWRITE_LOG_FORMAT="json",
        DUALWRITE_REDIS__URL=redis_url,
        DUALWRITE_REDIS__KEY_PREFIX=key_prefix,
        DUALWRITE_STRIPE__API_BASE="http://127.0.0.1:9",
    )
    return env


class TestCommands:
    """``dualwrite worker`` and ``dualwrite serve`` log JSON lines that carry no secret."""

    @pytest.mark.slow  # a process start on a loaded 2-core machine: 3-5 s
    def test_worker_logs_json_and_serves_metrics(
        self, redis_url: str, key_prefix: str, tmp_path: Path
    ) -> None:
        """The worker's warning is a JSON line; ``--metrics-port`` serves its metrics (token)."""
        port = free_port()
        env = base_env(redis_url, key_prefix) | {"DUALWRITE_METRICS_TOKEN": TOKEN}
        args = ["worker", "--metrics-port", str(port)]
        with dualwrite_process(args, env, tmp_path) as stderr:
            url = f"http://127.0.0.1:{port}/metrics"
            assert wait_for(url, {}).status_code == 401
            response = wait_for(url, {"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code == 200
            assert "dualwrite_outbox_entries" in response.text
        entries = json_lines(stderr)
        assert any(
            entry["logger"] == "dualwrite.worker"
            and entry["level"] == "warning"
            and "STRIPE_API_KEY is not set" in str(entry["message"])
            for entry in entries
        ), entries
        assert TOKEN not in stderr.read_text()

    def test_serve_logs_json_without_tokens(
        self, redis_url: str, key_prefix: str, tmp_path: Path
    ) -> None:
        """uvicorn's lines and the access log are JSON; an access line's method, path template
        (ids as ``{id}``, no query string: a ``?token=`` never reaches it), status and duration
        are fields of their own."""
        port = free_port()
        env = base_env(redis_url, key_prefix) | {
            "DUALWRITE_REPORT_TOKEN": TOKEN,
            "STRIPE_API_KEY": STRIPE_SECRET,
        }
        with dualwrite_process(["serve", "--port", str(port)], env, tmp_path) as stderr:
            base = f"http://127.0.0.1:{port}"
            assert wait_for(f"{base}/_dualwrite/health", {}).status_code == 200
            signed_in = httpx.get(f"{base}/_dualwrite/?token={TOKEN}", timeout=5)
            assert signed_in.status_code == 303
            httpx.get(f"{base}/_dualwrite/customers/cus_Secret123?token={TOKEN}", timeout=5)
        text = stderr.read_text()
        entries = json_lines(stderr)
        assert any(entry["logger"] == "uvicorn.error" for entry in entries), entries
        access = [entry for entry in entries if entry["logger"] == "dualwrite.access"]
        fields = {(e["method"], e["path"], e["route"], e["status"]) for e in access}
        assert ("GET", "/_dualwrite/", "report", 303) in fields, access
        assert ("GET", "/_dualwrite/health", "health", 200) in fields, access
        assert any(e["path"] == "/_dualwrite/customers/{id}" for e in access), access
        assert all(isinstance(e["duration_ms"], float) for e in access)
        assert "cus_Secret123" not in text
        for secret in (TOKEN, STRIPE_SECRET):
            assert secret not in text
