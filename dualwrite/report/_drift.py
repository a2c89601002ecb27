"""Reconciliation drift per customer: the records ``dualwrite reconcile`` stored, summed for the
report.

Records come as their rollup fields (``dualwrite.reconcile.ROLLUP_FIELDS``, strings): a report over
100,000 reconciled customers sums them without building a model per record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from dualwrite.ledger import collector_paused
from dualwrite.report._models import CustomerDrift, CustomerMoney, LegDrift, trusted

__all__ = ["customer_drifts"]

_KEYS = {
    leg: (f"{leg}_skipped", f"{leg}_stripe_qty", f"{leg}_expected_qty", f"{leg}_accepted_qty")
    for leg in ("legacy", "meter")
}


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _leg(leg: str, records: list[Mapping[str, str]]) -> LegDrift:
    skipped_key, stripe_key, expected_key, accepted_key = _KEYS[leg]
    skipped: dict[str, int] = {}
    compared = 0
    stripe_qty: int | float = 0
    expected = accepted = 0
    for fields in records:
        reason = fields.get(skipped_key)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        stripe = fields.get(stripe_key)
        if stripe:
            compared += 1
            stripe_qty += _number(stripe)
            expected += int(fields.get(expected_key) or 0)
            accepted += int(fields.get(accepted_key) or 0)
    return trusted(
        LegDrift,
        {
            "compared": compared,
            "stripe_qty": stripe_qty if compared else None,
            "expected_qty": expected,
            "accepted_qty": accepted,
            "drift": stripe_qty - accepted if compared else None,
            "intended_drift": stripe_qty - expected if compared else None,
            "skipped": dict(sorted(skipped.items())),
        },
    )


def _money(records: list[Mapping[str, str]]) -> CustomerMoney | None:
    """The money of the records priced with ``reconcile --money`` (None: none was)."""
    priced: list[tuple[str, int, int]] = []
    skipped: dict[str, int] = {}
    preview_disagrees = 0
    for fields in records:
        reason = fields.get("money_skipped")
        legacy, meter = fields.get("money_legacy_amount"), fields.get("money_meter_amount")
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        elif legacy and meter:
            priced.append((fields.get("money_currency") or "", int(legacy), int(meter)))
            previews = (
                fields.get("money_preview_legacy_amount"),
                fields.get("money_preview_meter_amount"),
            )
            if any(previews) and previews != (legacy, meter):
                preview_disagrees += 1
    if not priced and not skipped:
        return None
    differences = [meter - legacy for _, legacy, meter in priced]
    currencies = {currency for currency, _, _ in priced}
    single = len(currencies) == 1
    return CustomerMoney(
        priced=len(priced),
        currency=(next(iter(currencies)) if single else "mixed") if priced else None,
        legacy_amount=sum(legacy for _, legacy, _ in priced) if single else None,
        meter_amount=sum(meter for _, _, meter in priced) if single else None,
        difference=sum(differences) if single else None,
        largest_difference=max(differences, key=abs) if differences else None,
        differing=sum(1 for difference in differences if difference),
        currency_differs=skipped.get("currency_differs", 0),
        preview_disagrees=preview_disagrees,
        skipped=dict(sorted(skipped.items())),
    )


def customer_drifts(records: Iterable[Mapping[str, str]]) -> dict[str, CustomerDrift]:
    """Each reconciled customer's drift, summed over its records (periods and meter event names)."""
    by_customer: dict[str, list[Mapping[str, str]]] = {}
    with collector_paused():
        for fields in records:
            by_customer.setdefault(fields.get("customer", ""), []).append(fields)
        return {
            customer: trusted(
                CustomerDrift,
                {
                    "checked_at": max(float(fields.get("checked_at") or 0) for fields in mine),
                    "records": len(mine),
                    "legacy": _leg("legacy", mine),
                    "meter": _leg("meter", mine),
                    "money": _money(mine),
                },
            )
            for customer, mine in by_customer.items()
        }
