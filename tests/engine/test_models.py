"""The values crossing dualwrite's boundaries (stages, usage events, outcomes) and key redaction."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from dualwrite.models import (
    MAX_METER_VALUE,
    EventPlan,
    Leg,
    RecordOutcome,
    Stage,
    StagePlan,
    StripeFailure,
    UsageEvent,
    WriteResult,
    mint_identifier,
    plan_for,
    utc_day,
)
from dualwrite.redaction import mask_key, redact

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z


def event(**changes: object) -> UsageEvent:
    """A valid usage event, with ``changes`` applied (validated)."""
    data: dict[str, object] = {
        "identifier": "order-42",
        "customer": "cus_123",
        "event_name": "api_requests",
        "subscription_item": "si_456",
        "quantity": 5,
        "timestamp": NOW,
    }
    data.update(changes)
    return UsageEvent.model_validate(data)


class TestStage:
    """The four stages of DESIGN.md, in migration order, and the legs each writes."""

    def test_order(self):
        """legacy → shadow → primary → meter, ranked 0 to 3."""
        assert list(Stage) == [Stage.LEGACY, Stage.SHADOW, Stage.PRIMARY, Stage.METER]
        assert [stage.rank for stage in Stage] == [0, 1, 2, 3]
        assert sorted(Stage, key=lambda stage: stage.rank, reverse=True)[0] is Stage.METER

    def test_values_are_the_flag_names(self):
        """A stage is its lowercase name, as stored in Redis and typed in the CLI."""
        assert [stage.value for stage in Stage] == ["legacy", "shadow", "primary", "meter"]
        assert Stage("primary") is Stage.PRIMARY
        with pytest.raises(ValueError, match="beta"):
            Stage("beta")

    @pytest.mark.parametrize(
        ("stage", "authoritative", "shadow"),
        [
            (Stage.LEGACY, Leg.LEGACY, None),
            (Stage.SHADOW, Leg.LEGACY, Leg.METER),
            (Stage.PRIMARY, Leg.METER, Leg.LEGACY),
            (Stage.METER, Leg.METER, None),
        ],
    )
    def test_plan_for(self, stage, authoritative, shadow):
        """DESIGN.md's table: which leg is authoritative and which the shadow."""
        assert plan_for(stage) == StagePlan(authoritative=authoritative, shadow=shadow)

    def test_shadow_is_never_the_authoritative_leg(self):
        """No stage writes one leg twice."""
        for stage in Stage:
            plan = plan_for(stage)
            assert plan.shadow is not plan.authoritative


class TestUsageEventValidation:
    """A UsageEvent accepts what Stripe accepts and refuses the rest at construction."""

    def test_valid_event(self):
        """A plain event keeps its values and defaults to increment, minted, request."""
        usage = event()
        assert usage.quantity == 5 and usage.action == "increment"
        assert usage.identifier_source == "minted" and usage.timestamp_source == "request"

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("customer", "cus 123"),
            ("customer", "cus/123"),
            ("customer", ""),
            ("customer", "c" * 256),
            ("event_name", "api requests"),
            ("event_name", "e" * 101),
            ("subscription_item", "si 456"),
            ("subscription_item", ""),
            ("identifier", ""),
            ("identifier", "i" * 256),
            ("identifier", "line\nbreak"),
            ("quantity", -1),
            ("quantity", MAX_METER_VALUE + 1),
            ("quantity", 1.5),
            ("timestamp", 0),
            ("timestamp", 2**40),
            ("action", "decrement"),
            ("identifier_source", "guessed"),
            ("timestamp_source", "later"),
        ],
    )
    def test_refused_values(self, field, value):
        """Each malformed field is a ValidationError located at that field."""
        with pytest.raises(ValidationError) as info:
            event(**{field: value})
        assert [error["loc"] for error in info.value.errors()] == [(field,)]

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("customer", "c" * 255),
            ("event_name", "api.requests:v2-beta_1"),
            ("event_name", "e" * 100),
            ("identifier", "i" * 255),
            ("identifier", "Any printable text: é, ✓ & spaces"),
            ("quantity", 0),
            ("quantity", MAX_METER_VALUE),
            ("timestamp", 2**40 - 1),
            ("subscription_item", None),
            ("action", "set"),
        ],
    )
    def test_bounds_are_inclusive(self, field, value):
        """The limits themselves are accepted."""
        assert getattr(event(**{field: value}), field) == value

    def test_max_meter_value_has_fifteen_digits(self):
        """Stripe refuses meter values with more than 15 significant digits."""
        assert len(str(MAX_METER_VALUE)) == 15 and MAX_METER_VALUE == 999_999_999_999_999

    def test_unknown_field_is_refused(self):
        """Extra fields are refused, not silently dropped."""
        with pytest.raises(ValidationError, match="extra"):
            event(colour="blue")

    def test_frozen(self):
        """An event is fixed once built."""
        usage = event()
        with pytest.raises(ValidationError):
            usage.quantity = 6  # type: ignore[misc]

    def test_period_is_the_utc_day(self):
        """The ledger period is the event's UTC day."""
        assert event(timestamp=NOW).period == "2026-01-01"
        assert event(timestamp=NOW - 1).period == "2025-12-31"
        assert utc_day(NOW + 86399) == "2026-01-01"


