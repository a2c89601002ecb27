"""A real Redis Sentinel set-up on loopback for the tests: a master, a replica and three sentinels
(quorum two), each a process of the test's own on a free port, and a forced failover.

Sentinels run as ``redis-server <conf> --sentinel`` (the same binary) with a config file of their
own in the test's directory, which they rewrite as they learn the topology.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from dualwrite.testing import RedisServerError, RedisServerProcess, redis_binary

__all__ = ["SERVICE", "LocalSentinel"]

SERVICE = "mymaster"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ask(port: int, *args: object) -> Any:
    """One command to the server or sentinel on ``port``."""
    client = redis.Redis(
        port=port, socket_timeout=2, socket_connect_timeout=1, decode_responses=True
    )
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


class LocalSentinel:
    """A master and a replica (append-only, fsync every second) watched by three sentinels."""

    def __init__(self, directory: Path, *, sentinels: int = 3):
        self.directory = directory
        self.master = RedisServerProcess(directory / "master", appendfsync="everysec")
        self.replica = RedisServerProcess(
            directory / "replica",
            appendfsync="everysec",
            extra=("--replicaof", "127.0.0.1", str(self.master.port)),
        )
        self.sentinel_ports = [_free_port() for _ in range(sentinels)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The dualwrite URL: every sentinel, then the master's name."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def master_port(self) -> int:
        """The port of the master, as the first sentinel says."""
        reply = _ask(self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", SERVICE)
        return int(reply[1])

    def start(self) -> None:
        """Start the servers, the sentinels, and wait until every sentinel knows the replica and
        the other sentinels (a failover needs both)."""
        self.master.start()
        self.replica.start()
        self._wait(
            lambda: _ask(self.replica.port, "INFO", "replication")["master_link_status"] == "up"
        )
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n",
                encoding="utf-8",
            )
            self._sentinels.append(
                subprocess.Popen(
                    [redis_binary(), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        others = len(self.sentinel_ports) - 1

        def settled() -> bool:
            for port in self.sentinel_ports:
                master = _ask(port, "SENTINEL", "master", SERVICE)  # parsed by redis-py
                if int(master["num-slaves"]) < 1 or int(master["num-other-sentinels"]) < others:
                    return False
            return True

        self._wait(settled, seconds=30)

    def failover(self) -> int:
        """Force a failover (``SENTINEL FAILOVER``) and wait until the replica is the master;
        returns the new master's port."""
        old = self.master_port()
        _ask(self.sentinel_ports[0], "SENTINEL", "FAILOVER", SERVICE)
        self._wait(lambda: self.master_port() != old, seconds=30)
        new = self.master_port()
        self._wait(lambda: _ask(new, "ROLE")[0] == "master", seconds=30)
        return new

    def stop(self) -> None:
        """Stop the sentinels, then the servers."""
        for process in self._sentinels:
            process.terminate()
        for process in self._sentinels:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self._sentinels.clear()
        for server in (self.replica, self.master):
            with contextlib.suppress(RedisServerError):  # killed: nothing more to stop
                server.stop()

    @staticmethod
    def _wait(condition: Any, *, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                if condition():
                    return
            except (redis.RedisError, OSError, KeyError, IndexError):
                pass
            if time.monotonic() > deadline:
                msg = f"the Sentinel set-up did not settle within {seconds:g} s"
                raise RedisServerError(msg)
            time.sleep(0.1)
