"""Running a uvicorn server in a background thread, for tests, benchmarks and the demo."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

__all__ = ["STARTUP_TIMEOUT", "serve_in_thread"]

#: Seconds a server may take to start listening.
STARTUP_TIMEOUT = 10.0


@contextmanager
def serve_in_thread(
    server: uvicorn.Server,
    *,
    name: str,
    failure: Exception,
    grace: float,
) -> Iterator[int]:
    """Run ``server`` in a daemon thread; yield the port it listens on; stop it on exit.

    Raises:
        ``failure``: the server did not start listening within ``STARTUP_TIMEOUT``.
    """
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=STARTUP_TIMEOUT)
            raise failure
        time.sleep(0.005)
    try:
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_TIMEOUT + grace)