class TestKeys:
    """Idempotency keys and meter identifiers are deterministic, distinct per leg, and short."""

    def test_idempotency_keys_differ_per_leg(self):
        """Stripe refuses a key reused on another endpoint: each leg gets its own."""
        usage = event()
        assert usage.idempotency_key(Leg.LEGACY) != usage.idempotency_key(Leg.METER)

    def test_idempotency_keys_are_deterministic(self):
        """The same identifier always gives the same keys (retries and the outbox reuse them)."""
        first, again = event(), event(quantity=9, timestamp=NOW + 60)
        for leg in Leg:
            assert first.idempotency_key(leg) == again.idempotency_key(leg)

    def test_idempotency_keys_differ_per_identifier(self):
        """Another identifier gives other keys."""
        assert event(identifier="a").idempotency_key(Leg.METER) != event(
            identifier="b"
        ).idempotency_key(Leg.METER)

    def test_keys_fit_stripe_limits_for_the_longest_identifier(self):
        """A 255-character identifier still gives keys ≤ 255 chars and a meter identifier ≤ 100."""
        usage = event(identifier="x" * 255)
        for leg in Leg:
            assert len(usage.idempotency_key(leg)) <= 255
        assert len(usage.meter_identifier) <= 100
        assert all(ch.isascii() and ch.isprintable() for ch in usage.meter_identifier)

    def test_non_ascii_identifier_gives_ascii_keys(self):
        """Keys are digests: any printable identifier maps to a plain ASCII key."""
        usage = event(identifier="commande-é-✓")
        for leg in Leg:
            assert usage.idempotency_key(leg).isascii()

    def test_meter_identifier_is_deterministic(self):
        """The meter event identifier depends on the event's identifier only."""
        assert event().meter_identifier == event(quantity=7).meter_identifier
        assert event(identifier="a").meter_identifier != event(identifier="b").meter_identifier
        assert event().meter_identifier not in {event().idempotency_key(leg) for leg in Leg}

    def test_minted_identifiers_are_unique(self):
        """A minted identifier is new every time."""
        minted = {mint_identifier() for _ in range(100)}
        assert len(minted) == 100 and all(value.startswith("dwev_") for value in minted)


class TestEventPlans:
    """An event's plan, shared per stage on the request path."""

    @pytest.mark.parametrize("stage", list(Stage))
    def test_a_stage_plan_equals_one_built_afresh(self, stage):
        """The shared plan of a stage is the one its legs give, and its legs are the stage's."""
        legs = plan_for(stage)
        fresh = EventPlan(stage=stage, authoritative=legs.authoritative, shadow=legs.shadow)
        assert EventPlan.at(stage) == fresh
        assert EventPlan.at(stage).legs == legs
        assert EventPlan.model_validate_json(fresh.model_dump_json()).legs == legs

    def test_fields_give_a_plan_of_their_own(self):
        """A plan with the proxy's key is a new value; the shared one is left as it was."""
        keyed = EventPlan.at(Stage.LEGACY, legacy_key="caller-key")
        assert keyed.legacy_key == "caller-key"
        assert EventPlan.at(Stage.LEGACY).legacy_key is None


class TestFingerprint:
    """The fingerprint says whether a reused identifier carries the same usage."""

    def test_ignores_the_identifier(self):
        """Two events differing only in identifier (and its source) have one fingerprint."""
        assert (
            event(identifier="a").fingerprint()
            == event(identifier="b", identifier_source="idempotency_key").fingerprint()
        )

    def test_ignores_an_intercept_timestamp(self):
        """A "now" fixed at intercept is left out: a later retry is the same usage."""
        first = event(timestamp_source="intercept")
        retry = event(timestamp_source="intercept", timestamp=NOW + 30)
        assert first.fingerprint() == retry.fingerprint()

    def test_keeps_a_request_timestamp(self):
        """A timestamp the caller gave is part of the usage."""
        assert event(timestamp=NOW).fingerprint() != event(timestamp=NOW + 30).fingerprint()

    @pytest.mark.parametrize(
        "change",
        [
            {"quantity": 6},
            {"customer": "cus_999"},
            {"event_name": "other"},
            {"subscription_item": "si_999"},
            {"subscription_item": None},
            {"action": "set"},
        ],
    )
    def test_changes_with_the_usage(self, change):
        """Any other field changes the fingerprint."""
        assert event(**change).fingerprint() != event().fingerprint()

    def test_is_stable(self):
        """Built twice from the same values, the fingerprint is the same (no per-process salt)."""
        assert event().fingerprint() == event().fingerprint()
        assert len(event().fingerprint()) == 40

    @pytest.mark.parametrize(
        "values",
        [
            {},
            {"subscription_item": None, "identifier_source": "idempotency_key"},
            {"action": "set", "timestamp_source": "intercept"},
        ],
    )
    def test_matches_records_already_written(self, values):
        """Records written before keep matching: the digest of the usage fields' JSON as
        ``model_dump`` gives them (built from the fields directly on the request path)."""
        usage = event(**values)
        excluded = {"identifier", "identifier_source", "timestamp_source"}
        if usage.timestamp_source == "intercept":
            excluded.add("timestamp")
        dumped = json.dumps(usage.model_dump(exclude=excluded), sort_keys=True)
        assert usage.fingerprint() == hashlib.sha256(dumped.encode()).hexdigest()[:40]


