"""What ``dualwrite demo`` prints at the end, in 80 columns: the faults it injected and the retries
that absorbed them, the requests it sent, each customer's ledger against Stripe's own totals with
its invoice difference, and what to try next; and ``DemoResult``, what the demo did and found
(the data printed; ``dualwrite.demo`` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from dualwrite.models import Stage
from dualwrite.pricing import format_amount
from dualwrite.reconcile import MoneyCheck
from dualwrite.report import Report

__all__ = ["DEMO_PREFIX", "DemoCustomer", "DemoResult", "print_summary"]

#: The key prefix the demo works under (``dualwrite.demo`` re-exports it).
DEMO_PREFIX = "dualwrite-demo"


@dataclass(slots=True)
class DemoCustomer:
    """A demo customer: its Stripe ids and the stage it is put at."""

    customer: str
    subscription_item: str
    stage: Stage


@dataclass(slots=True)
class DemoResult:
    """What the demo did and found (used by the tests)."""

    report: Report
    customers: list[DemoCustomer]
    stripe_legacy: dict[str, int] = field(default_factory=dict)
    stripe_meter: dict[str, int] = field(default_factory=dict)
    caller_errors: int = 0
    requests: int = 0
    """Usage requests sent (each counted once, however often the client retried it)."""
    caller_retries: int = 0
    """Retries the client made (same Idempotency-Key) after a retryable answer."""
    faults: dict[str, int] = field(default_factory=dict)
    """Faults the stand-in injected, by kind (``refused``: permanent refusals)."""
    write_calls: int = 0
    """Usage-record and meter-event calls Stripe (the stand-in) received, retries included."""
    writes: int = 0
    """Distinct writes among them (one per Idempotency-Key and path)."""
    redis_url: str = ""
    money: dict[str, MoneyCheck] = field(default_factory=dict)
    """Each customer's invoices on the two paths (``reconcile --money``)."""


def _invoice_cell(money: MoneyCheck | None) -> str:
    """A customer's invoice difference (meter minus legacy), in cents, for the last table."""
    if money is None or money.skipped == "one_leg":
        return "[dim]one leg[/]"
    if money.skipped is not None or money.currency is None or money.difference is None:
        return f"[dim]{money.skipped or 'not priced'}[/]"
    text = format_amount(money.difference, money.currency, signed=bool(money.difference))
    return f"[bold red]{text}[/]" if money.difference else f"[green]{text}[/]"


def print_summary(console: Console, result: DemoResult) -> None:
    """What happened, in 80 columns: faults and retries, the requests, one table per customer
    (ledger against Stripe's own totals, and the invoice difference), what to try next."""
    transient = {kind: count for kind, count in result.faults.items() if kind != "refused"}
    kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(transient.items()))
    console.print()
    retries = result.write_calls - result.writes
    console.print(
        f"Faults: the stand-in injected {sum(transient.values())} transient fault(s)"
        f"{f' ({kinds})' if kinds else ''} and {result.faults.get('refused', 0)} refusal(s). "
        f"Retries absorbed the transient ones: Stripe received {result.write_calls} write "
        f"call(s) for {result.writes} write(s) ({retries} retries with the same "
        f"Idempotency-Key: {result.caller_retries} by the client, the rest by dualwrite), so "
        "nothing was lost or counted twice.",
        highlight=False,
    )
    recorded = result.requests - result.caller_errors
    console.print(
        f"Requests: {result.requests} usage requests sent, {recorded} recorded, "
        f"{result.caller_errors} usage request(s) were refused to the caller (the injected "
        "authoritative refusals).",
        highlight=False,
    )
    console.print()
    check = Table(
        title="cross-check with Stripe's own totals (the stand-in)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        caption="legacy, meter: the ledger's accepted total = Stripe's own; invoice: meter "
        "price minus legacy price on each leg's total (reconcile --money)",
        caption_justify="left",
    )
    check.add_column("customer", no_wrap=True)
    check.add_column("stage", no_wrap=True)
    check.add_column("legacy", justify="right", no_wrap=True)
    check.add_column("meter", justify="right", no_wrap=True)
    check.add_column("status", no_wrap=True)
    check.add_column("invoice difference", justify="right")
    rows: dict[str, Any] = {row.customer: row for row in result.report.customers}
    for customer in result.customers:
        row = rows.get(customer.customer)
        check.add_row(
            customer.customer,
            customer.stage.value,
            _agreement(row.legacy.accepted_qty if row else 0, result.stripe_legacy, customer),
            _agreement(row.meter.accepted_qty if row else 0, result.stripe_meter, customer),
            row.status if row else "",
            _invoice_cell(result.money.get(customer.customer)),
        )
    console.print(check)
    console.print(
        f"{result.report.divergent_customers} customer(s) diverged (the injected refusals of "
        "shadow writes): their invoice difference is what those writes would have billed.",
        highlight=False,
    )
    _next_steps(console, result)


def _agreement(ledger: int, stripe_totals: dict[str, int], customer: DemoCustomer) -> str:
    """``ledger = Stripe`` in green, or both in red with NO when they differ."""
    held = stripe_totals.get(customer.customer, 0)
    if ledger == held:
        return f"[green]{ledger}={held}[/]"
    return f"[bold red]{ledger}!={held} NO[/]"


def _next_steps(console: Console, result: DemoResult) -> None:
    console.print()
    console.print("Try next:", style="bold")
    if result.redis_url.startswith("unix://"):
        console.print("  (the embedded Redis is gone with the demo: start Redis, for example")
        console.print("  redis-server --daemonize yes, and run the demo again to keep its data)")
    prefix = f"DUALWRITE_REDIS__KEY_PREFIX={DEMO_PREFIX}"
    for command, what in (
        (f"{prefix} dualwrite report", "the report in the terminal"),
        (f"{prefix} dualwrite report --web", "the report page on the demo's data"),
        ("dualwrite config init", "a config file with every key, to start your own"),
    ):
        console.print(f"  {command}", highlight=False, soft_wrap=False)
        console.print(f"      {what}", style="dim", highlight=False)
    console.print('  README, "The proxy in five minutes"', highlight=False)
    console.print(
        "      the proxy, for apps in any language (stripe-standin, then serve)",
        style="dim",
        highlight=False,
    )
