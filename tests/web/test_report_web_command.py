"""``dualwrite report --web``: the report page served on this machine, behind a token made for the
run (printed in the address) when DUALWRITE_REPORT_TOKEN is not set."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from tests.observability.test_logging import base_env, dualwrite_process, free_port


def printed_address(stdout: Path) -> str:
    """The address the command printed, once it has."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = re.search(r"report page on (http://\S+)", stdout.read_text())
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no address printed: {stdout.read_text()!r}")


@pytest.mark.slow  # a process start on a loaded 2-core machine: 3-5 s
def test_report_web_serves_the_page(redis_url, key_prefix, tmp_path: Path):
    """The printed address opens the overview (its one-run token sets the cookie); without the
    token the page refuses."""
    port = free_port()
    env = base_env(redis_url, key_prefix)
    with dualwrite_process(["report", "--web", "--port", str(port)], env, tmp_path):
        address = printed_address(tmp_path / "stdout.log")
        assert address.startswith(f"http://127.0.0.1:{port}/?token=")
        deadline = time.monotonic() + 15
        while True:
            try:
                page = httpx.get(address, follow_redirects=True, timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        refused = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert page.status_code == 200 and "Overview" in page.text
    assert refused.status_code == 401
