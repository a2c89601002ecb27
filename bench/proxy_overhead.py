"""What the proxy hop costs a forwarded call, side by side with nginx, in one run.

Four kinds of process, all on loopback:

* a small upstream (``_upstream``: an asyncio protocol on uvloop answering every request with the
  same Stripe customer object and Stripe's reply headers, immediately or after ``--latency-ms``),
  so that the upstream costs the shared CPUs as little as possible;
* ``dualwrite serve`` (``run_proxy``: uvicorn, the app, its Redis engine and outbox worker, no
  access log), forwarding to it;
* nginx, when ``nginx`` is on PATH: started by this script on a free port with a generated
  configuration (reverse proxy, one worker, upstream keep-alive, no access log), forwarding to the
  same upstream; skipped with a message when it is not installed (``apt-get install nginx``);
* a load generator (``bench/_load.py``): N keep-alive connections, each sending
  ``GET /v1/customers/{id}`` in a closed loop for a fixed time.

Each run measures every target once, in an order that rotates from run to run, so drift (other
load on the machine) hits all alike. For each concurrency level it prints medians [min..max] over
the runs, the latency each hop adds to the direct call at the median, the requests/s ratios, and
each proxy's CPU per forwarded call (from ``/proc``). The goals of issue 20 are printed with them:
at one connection the proxy adds at most 2x what nginx adds, and at 16 it moves at least 0.7x
nginx's requests/s.

    python bench/proxy_overhead.py                     # 3 runs x 3 s, concurrency 1 and 16
    python bench/proxy_overhead.py --runs 5 --concurrency 1,16,64 --latency-ms 50

It needs Redis (``REDIS_URL``, default redis://127.0.0.1:6379/0) for the proxy's engine; its keys
live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from _load import (
    WARMUP_SECONDS,
    _wait_listening,
    child,
    cleanup,
    cpu_seconds,
    free_port,
    http_request,
    measure,
    summary,
)

KEY = "sk_test_dualwriteBench000000000000001"
CUSTOMER = "cus_BenchProxyHop0001"
#: A customer object as Stripe returns it (the size of a real one, without metadata).
CUSTOMER_BODY = json.dumps(
    {
        "id": CUSTOMER,
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": 1765000000,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": "bench@example.com",
        "invoice_prefix": "BENCH0001",
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": {},
        "name": "Bench",
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    },
    indent=2,
).encode()
#: The headers Stripe's API sends with such a reply (Date is filled in per second).
REPLY_HEADERS = [
    ("Server", "nginx"),
    ("Content-Type", "application/json"),
    ("Content-Length", str(len(CUSTOMER_BODY))),
    ("Connection", "keep-alive"),
    ("Access-Control-Allow-Credentials", "true"),
    ("Access-Control-Allow-Methods", "GET, HEAD, PUT, PATCH, POST, DELETE"),
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Expose-Headers", "Request-Id, Stripe-Manage-Version, X-Stripe-External-Auth"),
    ("Access-Control-Max-Age", "300"),
    ("Cache-Control", "no-cache, no-store"),
    ("Content-Security-Policy", "base-uri 'none'; default-src 'none'; frame-ancestors 'none'"),
    ("Request-Id", "req_BenchProxyHop0001"),
    ("Stripe-Version", "2025-02-24.acacia"),
    ("Vary", "Origin"),
    ("X-Stripe-Routing-Context-Priority-Tier", "api-testmode"),
    ("Strict-Transport-Security", "max-age=63072000; includeSubDomains; preload"),
]

# ------------------------------------------------------------------------------ the small upstream


class _Reply:
    """The canned reply, its Date header rewritten once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._bytes = b""

    def bytes(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            head = ["HTTP/1.1 200 OK", f"Date: {email.utils.formatdate(now, usegmt=True)}"]
            head += [f"{name}: {value}" for name, value in REPLY_HEADERS]
            self._bytes = ("\r\n".join(head) + "\r\n\r\n").encode() + CUSTOMER_BODY
        return self._bytes


class _UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, enough for the proxies' forwarded requests (Content-Length bodies)."""

    def __init__(self, reply: _Reply, delay: float) -> None:
        self._reply = reply
        self._delay = delay
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self._buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self._buffer) < end + 4 + length:
                return
            self._buffer = self._buffer[end + 4 + length :]
            assert self._transport is not None
            if self._delay:
                reply = self._reply.bytes()
                asyncio.get_running_loop().call_later(self._delay, self._send, reply)
            else:
                self._transport.write(self._reply.bytes())

    def _send(self, reply: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(reply)


def run_upstream(port: int, delay: float) -> None:
    """Child: the small upstream on ``port``, until terminated."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        pass

    async def serve() -> None:
        reply = _Reply()
        server = await asyncio.get_running_loop().create_server(
            lambda: _UpstreamProtocol(reply, delay), "127.0.0.1", port, backlog=1024
        )
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


# ---------------------------------------------------------------------------------------- proxies


def run_proxy_child(port: int, upstream: str, prefix: str, fast_path: bool = True) -> None:
    """Child: the proxy, as ``dualwrite serve --no-access-log`` runs it (``fast_path=False``:
    ``[proxy] fast_path = false``, every request through ASGI and aiohttp, as before issue 20)."""
    from dualwrite.config import Settings
    from dualwrite.proxy import run_proxy

    settings = Settings(
        redis={
            "url": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            "key_prefix": prefix,
        },
        stripe={"api_base": upstream},
        proxy={"fast_path": fast_path},
    )
    run_proxy(settings, host="127.0.0.1", port=port, access_log=False)


_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding"}
_UVICORN = {
    "host": "127.0.0.1",
    "http": "httptools",
    "loop": "uvloop",
    "lifespan": "off",
    "access_log": False,
    "log_level": "warning",
    "server_header": False,
    "date_header": False,
}


def run_asgi_only(port: int) -> None:
    """Child (``--breakdown``): uvicorn as the proxy runs it, answering the upstream's reply
    itself, with no upstream: what the ASGI server's framing costs a call."""
    import uvicorn

    reply = _Reply()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        head, _, body = reply.bytes().partition(b"\r\n\r\n")
        headers = [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, port=port, **_UVICORN)  # type: ignore[arg-type]


def run_forwarder(port: int, upstream: str) -> None:
    """Child (``--breakdown``): the least a forwarder on uvicorn and aiohttp does (every header
    but Host up, every reply header but the hop-by-hop ones down, the body read whole), with
    the proxy's session settings: the floor of the proxy's stack."""
    import aiohttp
    import uvicorn

    session: aiohttp.ClientSession | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, limit_per_host=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "Content-Type", "User-Agent"),
            )
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        url = upstream + scope["raw_path"].decode()
        async with session.get(url, headers=[h for h in headers if h[0] != "host"]) as response:
            body = await response.read()
            down = [(k, v) for k, v in response.raw_headers if k.lower() not in _HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status, "headers": down})
            await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, port=port, **_UVICORN)  # type: ignore[arg-type]


