"""``Commit`` as a value: what a spool replay adds to a commit it applies again."""

from __future__ import annotations

from dualwrite.commit import Commit


def a_commit() -> Commit:
    """A commit counting one event of 5 units."""
    return Commit(
        prefix="dwtest-values",
        shard=0,
        ledger_key="dwtest-values:{s0}:ledger:2026-11-25:cus_v:api",
        index_member="2026-11-25|cus_v|api",
        index_score=20417,
        increments={"events": 1, "quantity": 5},
    )


def test_extra_counters_add_to_the_commit_s_own() -> None:
    """A counter the commit has already is added to; a new one starts from the extra amount; the
    original commit is left as it was."""
    commit = a_commit()
    replayed = commit.with_increments({"events": 2, "delayed_events": 1})
    assert replayed.increments == {"events": 3, "quantity": 5, "delayed_events": 1}
    assert commit.increments == {"events": 1, "quantity": 5}
    assert replayed.model_copy(update={"increments": commit.increments}) == commit
