"""A slowloris, as a child process: N connections that each send a request line and then one header
line every few seconds, never finishing; a connection the server closes is opened again at once.

    python bench/_slowloris.py HOST PORT CONNECTIONS SECONDS [INTERVAL]

Runs for SECONDS, then prints one JSON line: connections opened, closed by the server, the status
of each reply the server sent before closing (408, 431, 503…), and connect errors. The soak runs it
beside its load (``bench/soak.py --slowloris``), and ``tests/proxy/test_proxy_limits.py`` against a proxy
whose open-file limit is tight. It raises its own open-file limit to fit its connections.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Descriptors the script keeps beside its connections.
FD_SPARE = 64


@dataclass
class Tally:
    """What the slowloris saw."""

    opened: int = 0
    closed_by_server: int = 0
    connect_errors: int = 0
    replies: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        """For the JSON line."""
        return {
            "opened": self.opened,
            "closed_by_server": self.closed_by_server,
            "connect_errors": self.connect_errors,
            "replies": dict(self.replies),
        }


def raise_open_files(connections: int) -> None:
    """Raise this process's soft open-file limit to fit ``connections`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + FD_SPARE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


async def one(
    host: str, port: int, index: int, until: float, interval: float, tally: Tally
) -> None:
    """One slow connection, reopened whenever the server closes it, until ``until``."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            tally.connect_errors += 1
            await asyncio.sleep(0.2)
            continue
        tally.opened += 1
        line = 0
        try:
            writer.write(f"GET /slow/{index} HTTP/1.1\r\nHost: {host}\r\n".encode())
            while time.monotonic() < until:
                await writer.drain()
                try:
                    reply = await asyncio.wait_for(reader.read(4096), interval)
                except TimeoutError:
                    line += 1
                    writer.write(f"X-Slow-{line}: {'a' * 8}\r\n".encode())
                    continue
                tally.closed_by_server += 1
                if reply.startswith(b"HTTP/1.1 "):
                    tally.replies[reply[9:12].decode(errors="replace")] += 1
                break
        except OSError:
            tally.closed_by_server += 1
        finally:
            writer.close()


async def run(host: str, port: int, connections: int, seconds: float, interval: float) -> Tally:
    """Hold ``connections`` slow connections for ``seconds``."""
    tally = Tally()
    until = time.monotonic() + seconds
    await asyncio.gather(
        *(one(host, port, index, until, interval, tally) for index in range(connections))
    )
    return tally


def main(argv: Sequence[str]) -> None:
    """Parse the arguments, run, print the tally."""
    if len(argv) not in (4, 5):
        raise SystemExit(__doc__)
    host, port, connections, seconds = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    interval = float(argv[4]) if len(argv) == 5 else 2.0
    raise_open_files(connections)
    tally = asyncio.run(run(host, port, connections, seconds, interval))
    print(json.dumps(tally.as_dict()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
