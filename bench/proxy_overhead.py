"""What the proxy costs non-usage traffic: the same Stripe call, straight to the upstream and
through ``dualwrite serve``, in one run.

Three kinds of process, all on loopback:

* the Stripe stand-in (uvicorn, no access log), optionally with a fixed latency per reply;
* the proxy (``run_proxy``: uvicorn, the app, its Redis engine and outbox worker), forwarding to it;
* a load generator: N keep-alive connections, each sending ``GET /v1/customers/{id}`` in a closed
  loop for a fixed time (a minimal HTTP/1.1 client on asyncio streams, so that the generator
  itself costs as little CPU as possible), reporting requests/s and latency percentiles.

Runs alternate direct and proxied, so drift (thermal, other load) hits both alike. Each profile
(concurrency level) prints the median and the spread over the runs, and the proxy/direct ratio.

    python bench/proxy_overhead.py                     # 5 runs x 3 s, concurrency 1 and 16
    python bench/proxy_overhead.py --runs 7 --seconds 5 --concurrency 1,8,32 --latency-ms 20

It needs Redis (``REDIS_URL``, default redis://127.0.0.1:6379/0); its keys live under a fresh
prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

KEY = "sk_test_dualwriteBench000000000000001"
WARMUP_SECONDS = 0.5


# ------------------------------------------------------------------------------ child processes


def run_standin(port: int, latency: float) -> None:
    """Child: the stand-in, quiet."""
    import uvicorn

    from dualwrite.testing import StripeStandin

    standin = StripeStandin(api_keys=[KEY], latency_seconds=latency)
    uvicorn.run(standin.app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


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


async def _connection(
    host: str, port: int, request: bytes, deadline: float, start_at: float, out: list[float]
) -> int:
    """One keep-alive connection in a closed loop; latencies after ``start_at`` go to ``out``."""
    reader, writer = await asyncio.open_connection(host, port)
    errors = 0
    try:
        while (now := time.perf_counter()) < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            if now >= start_at:
                out.append(time.perf_counter() - now)
    finally:
        writer.close()
    return errors


async def _load(url: str, path: str, seconds: float, concurrency: int) -> dict[str, Any]:
    host, _, port = url.removeprefix("http://").partition(":")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
        "Stripe-Version: 2025-02-24.acacia\r\nUser-Agent: dualwrite-bench\r\n\r\n"
    ).encode()
    start_at = time.perf_counter() + WARMUP_SECONDS
    deadline = start_at + seconds
    latencies: list[float] = []
    errors = await asyncio.gather(
        *(
            _connection(host, int(port), request, deadline, start_at, latencies)
            for _ in range(concurrency)
        )
    )
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "errors": sum(errors),
        "rps": len(latencies) / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def run_load(url: str, path: str, seconds: float, concurrency: int) -> None:
    """Child: the load generator; prints one JSON line."""
    print(json.dumps(asyncio.run(_load(url, path, seconds, concurrency))))


# ---------------------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start listening on port {port}")


@contextmanager
def _child(args: list[str], port: int, what: str, env: dict[str, str]) -> Iterator[str]:
    # Servers' own log lines stay out of the results (errors still reach stderr).
    process = subprocess.Popen(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.DEVNULL
    )
    try:
        _wait_listening(port, process, what)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _make_customer(standin_url: str) -> str:
    import stripe

    client = stripe.StripeClient(KEY, base_addresses={"api": standin_url})
    return str(client.v1.customers.create({"name": "Bench"}).id)


def _cleanup(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.unlink(*keys)
    finally:
        client.close()


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):9.2f}  [{min(values):.2f}..{max(values):.2f}]"


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
    standin_port, proxy_port = _free_port(), _free_port()
    latency = str(options.latency_ms / 1000)
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    try:
        with (
            _child(
                ["_standin", str(standin_port), latency], standin_port, "stand-in", env
            ) as direct,
            _child(["_proxy", str(proxy_port), direct, prefix], proxy_port, "proxy", env) as proxy,
        ):
            path = f"/v1/customers/{_make_customer(direct)}"
            for level in levels:
                results[level] = {"direct": [], "proxy": []}
                for run in range(options.runs):
                    order = [("direct", direct), ("proxy", proxy)]
                    for name, url in order if run % 2 == 0 else order[::-1]:
                        load = [
                            "_load",
                            url,
                            path,
                            str(options.seconds),
                            str(level),
                        ]
                        out = subprocess.run(
                            [sys.executable, __file__, *load],
                            env=env,
                            capture_output=True,
                            text=True,
                            check=True,
                        )
                        results[level][name].append(json.loads(out.stdout))
    finally:
        _cleanup(prefix)

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
                f"{_summary([r['rps'] for r in runs])}   {_summary([r['p50_ms'] for r in runs])}"
                f"   {_summary([r['p99_ms'] for r in runs])}"
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
            f"{statistics.median(added):+.2f} ms [{min(added):+.2f}..{max(added):+.2f}]"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_standin":
        run_standin(int(sys.argv[2]), float(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_proxy":
        run_proxy_child(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "_load":
        run_load(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
