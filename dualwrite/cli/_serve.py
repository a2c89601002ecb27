"""``dualwrite demo``, ``dualwrite stripe-standin`` and ``dualwrite serve``: things that run."""

from __future__ import annotations

from typing import Annotated

import typer

from dualwrite.cli._common import SERVE, ConfigPath, app, console, load_settings, run_async


@app.command("demo", rich_help_panel=SERVE)
def demo(
    ctx: typer.Context,
    customers: Annotated[int, typer.Option(min=1, max=200, help="Customers per stage.")] = 3,
    events: Annotated[
        int,
        typer.Option(
            min=1, max=100_000, help="Usage requests to send (and 2 Stripe refuses on purpose)."
        ),
    ] = 400,
    seed: Annotated[int, typer.Option(help="Seed for traffic and injected faults.")] = 7,
) -> None:
    """Run the whole dual write on an embedded default: Redis, a local Stripe stand-in, traffic for
    customers in every stage, injected refusals, then the report."""
    # deferred: start-up cost
    from dualwrite.demo import DemoOptions, run_demo

    settings = load_settings(ctx)
    options = DemoOptions(customers_per_stage=customers, events=events, seed=seed)
    run_async(run_demo(settings, options, console=console))


@app.command("stripe-standin", rich_help_panel=SERVE)
def stripe_standin(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 12111,
    seed: Annotated[int, typer.Option(help="Seed for injected faults.")] = 0,
) -> None:
    """Serve the local Stripe stand-in (usage records, meters, meter events) for tests and demos."""
    from stripe_standin import StripeStandin, run_standin

    console.print(
        f"Stripe stand-in on http://{host}:{port} (any sk_test_ key; /_standin/ controls)"
    )
    run_standin(StripeStandin(seed=seed), host, port)


# ----------------------------------------------------------------------------------------- proxy


@app.command("serve", rich_help_panel=SERVE)
def serve(
    ctx: typer.Context,
    config: ConfigPath = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, help="Largest request body forwarded (413 above).")
    ] = 16 * 1024 * 1024,
    access_log: Annotated[bool, typer.Option(help="Log one line per request.")] = True,
) -> None:
    """Serve the Stripe proxy: point any Stripe SDK's API base here; usage records are dual-written,
    everything else goes to Stripe untouched. The outbox worker runs inside; SIGTERM stops it
    gracefully."""
    # deferred: start-up cost
    from dualwrite.proxy import run_proxy

    if config is not None:
        ctx.obj = config
    settings = load_settings(ctx)
    console.print(
        f"dualwrite proxy on http://{host}:{port}, forwarding to {settings.stripe.api_base} "
        "(probes: /_dualwrite/live, /_dualwrite/ready; detail: /_dualwrite/health)",
        highlight=False,
    )
    run_proxy(settings, host=host, port=port, access_log=access_log, max_body_bytes=max_body_bytes)