NGINX_CONFIG = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    upstream stripe {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://stripe;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@contextmanager
def nginx(port: int, upstream_port: int) -> Iterator[int]:
    """nginx in the foreground on ``port`` in front of the upstream; yields its worker's pid."""
    binary = shutil.which("nginx") or "nginx"
    with tempfile.TemporaryDirectory(prefix="dwbench-nginx-") as directory:
        os.chmod(directory, 0o755)  # the worker (user nobody when started as root) reads it
        config = os.path.join(directory, "nginx.conf")
        with open(config, "w") as out:
            out.write(NGINX_CONFIG.format(dir=directory, port=port, upstream=upstream_port))
        process = subprocess.Popen(
            [binary, "-p", directory, "-e", os.path.join(directory, "error.log"), "-c", config],
            stdout=subprocess.DEVNULL,
        )
        try:
            _wait_listening(port, process, "nginx")
            yield _only_child(process.pid)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def _only_child(pid: int) -> int:
    """The one worker of nginx's master process."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            found = children.read().split()
        if found:
            return int(found[0])
        time.sleep(0.05)
    raise SystemExit("nginx started no worker")


# ------------------------------------------------------------------------------------------ runs


def _run(
    targets: dict[str, tuple[str, int | None]], options: argparse.Namespace
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    headers = [
        ("Authorization", f"Bearer {KEY}"),
        ("Stripe-Version", "2025-02-24.acacia"),
        ("User-Agent", "dualwrite-bench"),
        ("Accept", "*/*"),
    ]
    path = f"/v1/customers/{CUSTOMER}"
    names = list(targets)
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for level in options.levels:
        results[level] = {name: [] for name in names}
        for run in range(options.runs):
            shift = run % len(names)
            for name in names[shift:] + names[:shift]:
                url, pid = targets[name]
                request = http_request("GET", url, path, headers=headers)
                before = cpu_seconds(pid) if pid is not None else 0.0
                result = measure(url, request, seconds=options.seconds, concurrency=level)
                if pid is not None:
                    # Warm-up requests included: CPU over every request the run sent.
                    sent = result["requests"] * (1 + WARMUP_SECONDS / options.seconds)
                    result["cpu_ms_per_call"] = (cpu_seconds(pid) - before) / sent * 1000
                results[level][name].append(result)
    return results


def _print(
    results: dict[int, dict[str, list[dict[str, Any]]]], options: argparse.Namespace
) -> None:
    load = os.getloadavg()
    print(
        f"GET /v1/customers/{{id}}, {options.runs} runs x {options.seconds:g} s per target, "
        f"upstream delay {options.latency_ms:g} ms, {os.cpu_count()} CPUs shared by the load "
        f"generator, the upstream and the proxies; load average {load[0]:.1f} {load[1]:.1f} "
        f"{load[2]:.1f} at the end"
    )
    for level, by_target in results.items():
        print(
            f"\nconcurrency {level:<4}  req/s median [min..max]"
            "     p50 ms [min..max]       p99 ms [min..max]   added p50 ms   CPU/call ms"
        )
        direct = by_target["direct"]
        added: dict[str, list[float]] = {}
        for name, runs in by_target.items():
            errors = sum(run["errors"] for run in runs)
            line = (
                f"  {name:16}{summary([r['rps'] for r in runs], 0):>20}   "
                f"{summary([r['p50_ms'] for r in runs])}   {summary([r['p99_ms'] for r in runs])}"
            )
            if name != "direct":
                added[name] = [r["p50_ms"] - d["p50_ms"] for d, r in zip(direct, runs, strict=True)]
                cpu = statistics.median(r["cpu_ms_per_call"] for r in runs)
                line += f"   {statistics.median(added[name]):+.3f}        {cpu:.3f}"
            print(line + (f"   ({errors} errors)" if errors else ""))
        proxy = by_target["dualwrite"]
        rps_direct = [p["rps"] / d["rps"] for d, p in zip(direct, proxy, strict=True)]
        print(f"  dualwrite/direct req/s: {summary(rps_direct)}")
        if "nginx" in by_target:
            nginx_runs = by_target["nginx"]
            ratios = [p["rps"] / n["rps"] for n, p in zip(nginx_runs, proxy, strict=True)]
            nginx_added = statistics.median(added["nginx"])
            # Under 10 us nginx's hop is lost in the noise of the direct runs: no ratio then.
            added_ratio = (
                statistics.median(added["dualwrite"]) / nginx_added
                if nginx_added >= 0.01
                else float("nan")
            )
            cpu_ratio = statistics.median(r["cpu_ms_per_call"] for r in proxy) / max(
                statistics.median(r["cpu_ms_per_call"] for r in nginx_runs), 1e-9
            )
            goal = ""
            if level == 1:
                verdict = "n/a" if math.isnan(added_ratio) else _met(added_ratio <= 2)
                goal = f"   goal (1 connection): added p50 <= 2x: {verdict}"
            elif level == 16:
                goal = f"   goal (16 connections): req/s >= 0.7x: {_met(statistics.median(ratios) >= 0.7)}"
            print(
                f"  dualwrite/nginx: req/s {summary(ratios)}; added p50 "
                f"{added_ratio:.2f}x; CPU per call {cpu_ratio:.2f}x{goal}"
            )


def _met(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="upstream delay per reply")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also measure uvicorn answering alone and a minimal uvicorn + aiohttp forwarder",
    )
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    options = parser.parse_args()
    options.levels = [int(level) for level in options.concurrency.split(",")]

    env = dict(os.environ, STRIPE_API_KEY=KEY)
    prefix = f"dwbench-{uuid.uuid4().hex[:8]}"
    upstream_port, proxy_port, nginx_port = free_port(), free_port(), free_port()
    with_nginx = not options.no_nginx and shutil.which("nginx") is not None
    if not with_nginx and not options.no_nginx:
        print("nginx is not on PATH: measuring without it (apt-get install nginx to compare)\n")
    delay = str(options.latency_ms / 1000)
    upstream = f"http://127.0.0.1:{upstream_port}"
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                child(
                    [__file__, "_upstream", str(upstream_port), delay],
                    what="upstream",
                    port=upstream_port,
                )
            )
            proxy = stack.enter_context(
                child(
                    [__file__, "_proxy", str(proxy_port), upstream, prefix],
                    what="dualwrite serve",
                    env=env,
                    port=proxy_port,
                )
            )
            targets: dict[str, tuple[str, int | None]] = {
                "direct": (upstream, None),
                "dualwrite": (f"http://127.0.0.1:{proxy_port}", proxy.pid),
            }
            if with_nginx:
                worker = stack.enter_context(nginx(nginx_port, upstream_port))
                targets["nginx"] = (f"http://127.0.0.1:{nginx_port}", worker)
            if options.breakdown:
                for name, command, extra in (
                    ("ASGI path", "_proxy", [upstream, f"{prefix}-asgi", "asgi"]),
                    ("uvicorn alone", "_asgi", []),
                    ("uvicorn+aiohttp", "_forwarder", [upstream]),
                ):
                    port = free_port()
                    process = stack.enter_context(
                        child([__file__, command, str(port), *extra], what=name, port=port, env=env)
                    )
                    targets[name] = (f"http://127.0.0.1:{port}", process.pid)
            results = _run(targets, options)
    finally:
        cleanup(prefix)
        cleanup(f"{prefix}-asgi")

    if options.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results, options)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        run_upstream(int(sys.argv[2]), float(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_asgi":
        run_asgi_only(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_forwarder":
        run_forwarder(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_proxy":
        fast = len(sys.argv) < 6 or sys.argv[5] != "asgi"
        run_proxy_child(int(sys.argv[2]), sys.argv[3], sys.argv[4], fast_path=fast)
    else:
        main()
