"""What the proxy costs non-usage traffic: the same Stripe call, straight to the upstream and
through ``dualwrite serve``, in one run.

Three kinds of process, all on loopback:

* the Stripe stand-in (uvicorn, no access log), optionally with a fixed latency per reply;
* the proxy (``run_proxy``: uvicorn, the app, its Redis engine and outbox worker), forwarding to it;
* a load generator: N keep-alive connections, each sending ``GET /v1/customers/{id}`` in a closed
  loop for a fixed time (a minimal HTTP/1.1 client on asyncio streams, so that the generator
  itself costs as little CPU as possible), reporting requests/s and latency percentiles.

Runs alternate direct and proxied, so drift (thermal, other load) hits both alike. Each profile
(concurrency level) prints the median and the spread over the runs, the proxy/direct ratio, and the
proxy process's CPU per forwarded call (from ``/proc``). The load generator is ``bench/_load.py``.

    python bench/proxy_overhead.py                     # 5 runs x 3 s, concurrency 1 and 16
    python bench/proxy_overhead.py --runs 7 --seconds 5 --concurrency 1,8,32 --latency-ms 20

It needs Redis (``REDIS_URL``, default redis://127.0.0.1:6379/0); its keys live under a fresh
prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import uuid
from typing import Any

from _load import (
    WARMUP_SECONDS,
    child,
    cleanup,
    cpu_seconds,
    free_port,
    http_request,
    measure,
    summary,
)
from _scenario import KEY, run_standin

# ------------------------------------------------------------------------------ child processes


def run_proxy_child(port: int, upstream: str, prefix: str) -> None:
    """Child: the proxy, as ``dualwrite serve --no-access-log`` runs it."""
    from dualwrite.config import Settings
    from dualwrite.proxy import run_proxy

    settings = Settings(
        redis={
            "url": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            "key_prefix": prefix,
        },
        stripe={"api_base": upstream},
    )
    run_proxy(settings, host="127.0.0.1", port=port, access_log=False)


def _make_customer(standin_url: str) -> str:
    import stripe

    client = stripe.StripeClient(KEY, base_addresses={"api": standin_url})
    return str(client.v1.customers.create({"name": "Bench"}).id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="stand-in delay per reply")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    options = parser.parse_args()
    levels = [int(level) for level in options.concurrency.split(",")]

    env = dict(os.environ, STRIPE_API_KEY=KEY)
    prefix = f"dwbench-{uuid.uuid4().hex[:8]}"
    standin_port, proxy_port = free_port(), free_port()
    latency = str(options.latency_ms / 1000)
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    try:
        with (
            child(
                [__file__, "_standin", str(standin_port), latency],
                what="stand-in",
                env=env,
                port=standin_port,
            ),
            child(
                [__file__, "_proxy", str(proxy_port), f"http://127.0.0.1:{standin_port}", prefix],
                what="proxy",
                env=env,
                port=proxy_port,
            ) as proxy_process,
        ):
            direct, proxy = f"http://127.0.0.1:{standin_port}", f"http://127.0.0.1:{proxy_port}"
            path = f"/v1/customers/{_make_customer(direct)}"
            headers = [
                ("Authorization", f"Bearer {KEY}"),
                ("Stripe-Version", "2025-02-24.acacia"),
                ("User-Agent", "dualwrite-bench"),
            ]
            for level in levels:
                results[level] = {"direct": [], "proxy": []}
                for run in range(options.runs):
                    order = [("direct", direct), ("proxy", proxy)]
                    for name, url in order if run % 2 == 0 else order[::-1]:
                        request = http_request("GET", url, path, headers=headers)
                        before = cpu_seconds(proxy_process.pid)
                        result = measure(url, request, seconds=options.seconds, concurrency=level)
                        if name == "proxy":
                            # Warm-up requests included: CPU over every request the run sent.
                            sent = result["requests"] * (1 + WARMUP_SECONDS / options.seconds)
                            used = cpu_seconds(proxy_process.pid) - before
                            result["cpu_ms_per_call"] = used / sent * 1000
                        results[level][name].append(result)
    finally:
        cleanup(prefix)

    if options.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"GET /v1/customers/{{id}}, {options.runs} runs x {options.seconds:g} s per target, "
        f"stand-in latency {options.latency_ms:g} ms, {os.cpu_count()} CPUs "
        "(load generator, proxy and stand-in share them)"
    )
    for level, by_target in results.items():
        print(
            f"\nconcurrency {level:<4}  req/s median [min..max]"
            "     p50 ms [min..max]       p99 ms [min..max]"
        )
        for name in ("direct", "proxy"):
            runs = by_target[name]
            errors = sum(run["errors"] for run in runs)
            print(
                f"  {'direct' if name == 'direct' else 'via proxy':10}"
                f"{summary([r['rps'] for r in runs], 0):>20}   "
                f"{summary([r['p50_ms'] for r in runs])}   {summary([r['p99_ms'] for r in runs])}"
                + (f"   ({errors} errors)" if errors else "")
            )
        ratios = [
            p["rps"] / d["rps"]
            for d, p in zip(by_target["direct"], by_target["proxy"], strict=True)
        ]
        added = [
            p["p50_ms"] - d["p50_ms"]
            for d, p in zip(by_target["direct"], by_target["proxy"], strict=True)
        ]
        print(
            f"  proxy/direct throughput: median {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f}..{max(ratios):.2f}]; p50 added by the hop: median "
            f"{statistics.median(added):+.2f} ms [{min(added):+.2f}..{max(added):+.2f}]; "
            f"proxy CPU per call {summary([r['cpu_ms_per_call'] for r in by_target['proxy']])} ms"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_standin":
        run_standin(int(sys.argv[2]), float(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_proxy":
        run_proxy_child(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
