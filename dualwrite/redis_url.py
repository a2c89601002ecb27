"""Redis addresses: one server (``redis://``) or a Redis Cluster (``redis+cluster://``), parsed once.

A cluster URL lists seed nodes, comma-separated; the client asks them for the slot map and finds
every other node itself, so two or three seeds are enough::

    redis+cluster://10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000
    rediss+cluster://user:secret@redis-a:6380,redis-b:6380      (TLS)

A cluster has one database, so the URL carries no ``/<db>`` (``/`` or ``/0`` are accepted).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["CLUSTER_SCHEMES", "SINGLE_SCHEMES", "ClusterAddress", "parse_cluster_url"]

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
_EXAMPLE = "e.g. redis+cluster://10.0.0.1:7000,10.0.0.2:7000"


@dataclass(frozen=True, slots=True)
class ClusterAddress:
    """Where a Redis Cluster is: its seed nodes and credentials."""

    seeds: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        hidden = "***" if self.password else None
        return f"ClusterAddress(seeds={self.seeds}, tls={self.tls}, password={hidden})"


def parse_cluster_url(url: str) -> ClusterAddress:
    """Read a ``redis+cluster://`` / ``rediss+cluster://`` URL.

    Raises:
        ValueError: the URL is malformed; the message says what to fix and never repeats the
            password.
    """
    scheme = next((s for s in CLUSTER_SCHEMES if url.startswith(s)), None)
    if scheme is None:
        msg = f"a cluster URL starts with redis+cluster:// or rediss+cluster:// ({_EXAMPLE})"
        raise ValueError(msg)
    rest = url[len(scheme) :]
    rest, _, path = rest.partition("/")
    if path not in ("", "0") or "?" in rest:
        msg = f"a cluster URL takes no database or options after the seeds ({_EXAMPLE})"
        raise ValueError(msg)
    credentials, at, hosts = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    seeds: list[tuple[str, int]] = []
    for seed in hosts.split(","):
        host, colon, port_text = seed.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            msg = f"each cluster seed must be host:port, got {seed.strip()!r} ({_EXAMPLE})"
            raise ValueError(msg)
        seeds.append((host, int(port_text)))
    return ClusterAddress(
        seeds=tuple(seeds),
        tls=scheme.startswith("rediss"),
        username=username,
        password=password,
    )
