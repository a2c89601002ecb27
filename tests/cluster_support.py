"""A real Redis Cluster (three masters on loopback) for the tests, started and torn down by them.

Started with ``redis-server --cluster-enabled yes`` on free ports in a temporary directory and joined
with ``redis-cli --cluster create``; the helpers move a slot between masters (``CLUSTER SETSLOT`` +
``MIGRATE``, what ``redis-cli --cluster reshard`` does) so tests can change the topology mid-traffic.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from dualwrite.testing import RedisServerError, RedisServerProcess, redis_binary

__all__ = ["LocalCluster", "free_port_pair", "redis_binary"]


def _command(client: redis.Redis, *args: object) -> Any:
    """One raw command (redis-py leaves ``execute_command`` untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def free_port_pair() -> int:
    """A port that is free along with ``port + 10000`` (the cluster bus port)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class LocalCluster:
    """Three masters on loopback, in ``directory`` (replicas are added by ``add_replica``)."""

    def __init__(self, directory: Path, *, masters: int = 3):
        self.directory = directory
        self.ports: list[int] = []
        """The masters' ports."""
        self.replicas: list[int] = []
        self._servers: dict[int, RedisServerProcess] = {}
        while len(self.ports) < masters:
            port = free_port_pair()
            if port not in self.ports:
                self.ports.append(port)

    @property
    def url(self) -> str:
        """The dualwrite cluster URL (every master is a seed)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports) + "/"

    def start(self) -> None:
        """Start every node, join them into one cluster and wait until it says ``ok``."""
        for port in self.ports:
            self._start_node(port)
        subprocess.run(
            [
                redis_binary("redis-cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()

    def _start_node(self, port: int) -> None:
        node_dir = self.directory / str(port)
        server = RedisServerProcess(
            node_dir,
            port=port,
            extra=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--logfile",
                str(node_dir / "redis.log"),
            ],
        )
        self._servers[port] = server
        try:
            server.start()
        except RedisServerError as exc:
            msg = f"cluster node on port {port} did not start (see {node_dir / 'redis.log'}): {exc}"
            raise RuntimeError(msg) from exc

    def node(self, port: int) -> redis.Redis:
        """A plain client on one node."""
        return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node reports ``cluster_state:ok`` and agrees on all 16384 slots."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._node_ok(port) for port in self.ports):
                return
            if time.monotonic() > deadline:
                msg = "the test Redis Cluster did not reach cluster_state:ok"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def _node_ok(self, port: int) -> bool:
        client = self.node(port)
        try:
            info = _command(client, "CLUSTER", "INFO")
        except redis.RedisError:
            return False
        finally:
            client.close()
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and "cluster_slots_ok:16384" in text

    def owner_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        return self.owner_of_slot(key_slot(key.encode()))

    def owner_of_slot(self, slot: int, *, via: int | None = None) -> int:
        """The port of the master serving ``slot``, as node ``via`` (default: the first master)
        sees it."""
        client = self.node(self.ports[0] if via is None else via)
        try:
            for start, end, master, *_ in _command(client, "CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        finally:
            client.close()
        msg = f"no master serves slot {slot}"
        raise RuntimeError(msg)

    def node_id(self, port: int) -> str:
        """A node's cluster id."""
        client = self.node(port)
        try:
            return str(_command(client, "CLUSTER", "MYID").decode())
        finally:
            client.close()

    def migrate_slot_of(self, key: str, *, batch: int = 50) -> tuple[int, int]:
        """Move the slot holding ``key`` to another master, keys and all, while clients keep
        writing (the steps of ``redis-cli --cluster reshard``); returns (from port, to port)."""
        slot = key_slot(key.encode())
        source_port = self.owner_of(key)
        target_port = next(port for port in self.ports if port != source_port)
        source, target = self.node(source_port), self.node(target_port)
        source_id, target_id = self.node_id(source_port), self.node_id(target_port)
        try:
            _command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            _command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys = _command(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                _command(source, "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
                time.sleep(0.01)  # let client commands interleave with the move
            for client in (target, source):
                _command(client, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
            for port in self.ports:
                if port not in (source_port, target_port):
                    other = self.node(port)
                    try:
                        _command(other, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
                    finally:
                        other.close()
        finally:
            source.close()
            target.close()
        return source_port, target_port

    def add_replica(self, master_port: int) -> int:
        """Start a node and make it a replica of ``master_port``; returns its port once it has
        copied the master's data."""
        port = free_port_pair()
        self._start_node(port)
        self.replicas.append(port)
        subprocess.run(
            [
                redis_binary("redis-cli"),
                "--cluster",
                "add-node",
                f"127.0.0.1:{port}",
                f"127.0.0.1:{master_port}",
                "--cluster-slave",
                "--cluster-master-id",
                self.node_id(master_port),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        replica = self.node(port)
        try:
            deadline = time.monotonic() + 30
            while True:
                info = replica.info("replication")
                if (
                    info.get("master_link_status") == "up"
                    and info.get("master_sync_in_progress") == 0
                ):
                    break
                if time.monotonic() > deadline:
                    msg = f"replica {port} did not sync with {master_port}"
                    raise RuntimeError(msg)
                time.sleep(0.05)
        finally:
            replica.close()
        # A failover needs the masters' votes: wait until each of them knows the new replica.
        replica_id = self.node_id(port)
        deadline = time.monotonic() + 30
        while not all(self._knows_replica(master, replica_id) for master in self.ports):
            if time.monotonic() > deadline:
                msg = f"the masters did not learn of replica {port}"
                raise RuntimeError(msg)
            time.sleep(0.05)
        self.wait_ok()
        return port

    def _knows_replica(self, port: int, replica_id: str) -> bool:
        client = self.node(port)
        try:
            nodes = _command(client, "CLUSTER", "NODES")
        finally:
            client.close()
        text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
        return any(
            line.startswith(replica_id) and "slave" in line and " connected" in line
            for line in text.splitlines()
        )

    def fail_over_to(self, replica_port: int) -> None:
        """Promote a replica with ``CLUSTER FAILOVER`` (coordinated: the replica first catches up
        with its master, as in a planned maintenance) and wait until the cluster agrees."""
        replica = self.node(replica_port)
        try:
            for _ in range(3):  # a manual failover gives up after 5 s; ask again then
                _command(replica, "CLUSTER", "FAILOVER")
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if _command(replica, "ROLE")[0] in (b"master", "master"):
                        break
                    time.sleep(0.05)
                else:
                    continue
                break
            else:
                msg = f"replica {replica_port} was not promoted"
                raise RuntimeError(msg)
        finally:
            replica.close()
        masters = {self.owner_of_slot(slot, via=replica_port) for slot in range(0, 16384, 64)}
        self.replicas = [port for port in self.ports + self.replicas if port not in masters]
        self.ports = sorted(masters)
        self.wait_ok()

    def stop(self) -> None:
        """Stop every node (SIGTERM; nothing is saved) and remove its files."""
        for server in self._servers.values():
            server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
