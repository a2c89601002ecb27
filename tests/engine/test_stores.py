"""One place opens the stores (issue 18, item 4): ``Stores.open(settings)``.

The source checks read dualwrite's modules with ``ast``: ``open_redis(`` and ``KeySpace(`` are
called in ``dualwrite/stores.py`` only, and no module but the engine reads ``engine.redis``,
``.keys``, ``.outbox`` or ``.ledger`` (the engine keeps them as read-only properties for callers
outside dualwrite). The other tests run the builder against the real Redis.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import dualwrite
from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.keys import KeySpace
from dualwrite.stores import Stores

pytestmark = pytest.mark.anyio

PACKAGE = Path(dualwrite.__file__).parent
BUILDER = "stores.py"
BUILT_THERE = frozenset({"open_redis", "KeySpace"})
"""Called by the builder only. No exception is needed: tests and the stand-in build their own,
and ``redis_client.open_redis`` stays as the primitive the builder calls."""
ENGINE_STORES = frozenset({"redis", "keys", "outbox", "ledger"})
"""Read through ``engine.stores`` (or passed in), never as ``engine.<name>``, outside engine.py."""


def sources() -> Iterator[tuple[str, ast.Module]]:
    """Every module of dualwrite, by its path under the package, parsed."""
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text())


def called_name(node: ast.Call) -> str | None:
    """The name a call calls: ``f(...)`` and ``module.f(...)`` both give ``f``."""
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def builder_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """The lines of ``tree`` that call ``open_redis`` or ``KeySpace``."""
    return [
        (node.lineno, name)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and (name := called_name(node)) in BUILT_THERE
    ]


def _names_an_engine(node: ast.expr) -> bool:
    """``engine``, ``self.engine``, ``recorder._engine``…: an expression naming an engine."""
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return name.lstrip("_").endswith("engine")


def engine_store_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """The lines of ``tree`` that read ``<engine>.redis/.keys/.outbox/.ledger``."""
    return [
        (node.lineno, node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in ENGINE_STORES
        and _names_an_engine(node.value)
    ]


class TestOnePlaceOpensTheStores:
    """The source holds every module to the builder."""

    def test_only_the_builder_opens_redis_and_lays_out_keys(self):
        """``open_redis(`` and ``KeySpace(`` are called in ``dualwrite/stores.py`` and nowhere else."""
        found = {path: calls for path, tree in sources() if (calls := builder_calls(tree))}
        assert set(found) == {BUILDER}, found
        assert {name for _, name in found[BUILDER]} == BUILT_THERE

    def test_no_module_reads_the_engine_as_a_container(self):
        """Outside engine.py no module reads ``engine.redis``, ``.keys``, ``.outbox`` or ``.ledger``."""
        found = {
            path: reads
            for path, tree in sources()
            if path != "engine.py" and (reads := engine_store_reads(tree))
        }
        assert found == {}

    def test_the_checks_find_what_they_look_for(self):
        """Planted calls and reads are found (a guard against checks that match nothing)."""
        planted = ast.parse(
            "r = redis_client.open_redis(s)\nk = KeySpace('p')\n"
            "a = self.engine.redis\nb = engine.keys\nc = self._engine.outbox\n"
            "d = engine.stores.ledger\ne = other.redis\n"
        )
        assert builder_calls(planted) == [(1, "open_redis"), (2, "KeySpace")]
        assert engine_store_reads(planted) == [(3, "redis"), (4, "keys"), (5, "outbox")]

    def test_importing_the_builder_loads_no_stripe(self):
        """``import dualwrite.stores`` does not load stripe: the outbox is imported on first use."""
        probe = (
            "import sys, dualwrite.stores\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'stripe', 'starlette'}))"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"


class TestStores:
    """``Stores.open`` builds once and closes what it opened."""

    async def test_open_lays_out_the_settings_key_space(self, settings: Settings):
        """The key space is the settings' prefix and shards; the client answers."""
        async with Stores.open(settings) as stores:
            assert stores.keys == KeySpace(settings.redis.key_prefix, settings.redis.shards)
            assert await stores.redis.ping()

    async def test_each_store_is_built_once_on_the_shared_client(self, settings: Settings):
        """The ledger, outbox and flag store are one instance each, on the one client and keys."""
        async with Stores.open(settings) as stores:
            assert stores.ledger is stores.ledger
            assert stores.outbox is stores.outbox
            assert stores.flags is stores.flags
            assert stores.outbox.ledger is stores.ledger
            assert stores.ledger.redis is stores.redis
            assert stores.ledger.divergence_maxlen == settings.ledger.divergence_maxlen

    async def test_open_closes_its_client(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ):
        """Leaving ``async with`` closes the client ``open`` opened."""
        stores = Stores.open(settings)
        closed: list[bool] = []
        real = stores.redis.aclose

        async def spy(*args: object) -> None:
            closed.append(True)
            await real()

        monkeypatch.setattr(stores.redis, "aclose", spy)
        async with stores:
            pass
        assert closed == [True]

    async def test_on_leaves_the_client_to_its_opener(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ):
        """``Stores.on(redis, settings)`` never closes a client it did not open."""
        client = aioredis.Redis.from_url(settings.redis.url, decode_responses=True)
        closed: list[bool] = []
        real = client.aclose

        async def spy(*args: object) -> None:
            closed.append(True)

        monkeypatch.setattr(client, "aclose", spy)
        try:
            async with Stores.on(client, settings) as stores:
                assert stores.redis is client
            assert closed == []
            assert await client.ping()
        finally:
            await real()


class TestEngineStores:
    """The engine is built on the stores and closes the ones it opened."""

    async def test_the_engine_keeps_its_stores(self, engine: DualWriteEngine):
        """``engine.redis/.keys/.ledger/.outbox`` are its stores' (kept for callers outside)."""
        stores = engine.stores
        assert engine.redis is stores.redis
        assert engine.keys is stores.keys
        assert engine.ledger is stores.ledger
        assert engine.outbox is stores.outbox

    async def test_from_settings_closes_the_stores_it_opened(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ):
        """``aclose()`` of an engine from ``from_settings`` closes its stores' client."""
        engine = DualWriteEngine.from_settings(settings)
        closed: list[bool] = []
        real = engine.stores.redis.aclose

        async def spy(*args: object) -> None:
            closed.append(True)
            await real()

        monkeypatch.setattr(engine.stores.redis, "aclose", spy)
        await engine.start(worker=False)
        await engine.aclose()
        assert closed == [True]
