"""The local spool: where a recorded event's commit waits while Redis is unreachable.

Stripe accepted the authoritative write; Redis, which should now hold the ledger update and the
shadow write, does not answer. Rather than lose the shadow, the engine appends the commit as one JSON
line to a file in the spool directory and fsyncs it before answering the caller. When Redis answers
again, ``replay()`` applies every spooled commit exactly once (a marker key per commit makes a replay
interrupted by a crash harmless to run again) and counts each as ``delayed_events`` in the ledger.

The directory is capped (``[outbox] spool_max_bytes``): once full, the engine refuses new usage
with a retryable 503 before writing anything, so callers hold back instead of usage being lost.

Any process sharing the directory may replay any file: a file is claimed by renaming it, so two
processes never replay the same one.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from pydantic import ValidationError

from dualwrite.config import default_spool_dir
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.ledger import Commit, CommitWriter

__all__ = ["DEFAULT_MAX_BYTES", "Spool", "default_spool_dir"]

log = logging.getLogger(__name__)

#: The default cap of the spool directory (``[outbox] spool_max_bytes``).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_ACTIVE_SUFFIX = ".jsonl"
_CLAIMED_SUFFIX = ".replaying"


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # replayed and removed meanwhile
        return 0


class Spool:
    """An append-only, fsynced file of commits per process, in a shared directory."""

    def __init__(self, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.directory = directory
        self.max_bytes = max_bytes
        self._name = f"spool-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._lock = threading.Lock()
        self._replaying = asyncio.Lock()
        self._size_at = -1.0
        self._size = 0

    def full(self) -> bool:
        """Whether the directory (every process's files) holds ``max_bytes`` or more.

        Measured at most once a second; an append since then counts at once.
        """
        now = time.monotonic()
        if now - self._size_at >= 1.0:
            self._size = sum(_size_of(path) for path in self._files())
            self._size_at = now
        return self._size >= self.max_bytes

    @property
    def _path(self) -> Path:
        return self.directory / f"{self._name}{_ACTIVE_SUFFIX}"

    async def append(self, commit: Commit) -> None:
        """Write one commit durably (fsynced) before returning."""
        await asyncio.to_thread(self._append, commit.model_dump_json())

    def _append(self, line: str) -> None:
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            while True:
                with self._path.open("a", encoding="utf-8") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    # A replayer may have claimed (renamed) the file between open and lock: then
                    # this handle points at a file being replayed; write to a fresh one instead.
                    if not self._is_current(handle.fileno()):
                        continue
                    handle.write(line + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                    self._size += len(line) + 1
                    return

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self._path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def pending(self) -> int:
        """How many commits wait in the directory (all processes' files)."""
        total = 0
        for path in self._files():
            with path.open(encoding="utf-8") as handle:
                total += sum(1 for line in handle if line.strip())
        return total

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(
            path
            for path in self.directory.iterdir()
            if path.suffix in (_ACTIVE_SUFFIX, _CLAIMED_SUFFIX)
        )

    async def replay(self, writer: CommitWriter) -> int:
        """Apply every spooled commit (each once) and remove the files; returns how many applied.

        Stops at the first Redis failure, keeping what is left for the next replay.
        """
        applied = 0
        async with self._replaying:
            for path in self._files():
                claimed = await asyncio.to_thread(self._claim, path)
                if claimed is None:
                    continue
                try:
                    applied += await self._replay_file(claimed, writer)
                except FileNotFoundError:
                    continue  # another process replayed and removed it meanwhile
                except StoreUnavailableError:
                    log.warning("Redis unavailable again while replaying the spool; will retry")
                    break
                await asyncio.to_thread(claimed.unlink, missing_ok=True)
        if applied:
            log.warning("replayed %d commit(s) spooled while Redis was unavailable", applied)
        return applied

    def _claim(self, path: Path) -> Path | None:
        if path.suffix == _CLAIMED_SUFFIX:
            return path  # a replay that stopped half-way (or crashed): markers make it safe to redo
        # A name of its own: the process keeps appending to a fresh file under the old name, and a
        # later claim of that one must never overwrite this one.
        target = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:8]}{_CLAIMED_SUFFIX}")
        try:
            handle = path.open("a", encoding="utf-8")
        except FileNotFoundError:
            return None  # another process claimed it first
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # waits for an append in progress to finish
            try:
                path.rename(target)
            except FileNotFoundError:
                return None
        return target

    async def _replay_file(self, path: Path, writer: CommitWriter) -> int:
        applied = 0
        lines = await asyncio.to_thread(path.read_text, "utf-8")
        for number, line in enumerate(lines.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                commit = Commit.model_validate_json(line)
            except ValidationError:
                log.error("spool file %s line %d is unreadable; skipped", path.name, number)
                continue
            if await writer.apply(commit.with_increments({"delayed_events": 1}), once=True):
                applied += 1
        return applied
