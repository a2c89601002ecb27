"""What the benchmarks share: a minimal HTTP/1.1 load generator run in its own process, and helpers
to start servers as child processes and summarise runs.

The load generator opens N keep-alive connections on asyncio streams and sends the same raw request
on each in a closed loop for a fixed time, after a short warm-up; it prints one JSON line (requests,
errors, requests/s, p50 and p99 latency in ms). It is deliberately tiny, so that it costs the shared
CPUs as little as possible. Run as a child: ``python bench/_load.py URL SECONDS CONCURRENCY`` with
the raw request on standard input; ``measure`` does that.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

WARMUP_SECONDS = 0.5
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def http_request(
    method: str,
    url: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """A raw HTTP/1.1 request for ``url``'s host (keep-alive; Content-Length when there is a body)."""
    host = url.removeprefix("http://").rstrip("/")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


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
            if not head.startswith(b"HTTP/1.1 2"):
                errors += 1
            if now >= start_at:
                out.append(time.perf_counter() - now)
    finally:
        writer.close()
    return errors


async def load(url: str, request: bytes, seconds: float, concurrency: int) -> dict[str, Any]:
    """Closed-loop load on ``concurrency`` connections for ``seconds`` (after the warm-up)."""
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
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


def measure(
    url: str, request: bytes, *, seconds: float, concurrency: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run the load generator in its own process against ``url``; its JSON result."""
    out = subprocess.run(
        [sys.executable, __file__, url, str(seconds), str(concurrency)],
        input=request,
        env=env,
        capture_output=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# ---------------------------------------------------------------------------------- child servers


def free_port() -> int:
    """A TCP port free on loopback right now."""
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
def child(
    argv: list[str], *, what: str, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process (``python *argv``), waited for until it listens on ``port`` if given, and
    terminated on exit. Its standard output is discarded (errors still reach stderr)."""
    process = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL)
    try:
        if port is not None:
            _wait_listening(port, process, what)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cleanup(prefix: str) -> None:
    """Delete every Redis key under ``prefix`` (and only those)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.unlink(*keys[start : start + 1000])
    finally:
        client.close()


def summary(values: Sequence[float], digits: int = 2) -> str:
    """``median [min..max]``."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}..{max(values):.{digits}f}]"


if __name__ == "__main__":
    result = asyncio.run(
        load(sys.argv[1], sys.stdin.buffer.read(), float(sys.argv[2]), int(sys.argv[3]))
    )
    print(json.dumps(result))
