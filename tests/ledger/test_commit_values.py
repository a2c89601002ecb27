"""``Commit`` as a value, and the marker ``CommitWriter.apply`` leaves: what a spool replay adds to
a commit it applies again, and which commits leave a marker in Redis (and for how long)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from dualwrite.commit import IN_DOUBT_MARKER_TTL, SPOOL_MARKER_TTL, Commit, CommitWriter


def a_commit(prefix: str = "dwtest-values", **fields: object) -> Commit:
    """A commit counting one event of 5 units."""
    return Commit.model_validate(
        {
            "prefix": prefix,
            "shard": 0,
            "ledger_key": f"{prefix}:{{s0}}:ledger:2026-11-25:cus_v:api",
            "index_member": "2026-11-25|cus_v|api",
            "index_score": 20417,
            "increments": {"events": 1, "quantity": 5},
            **fields,
        }
    )


def test_extra_counters_add_to_the_commit_s_own() -> None:
    """A counter the commit has already is added to; a new one starts from the extra amount; the
    original commit is left as it was."""
    commit = a_commit()
    replayed = commit.with_increments({"events": 2, "delayed_events": 1})
    assert replayed.increments == {"events": 3, "quantity": 5, "delayed_events": 1}
    assert commit.increments == {"events": 1, "quantity": 5}
    assert replayed.model_copy(update={"increments": commit.increments}) == commit


@pytest.mark.anyio
async def test_markers_only_where_nothing_else_guards_and_only_as_long_as_needed(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A commit with its caller's outcome (guarded by the idempotency record) leaves no marker; a
    minted one, a marker of ``IN_DOUBT_MARKER_TTL``; a spool replay (``once``), one of
    ``SPOOL_MARKER_TTL``. A marker per event for 30 days would grow Redis without bound."""
    writer = CommitWriter(redis_client, divergence_maxlen=100)

    async def marker_ttl(commit: Commit, *, once: bool = False) -> int:
        # As the engine calls it (no ``once``), or as the spool replays.
        applied = await (writer.apply(commit, once=True) if once else writer.apply(commit))
        assert applied is True
        return int(await redis_client.ttl(f"{commit.keys.tag}:spooled:{commit.id}"))

    tracked = a_commit(
        key_prefix,
        outcome_json="{}",
        idempotency_key=f"{key_prefix}:idem:a",
        idempotency_ttl=86_400,
    )
    assert await marker_ttl(tracked) == -2  # no such key
    minted = a_commit(key_prefix, ledger_key=f"{key_prefix}:{{s0}}:ledger:2026-11-25:cus_m:api")
    assert 0 < await marker_ttl(minted) <= IN_DOUBT_MARKER_TTL
    spooled = a_commit(key_prefix, ledger_key=f"{key_prefix}:{{s0}}:ledger:2026-11-25:cus_s:api")
    assert IN_DOUBT_MARKER_TTL < await marker_ttl(spooled, once=True) <= SPOOL_MARKER_TTL