class TestOutcomes:
    """Write results and outcomes: what the caller is told."""

    def test_error_body_is_stripes_shape(self):
        """A failure turns back into Stripe's error JSON, optional fields only when set."""
        failure = StripeFailure(
            http_status=400,
            type="invalid_request_error",
            code="parameter_invalid",
            message="bad quantity",
            param="quantity",
        )
        assert failure.error_body() == {
            "error": {
                "type": "invalid_request_error",
                "message": "bad quantity",
                "code": "parameter_invalid",
                "param": "quantity",
            }
        }
        assert StripeFailure(message="boom").error_body() == {
            "error": {"type": "api_error", "message": "boom"}
        }

    def test_outcome_is_accepted_when_the_authoritative_write_was(self):
        """RecordOutcome.accepted is the authoritative result, whatever the shadow."""
        accepted = WriteResult(leg=Leg.LEGACY, accepted=True, stripe_id="mbur_1")
        refused = WriteResult(leg=Leg.LEGACY, accepted=False, failure=StripeFailure())
        common = {"event": event(), "stage": Stage.SHADOW, "shadow_leg": Leg.METER}
        assert RecordOutcome(authoritative=accepted, shadow_status="enqueued", **common).accepted
        assert not RecordOutcome(authoritative=refused, shadow_status="skipped", **common).accepted

    def test_outcome_round_trips_through_json(self):
        """Outcomes are stored as JSON (idempotent replays): they read back equal."""
        outcome = RecordOutcome(
            event=event(),
            stage=Stage.PRIMARY,
            authoritative=WriteResult(leg=Leg.METER, accepted=True, value=5, response={"a": 1}),
            shadow_leg=Leg.LEGACY,
            shadow_status="enqueued",
        )
        assert RecordOutcome.model_validate_json(outcome.model_dump_json()) == outcome


KEYS = {
    "secret test": ("sk_test_51HxYzAbCdEfGhIjKl1234", "sk_test_****1234"),
    "secret live": ("sk_live_51HxYzAbCdEfGhIjKl5678", "sk_live_****5678"),
    "restricted live": ("rk_live_51AbCdEfGhIj9012", "rk_live_****9012"),
    "restricted test": ("rk_test_51AbCdEfGhIj3456", "rk_test_****3456"),
    "publishable live": ("pk_live_51AbCdEfGhIj7890", "pk_live_****7890"),
    "publishable test": ("pk_test_51AbCdEfGhIjx1y2", "pk_test_****x1y2"),
    "webhook secret": ("whsec_AbCdEfGhIjKlMnOp4321", "whsec_****4321"),
    "ephemeral": ("ek_test_YWNjdF8xMk5jdGVzdA8765", "ek_test_****8765"),
}


class TestRedaction:
    """Stripe keys are masked to their kind and last four characters; other text is left alone."""

    @pytest.mark.parametrize(("key", "masked"), KEYS.values(), ids=KEYS.keys())
    def test_mask_key(self, key, masked):
        """mask_key keeps the key's kind and its last four characters."""
        assert mask_key(key) == masked

    @pytest.mark.parametrize(("key", "masked"), KEYS.values(), ids=KEYS.keys())
    def test_redact_in_text(self, key, masked):
        """Every key inside text is masked, wherever it stands."""
        text = f'Authorization: Bearer {key}\n{{"api_key": "{key}"}} and ({key}).'
        redacted = redact(text)
        assert key not in redacted
        assert redacted == text.replace(key, masked)

    def test_mask_key_of_something_else(self):
        """A value that is not a key is hidden entirely."""
        assert mask_key("hunter2") == "****"
        assert mask_key("") == "****"

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "no secrets here",
            "ask_question and task_test_1234 are words, not keys",
            "cus_123 si_456 mbur_789 dw-legacy-0123abcd",
            "sk_test_ab (too short to be a key)",
        ],
    )
    def test_text_without_keys_is_unchanged(self, text):
        """Text without keys comes back as it was."""
        assert redact(text) == text

    def test_redact_is_idempotent(self):
        """Redacting twice changes nothing more."""
        once = redact(f"key {KEYS['secret live'][0]}")
        assert redact(once) == once
