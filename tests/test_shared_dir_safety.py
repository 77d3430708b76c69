"""A shared directory's slot has the root's safety: hostile servers that
replay an older version of it (tests/hostile.py) are refused and named, and
when only older versions can be found the directory is an error, never the
older listing, and nothing is published on it."""

from __future__ import annotations

import logging

import pytest
import trio

from gridfs.client.sharing import share_directory
from gridfs.client.slots import SlotRollbackError, create_slot
from gridfs.mutable import SlotWriteCap, verify_version
from gridfs.storage.slots import SlotStore
from gridfs.tree import Put

from . import hostile
from .gridutil import open_broker
from .hostile import attack, holders
from .test_root_safety import PARAMS, TIMEOUT, Env, env, lit, one_error_line  # noqa: F401


async def test_rolling_a_shared_directorys_slot_back_is_detected(
    env: Env,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_broker(env.grid.addresses) as broker:
            tree = env.tree(broker)
            await tree.commit([Put(("docs", "a"), lit(b"a"))])

            async def new_slot(payload: bytes) -> SlotWriteCap:
                p = PARAMS
                return await create_slot(broker, payload, p.n, p.happy, seen=env.seen)

            child = await share_directory(tree, ("docs",), new_slot)
            assert isinstance(child, SlotWriteCap)
        si = child.storage_index
        keepers = holders(env.grid, si)
        old = SlotStore(keepers[0].dir.storage_path).read(si)
        assert old is not None and verify_version(si, *old).seq == 1
        async with open_broker(env.grid.addresses) as broker:
            await env.tree(broker).commit([Put(("docs", "b"), lit(b"b"))])
        assert env.seen.get(si) == 2

        # One holder replays version 1: refused, named, and version 2 shown.
        roller = keepers[0]
        attack(roller, "replay", si, old)
        async with open_broker(env.grid.addresses) as broker:
            with caplog.at_level(logging.WARNING, "gridfs.client.slots"):
                assert list(await env.tree(broker).listdir(("docs",))) == ["a", "b"]
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(roller.where in w and "older than version 2" in w for w in warnings)

        # Every holder replays it: an error, not the older directory; no write.
        for node in keepers:
            attack(node, "replay", si, old)
        before = [w for w in hostile.SLOT_WRITES if w.si == si]
        async with open_broker(env.grid.addresses) as broker:
            with pytest.raises(SlotRollbackError, match="older than version 2"):
                await env.tree(broker).listdir(("docs",))
            with pytest.raises(SlotRollbackError):
                await env.tree(broker).commit([Put(("docs", "on-old"), lit(b"x"))])
        assert [w for w in hostile.SLOT_WRITES if w.si == si] == before
        status, _, err = await env.gridfs("ls", "grid:/docs")
        assert "older than version 2 this node has seen" in one_error_line(status, err)
        status, out, err = await env.gridfs("ls", "grid:/")  # the rest of the tree reads
        assert (status, sorted(out.split())) == (0, ["docs/", "hello"]), err
