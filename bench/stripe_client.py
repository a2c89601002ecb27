"""CPU per Stripe call through the official SDK: its aiohttp client against its httpx client.

The stand-in runs in a separate process, so the CPU time measured here is the client's alone.
Prints, per run and as the median and spread of several runs, the CPU milliseconds per call and the
ratio aiohttp/httpx measured in the same run.

    python bench/stripe_client.py [--calls 1000] [--concurrency 16] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time

import httpx
import stripe

KEY = "sk_test_benchStripeClient000000000000"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def cpu_per_call(http: stripe.HTTPClient, url: str, calls: int, concurrency: int) -> float:
    client = stripe.StripeClient(KEY, base_addresses={"api": url}, http_client=http)
    customer = await client.v1.customers.create_async({"name": "bench"})
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await client.v1.customers.retrieve_async(customer.id)

    await asyncio.gather(*(one() for _ in range(50)))  # warm the pools
    started = time.process_time()
    await asyncio.gather(*(one() for _ in range(calls)))
    return (time.process_time() - started) / calls * 1000


async def run(url: str, calls: int, concurrency: int) -> tuple[float, float]:
    fast = stripe.AIOHTTPClient()
    slow = stripe.HTTPXClient()
    try:
        return (
            await cpu_per_call(fast, url, calls, concurrency),
            await cpu_per_call(slow, url, calls, concurrency),
        )
    finally:
        await fast.close_async()  # type: ignore[no-untyped-call]
        await slow.close_async()  # type: ignore[no-untyped-call]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    port = free_port()
    standin = subprocess.Popen(
        [sys.executable, "-m", "dualwrite", "stripe-standin", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url + "/_standin/state", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        ratios, fast_ms, slow_ms = [], [], []
        for index in range(args.runs):
            fast, slow = asyncio.run(run(url, args.calls, args.concurrency))
            fast_ms.append(fast)
            slow_ms.append(slow)
            ratios.append(fast / slow)
            print(
                f"run {index + 1}: aiohttp {fast:.3f} ms/call, httpx {slow:.3f} ms/call, "
                f"ratio {fast / slow:.2f}"
            )
        print(
            f"median: aiohttp {statistics.median(fast_ms):.3f} ms "
            f"[{min(fast_ms):.3f}..{max(fast_ms):.3f}], "
            f"httpx {statistics.median(slow_ms):.3f} ms [{min(slow_ms):.3f}..{max(slow_ms):.3f}], "
            f"aiohttp/httpx {statistics.median(ratios):.2f} [{min(ratios):.2f}..{max(ratios):.2f}]"
        )
    finally:
        standin.terminate()
        standin.wait()


if __name__ == "__main__":
    main()
