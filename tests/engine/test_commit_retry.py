"""A commit whose reply is lost: Redis applied it, the client could not know, and sent it again.

A relay between the client and the real Redis forwards the commit script, lets Redis run it, then
drops the reply and the connection. redis-py reconnects and sends the script again (and the engine
spools what still fails): the ledger must count the event once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis

from dualwrite.commit import _APPLY, Commit, CommitWriter
from dualwrite.redis_client import open_redis
from dualwrite.spool import Spool
from tests.support import make_settings

pytestmark = pytest.mark.anyio

COMMIT_SHA = hashlib.sha1(_APPLY.encode()).hexdigest().encode()


class ReplyDroppingRelay:
    """A TCP relay to Redis that swallows the reply to the first ``drops`` commit scripts."""

    def __init__(self, upstream: tuple[str, int], drops: int, database: str = "0") -> None:
        self.upstream = upstream
        self.database = database
        self.drops = drops
        self.dropped = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/{self.database}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        drop_next_reply = asyncio.Event()

        async def client_to_redis() -> None:
            while data := await reader.read(65536):
                if COMMIT_SHA in data.lower() and self.dropped < self.drops:
                    self.dropped += 1
                    drop_next_reply.set()
                up_writer.write(data)
                await up_writer.drain()

        async def redis_to_client() -> None:
            while data := await up_reader.read(65536):
                if drop_next_reply.is_set():
                    # Redis ran the script; the client never hears of it.
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(client_to_redis()), asyncio.ensure_future(redis_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            up_writer.close()
            writer.close()


@pytest.fixture
async def relay(redis_url: str) -> AsyncIterator[ReplyDroppingRelay]:
    parsed = urlparse(redis_url)
    upstream = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
    relay = ReplyDroppingRelay(upstream, drops=1, database=parsed.path.strip("/") or "0")
    await relay.start()
    yield relay
    await relay.aclose()


def untracked_commit(prefix: str, name: str) -> Commit:
    """A commit with no caller identifier (the engine minted one): nothing but a marker guards it."""
    return Commit(
        prefix=prefix,
        shard=0,
        ledger_key=f"{prefix}:{{s0}}:ledger:2026-11-25:cus_{name}:api",
        index_member=f"2026-11-25|cus_{name}|api",
        index_score=20417,
        increments={"events": 1, "quantity": 5},
        outbox_payload='{"shadow": "entry"}',
    )


async def test_a_resent_commit_counts_once(
    relay: ReplyDroppingRelay, redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """The client's automatic resend after a lost reply, then a spool replay: counted once."""
    settings = make_settings(
        redis_url=relay.url, prefix=key_prefix, api_base="http://127.0.0.1:1", api_key=None
    )
    client = open_redis(settings.redis)
    commit = untracked_commit(key_prefix, "lost_reply")
    # Redis must know the script already: otherwise the reply dropped is EVALSHA's NOSCRIPT, the
    # script never ran, and the resend applies it for the first time.
    await redis_client.script_load(_APPLY)
    try:
        writer = CommitWriter(client, divergence_maxlen=1000)
        applied = await writer.apply(commit)
    finally:
        await client.aclose()
    assert relay.dropped == 1, "the relay never saw the commit script"
    # The resend found the first run's marker: this call reports "already applied".
    assert applied is False
    # The engine spools a commit it could not confirm; the replay must not count it again.
    spool = Spool(tmp_path / "spool")
    await spool.append(commit)
    assert await spool.replay(CommitWriter(redis_client, divergence_maxlen=1000)) == 0
    assert await redis_client.hgetall(commit.ledger_key) == {"events": "1", "quantity": "5"}
    assert await redis_client.xlen(f"{key_prefix}:{{s0}}:outbox") == 1


async def test_the_same_commit_applied_twice_counts_once(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Without a lost reply: a second apply of one commit is a no-op."""
    writer = CommitWriter(redis_client, divergence_maxlen=1000)
    commit = untracked_commit(key_prefix, "twice")
    assert await writer.apply(commit) is True
    assert await writer.apply(commit) is False
    assert await redis_client.hgetall(commit.ledger_key) == {"events": "1", "quantity": "5"}
