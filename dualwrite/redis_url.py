"""Redis addresses: one server (``redis://``), a Redis Cluster (``redis+cluster://``) or a master
watched by Redis Sentinel (``redis+sentinel://``), parsed once.

A cluster URL lists seed nodes, comma-separated; the client asks them for the slot map and finds
every other node itself, so two or three seeds are enough::

    redis+cluster://10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000
    rediss+cluster://user:secret@redis-a:6380,redis-b:6380      (TLS)

A cluster has one database, so the URL carries no ``/<db>`` (``/`` or ``/0`` are accepted).

A Sentinel URL lists the sentinels, then names the master they watch (the convention kombu and
others use), and optionally a database::

    redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/mymaster
    rediss+sentinel://:secret@s1:26379,s2:26379/mymaster/2      (TLS, password, database 2)

The credentials are the master's (and its replicas'); the sentinels are asked without them. The
client asks the sentinels for the master before connecting, and again after a failover.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

__all__ = [
    "CLUSTER_SCHEMES",
    "SENTINEL_SCHEMES",
    "SINGLE_SCHEMES",
    "ClusterAddress",
    "SentinelAddress",
    "parse_cluster_url",
    "parse_sentinel_url",
]

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_EXAMPLE = "e.g. redis+cluster://10.0.0.1:7000,10.0.0.2:7000"
_SENTINEL_EXAMPLE = "e.g. redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster"


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


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """Where Redis Sentinel is, the master it watches, and the master's credentials."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        hidden = "***" if self.password else None
        return (
            f"SentinelAddress(sentinels={self.sentinels}, service={self.service!r}, "
            f"db={self.db}, tls={self.tls}, password={hidden})"
        )


def _split_hosts(
    rest: str, example: str, what: str
) -> tuple[tuple[tuple[str, int], ...], str | None, str | None]:
    """``user:password@h1:p1,h2:p2`` → the hosts and the credentials."""
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
            msg = f"each {what} must be host:port, got {seed.strip()!r} ({example})"
            raise ValueError(msg)
        seeds.append((host, int(port_text)))
    return tuple(seeds), username, password


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Read a ``redis+sentinel://`` / ``rediss+sentinel://`` URL.

    Raises:
        ValueError: the URL is malformed; the message says what to fix and never repeats the
            password.
    """
    scheme = next((s for s in SENTINEL_SCHEMES if url.startswith(s)), None)
    if scheme is None:
        msg = (
            "a Sentinel URL starts with redis+sentinel:// or rediss+sentinel:// "
            f"({_SENTINEL_EXAMPLE})"
        )
        raise ValueError(msg)
    rest, _, path = url[len(scheme) :].partition("/")
    service, _, db_text = path.partition("/")
    if "?" in path or "?" in rest:
        msg = f"a Sentinel URL takes no options ({_SENTINEL_EXAMPLE})"
        raise ValueError(msg)
    if not service or "/" in db_text or (db_text and not db_text.isdigit()):
        msg = (
            "a Sentinel URL names the master after the sentinels, and optionally a database: "
            f"/<master name>[/<db>] ({_SENTINEL_EXAMPLE})"
        )
        raise ValueError(msg)
    sentinels, username, password = _split_hosts(rest, _SENTINEL_EXAMPLE, "sentinel")
    return SentinelAddress(
        sentinels=sentinels,
        service=unquote(service),
        db=int(db_text or 0),
        tls=scheme.startswith("rediss"),
        username=username,
        password=password,
    )


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
    seeds, username, password = _split_hosts(rest, _EXAMPLE, "cluster seed")
    return ClusterAddress(
        seeds=seeds,
        tls=scheme.startswith("rediss"),
        username=username,
        password=password,
    )
