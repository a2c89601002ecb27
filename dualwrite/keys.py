"""The Redis key layout, in one place.

Every key is ``<prefix>:{<tag>}:<name>``. The part in braces is a Redis Cluster hash tag: whatever one
transaction or script touches together shares a tag, so it lives in one slot.

======================================  =================  ===============================================
key                                     type               what
======================================  =================  ===============================================
``P:{flags}:config``                    hash               default stage, kill switch, rollout percentages
``P:{flags}:override``                  hash               customer → stage
``P:{flags}:schedule``                  hash               customer → JSON list of ``[at, stage]``
``P:{flags}:audit``                     stream (capped)    every flag change: who, when, old, new, reason
``P:{flags}:guard``                     hash               customer → JSON: what the guard last rolled back
``P:{flags}:billing``                   hash               customer → JSON: test clock, price move instant
``P:{flags}:guard-lease``               string (TTL)       the one worker running this interval's guard pass
``P:{flags}:guard-sweep``               hash               the guard's last full pass: when, count, inputs
``P:flags:changed``                     pub/sub channel    customer id or ``*`` after every change
``P:{sN}:outbox``                       stream + group     shadow writes waiting for a worker
``P:{sN}:retry``                        sorted set         outbox entries waiting out a backoff (score = due)
``P:{sN}:dead``                         stream (capped)    entries refused for good or too old
``P:{sN}:retired``                      stream (capped)    legacy writes retired (the item left legacy)
``P:{sN}:retired-moved``                string             ``done``: old retired letters left ``dead``
``P:{sN}:divergence``                   stream (capped)    events whose legs disagree
``P:{sN}:ledger:<period>:<cus>:<ev>``   hash               per customer, event name and period: counters
``P:{sN}:ledger-index``                 sorted set         ledger hashes by period (score = day number)
``P:{sN}:rollup:<first>:<last>``        hash               copies of ledger rows spanning those days
``P:{sN}:rollup-index``                 sorted set         rollup hashes by first day (score)
``P:{sN}:rollup-ready``                 string             set once rows older than the rollups are copied in
``P:{sN}:guard-changed``                set                customers whose ledger rows changed (guard)
``P:{sN}:guard-taking``                 set                the changed customers the guard's pass is judging
``P:{sN}:customer-rows``                hash               customer → its rows: ``<period>|<ev>`` lines
``P:{sN}:customer-rows-ready``          string             set once older rows are in ``customer-rows``
``P:{sN}:recon:<period>:<cus>:<ev>``    hash               reconcile: Stripe's totals, drift from the ledger
``P:{sN}:recon-index``                  sorted set         reconciliation hashes by period (score = day)
``P:{sN}:recon-rollup:<first>:<last>``  hash               JSON copies of recon hashes spanning those days
``P:{sN}:recon-rollup-index``           sorted set         reconciliation rollups by first day (score)
``P:{sN}:recon-rollup-ready``           string             set once older reconciliation hashes are copied in
``P:{sN}:idem:<digest>``                hash/str (TTL)     claim: fp, state, plan; committed: compact outcome
``P:{sN}:claims``                       sorted set         claims not yet committed (score = due for recovery)
``P:{sN}:set:<item>:<ts>``              hash (TTL)         last quantity ``set`` at a timestamp, its order
``P:{items}:map:<item>``                string (TTL)       proxy: subscription item → customer, event name
``P:{items}:period:<item>``             string (TTL)       an item's billing period, anchor, interval (ledger)
``P:{items}:customer-period:<cus>``     string (TTL)       the same, for a customer's items never read
``P:{items}:unmapped``                  hash               proxy: item → usage requests forwarded unmapped
``P:{sN}:spooled:<id>``                 string (TTL)       a commit already applied (spool replay; lost reply)
``P:{sN}:late:<meter id>``              string (TTL)       a meter event already marked as refused late
``P:{mH}:mev:<meter id>``               string (TTL)       a meter event written (to attribute a late refusal)
``P:{sN}:turn:<cus>:<ev>``              string (lease)     the one meter call in flight for a customer/meter
``P:{rl}:<path>``                       string (TTL)       one Stripe rate limit (GCRA): legacy, meter, stream
``P:{rl}:backpressure``                 hash               waits and held-back writes per limit (report)
``P:{ops}:audit``                       stream (capped)    operations: meters apply, backfill (who, what)
``P:{sN}:backfill:<identifier>``        string (TTL)       a backfilled meter event already counted
``P:{sN}:marker``                       hash               data-loss marker: id, created, beat, lost since
``P:{flags}:marker``                    hash               the same for the flags' slot
======================================  =================  ===============================================

``N`` is the customer's shard: ``crc32(customer) % shards``. Everything about one customer lives in
its shard, so an outbox entry, its ledger update and its divergence entry are one atomic step.

On a Redis Cluster the load follows the tags. Per-customer traffic (commits, outbox, ledger) spreads
over the ``shards`` slots ``{s0}`` … ``{sN-1}``, which the cluster spreads over its masters: give
``shards`` a few times the number of masters (16 shards on three masters land on all three). The
fixed tags are small and read-mostly (``{flags}``, ``{items}``, ``{ops}``), except ``{rl}``: every
Stripe write takes a rate-limit token there, one slot for the whole account, as Stripe's limit is
one for the whole account. Meter event records spread over 16 tags ``{m0}`` … ``{mf}``. The
channel has no tag: classic ``PUBLISH`` reaches every node of a cluster.

A new key takes the tag of whatever it is changed together with; a script or ``MULTI`` never spans
two tags (``tests/durability/test_cluster.py`` checks every name here).
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

__all__ = ["KeySpace", "ShardKeys", "claim_digest"]


def claim_digest(identifier: str) -> str:
    """The digest naming an identifier's claim record."""
    return hashlib.sha256(identifier.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """The keys of one shard (one hash slot)."""

    prefix: str
    shard: int

    @property
    def tag(self) -> str:
        """This shard's hash-tagged prefix."""
        return f"{self.prefix}:{{s{self.shard}}}"

    @property
    def outbox(self) -> str:
        """The outbox stream."""
        return f"{self.tag}:outbox"

    @property
    def retry(self) -> str:
        """The backoff schedule (sorted set scored by due time)."""
        return f"{self.tag}:retry"

    @property
    def dead(self) -> str:
        """The dead-letter stream."""
        return f"{self.tag}:dead"

    @property
    def retired(self) -> str:
        """The retired writes' stream: dead letters that are not failures, kept apart so that
        the dead stream's length counts failures only."""
        return f"{self.tag}:retired"

    @property
    def retired_moved(self) -> str:
        """Set to ``done`` once the retired letters written to the dead stream (before they had a
        stream of their own) were moved to it; ``moving`` (with a TTL) while a process moves
        them."""
        return f"{self.tag}:retired-moved"

    @property
    def divergence(self) -> str:
        """The divergence stream."""
        return f"{self.tag}:divergence"

    @property
    def ledger_index(self) -> str:
        """Sorted set of this shard's ledger hashes."""
        return f"{self.tag}:ledger-index"

    def ledger(self, period: str, customer: str, event_name: str) -> str:
        """The counters of one customer, event name and period."""
        return f"{self.tag}:ledger:{period}:{customer}:{event_name}"

    def rollup(self, first_day: int, last_day: int) -> str:
        """The copies of the ledger rows whose period runs from UTC day ``first_day`` to
        ``last_day`` (day numbers, both inclusive), for reading many rows at once."""
        return f"{self.tag}:rollup:{first_day}:{last_day}"

    @property
    def rollup_index(self) -> str:
        """Sorted set of this shard's rollup hashes (score: their first day)."""
        return f"{self.tag}:rollup-index"

    @property
    def rollup_ready(self) -> str:
        """Set once the ledger rows written before rollups existed are copied into them."""
        return f"{self.tag}:rollup-ready"

    @property
    def guard_changed(self) -> str:
        """The customers whose ledger rows changed since the guard last took them (written by
        every ledger-writing script, in ``ledger_rollup``)."""
        return f"{self.tag}:guard-changed"

    @property
    def guard_taking(self) -> str:
        """The changed customers a guard pass took and is judging: cleared when the pass ends, so
        a pass that fails leaves them for the next one."""
        return f"{self.tag}:guard-taking"

    @property
    def customer_rows(self) -> str:
        """Per customer, its ledger rows (``<period>|<event name>``, one a line), so the guard reads
        one customer's rows without reading the whole ledger index."""
        return f"{self.tag}:customer-rows"

    @property
    def customer_rows_ready(self) -> str:
        """Set once the ledger rows written before ``customer_rows`` existed are listed in it."""
        return f"{self.tag}:customer-rows-ready"

    @property
    def reconciliation_index(self) -> str:
        """Sorted set of this shard's reconciliation records."""
        return f"{self.tag}:recon-index"

    def reconciliation(self, period: str, customer: str, event_name: str) -> str:
        """The last reconciliation of one customer, event name and period with Stripe."""
        return f"{self.tag}:recon:{period}:{customer}:{event_name}"

    def reconciliation_rollup(self, first_day: int, last_day: int) -> str:
        """JSON copies of the reconciliation records whose period runs from UTC day ``first_day``
        to ``last_day``, for reading many at once."""
        return f"{self.tag}:recon-rollup:{first_day}:{last_day}"

    @property
    def reconciliation_rollup_index(self) -> str:
        """Sorted set of this shard's reconciliation rollups (score: their first day)."""
        return f"{self.tag}:recon-rollup-index"

    @property
    def reconciliation_rollup_ready(self) -> str:
        """Set once the reconciliation records saved before rollups existed are copied in."""
        return f"{self.tag}:recon-rollup-ready"

    def idempotency(self, identifier: str) -> str:
        """The record (claim) of one identifier (hashed: identifiers are caller-chosen and
        unbounded)."""
        return self.claim_record(claim_digest(identifier))

    def claim_record(self, digest: str) -> str:
        """The claim record named by its digest (``claim_digest``)."""
        return f"{self.tag}:idem:{digest}"

    @property
    def claims(self) -> str:
        """Claims not yet committed, scored by when the workers re-drive them (members:
        ``<digest>|<customer>|<event name>``)."""
        return f"{self.tag}:claims"

    def late_marker(self, meter_identifier: str) -> str:
        """Set once a meter event is marked as refused late (a second report changes nothing)."""
        return f"{self.tag}:late:{meter_identifier}"

    def meter_turn(self, customer: str, event_name: str) -> str:
        """The lease on the one meter call allowed in flight for a customer and meter."""
        return f"{self.tag}:turn:{customer}:{event_name}"

    def backfill_marker(self, identifier: str) -> str:
        """Set once a backfilled meter event is counted in the ledger (a rerun counts nothing)."""
        return f"{self.tag}:backfill:{identifier}"

    @property
    def marker(self) -> str:
        """The data-loss marker of this shard's slot (``dualwrite.durability``)."""
        return f"{self.tag}:marker"

    def set_value(self, subscription_item: str, timestamp: int) -> str:
        """The last quantity ``set`` on an item at one timestamp (for ``set`` translation), the
        order of the sets there, and who may write one now."""
        return f"{self.tag}:set:{subscription_item}:{timestamp}"


@dataclass(frozen=True, slots=True)
class KeySpace:
    """All of dualwrite's keys under one prefix."""

    prefix: str
    shards: int = 1

    def shard_of(self, customer: str) -> int:
        """The shard a customer's keys live in (stable: crc32 of the customer id)."""
        return zlib.crc32(customer.encode()) % self.shards

    def for_customer(self, customer: str) -> ShardKeys:
        """The keys of the shard holding ``customer``."""
        return ShardKeys(self.prefix, self.shard_of(customer))

    def shard(self, index: int) -> ShardKeys:
        """The keys of shard ``index``."""
        return ShardKeys(self.prefix, index)

    def all_shards(self) -> list[ShardKeys]:
        """Every shard, in order."""
        return [ShardKeys(self.prefix, index) for index in range(self.shards)]

    def tracked_meter_event(self, meter_identifier: str) -> str:
        """A meter event dualwrite wrote, by its identifier (spread over 16 slots by its last
        character, a hex digit of its digest)."""
        return f"{self.prefix}:{{m{meter_identifier[-1:]}}}:mev:{meter_identifier}"

    @property
    def backpressure(self) -> str:
        """Counts of rate-limit waits and of writes held back, per limit, for the report."""
        return f"{self.prefix}:{{rl}}:backpressure"

    def rate_limit(self, path: str) -> str:
        """The shared state of one Stripe rate limit."""
        return f"{self.prefix}:{{rl}}:{path}"

    @property
    def flags_config(self) -> str:
        """Global flag settings."""
        return f"{self.prefix}:{{flags}}:config"

    @property
    def flags_override(self) -> str:
        """Per-customer overrides."""
        return f"{self.prefix}:{{flags}}:override"

    @property
    def flags_schedule(self) -> str:
        """Per-customer scheduled stages."""
        return f"{self.prefix}:{{flags}}:schedule"

    @property
    def flags_billing(self) -> str:
        """Per customer: the Stripe test clock its subscription lives on, and when its item moves
        (moved) to the meter-backed price (``dualwrite.flags``)."""
        return f"{self.prefix}:{{flags}}:billing"

    @property
    def flags_audit(self) -> str:
        """The audit stream of flag changes."""
        return f"{self.prefix}:{{flags}}:audit"

    @property
    def ops_audit(self) -> str:
        """The audit stream of operations (``meters apply``, ``backfill``)."""
        return f"{self.prefix}:{{ops}}:audit"

    @property
    def guard_state(self) -> str:
        """Per customer, the stage the guard last rolled it back to and the divergence then."""
        return f"{self.prefix}:{{flags}}:guard"

    @property
    def guard_lease(self) -> str:
        """Held for one guard interval by the worker that runs that interval's pass."""
        return f"{self.prefix}:{{flags}}:guard-lease"

    @property
    def guard_sweep(self) -> str:
        """The guard's last full pass: when (``at``), how many customers it checked
        (``checked``), and the flags' configuration it saw (``flags``)."""
        return f"{self.prefix}:{{flags}}:guard-sweep"

    @property
    def flags_marker(self) -> str:
        """The data-loss marker of the flags' slot (``dualwrite.durability``)."""
        return f"{self.prefix}:{{flags}}:marker"

    @property
    def flags_channel(self) -> str:
        """The pub/sub channel announcing flag changes."""
        return f"{self.prefix}:flags:changed"

    def item_periods(self, subscription_item: str) -> str:
        """An item's current billing period and interval, read from Stripe (ledger periods)."""
        return f"{self.prefix}:{{items}}:period:{subscription_item}"

    def customer_periods(self, customer: str) -> str:
        """The billing period and anchor of the customer's last item read (a fallback for its
        other items when Stripe cannot be read)."""
        return f"{self.prefix}:{{items}}:customer-period:{customer}"

    def item_mapping(self, subscription_item: str) -> str:
        """The proxy's cached mapping of one subscription item (never a key or a secret)."""
        return f"{self.prefix}:{{items}}:map:{subscription_item}"

    @property
    def items_unmapped(self) -> str:
        """The proxy's count of usage requests it forwarded without a mapping, per item."""
        return f"{self.prefix}:{{items}}:unmapped"
