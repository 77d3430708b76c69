"""A tree's root cannot be hidden, rolled back or forked: attacks on the root
slot by hostile storage servers (tests/hostile.py) on a grid of 20 real
in-process servers, each asserting what the attack achieves: the right data
or one clear error, never an empty tree, never a silent loss.

The root slot lives on the first 10 servers of its permuted order (n=10,
happy=7); the other 10 never held it, so they answer "no slot"."""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gridfs.caps import LiteralCap
from gridfs.client.broker import StorageBroker
from gridfs.client.gridstore import GridStore, RootUnavailableError
from gridfs.client.seen import SeenVersions
from gridfs.client.session import add_alias
from gridfs.client.slots import (
    SlotConflictError,
    SlotRollbackError,
    create_slot,
    publish_slot,
    read_slot,
)
from gridfs.client.upload import UploadParams
from gridfs.config import NodeConfig, NodeDir
from gridfs.dirnode import Entry
from gridfs.mutable import SlotWriteCap, decrypt, verify_version
from gridfs.storage.slots import SlotStore
from gridfs.tree import Put, Tree, empty_dir_cap, pack_root, unpack_root

from . import hostile
from .gridutil import MEMBERS, Grid, StorageNode, open_broker
from .hostile import attack, holders, open_hostile_grid

SERVERS = 20
PARAMS = UploadParams(k=3, happy=7, n=10)
TIMEOUT = 60
SLOT_TIMEOUT = 2.0
T0 = 1_700_000_000_000_000_000


def lit(data: bytes) -> Entry:
    return Entry("file", LiteralCap(data).to_string(), len(data), 0o644, T0, T0)


def on_disk(node: StorageNode, si: bytes) -> int:
    """The seq of the version a server holds on disk (0: none)."""
    stored = SlotStore(node.dir.storage_path).read(si)
    return 0 if stored is None else verify_version(si, *stored).seq


@dataclass
class Env:
    grid: Grid
    node: NodeDir
    """A client node over the grid's servers, its alias grid: the tree."""
    cap: SlotWriteCap
    seen: SeenVersions
    """The client node's memory of root versions (shared with its commands)."""

    @property
    def si(self) -> bytes:
        return self.cap.storage_index

    def tree(self, broker: StorageBroker, seen: SeenVersions | None = None) -> Tree:
        store = GridStore(
            broker,
            self.cap,
            PARAMS,
            self.node.convergence_secret(),
            self.seen if seen is None else seen,
            timeout=SLOT_TIMEOUT,
        )
        return Tree(store)

    def holders(self) -> list[StorageNode]:
        return holders(self.grid, self.si)

    def writes(self) -> list[hostile.SlotWrite]:
        return [w for w in hostile.SLOT_WRITES if w.si == self.si]

    async def gridfs(self, *args: str) -> tuple[int, str, str]:
        """Run the real command on the client node: (status, stdout, stderr)."""
        env = {**os.environ, "GRIDFS_NODE": str(self.node.path)}
        proc = await trio.run_process(
            [sys.executable, "-m", "gridfs", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """20 servers; a tree whose root (version 2) lists one file, hello."""
    async with open_hostile_grid(tmp_path / "grid", SERVERS) as grid:
        node = NodeDir(tmp_path / "client")
        servers = [str(a) for a in grid.addresses]
        node.create(NodeConfig("client", "client", servers=servers, k=3, happy=7, n=10))
        MEMBERS.enroll(node, "client")
        seen = SeenVersions.of_node(node.private)
        with trio.fail_after(TIMEOUT):
            async with open_broker(grid.addresses) as broker:
                p = PARAMS
                cap = await create_slot(broker, pack_root(empty_dir_cap()), p.n, p.happy, seen=seen)
                env = Env(grid, node, cap, seen)
                assert (await env.tree(broker).commit([Put(("hello",), lit(b"hi"))]))[0] == 2
        add_alias(node, "grid", cap.to_string())
        assert len(env.holders()) == PARAMS.n
        assert seen.get(cap.storage_index) == 2
        hostile.SLOT_WRITES.clear()  # the tests look at the writes after this
        try:
            yield env
        finally:
            seen.close()


def one_error_line(status: int, stderr: str) -> str:
    assert status != 0
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("gridfs: error: "), stderr
    return stderr


# -- hidden -----------------------------------------------------------------------


async def test_stopped_root_servers_fail_ls_and_writes_publish_nothing(env: Env) -> None:
    """The finding: stopping the 10 servers that hold the root made ``ls``
    print an empty directory (exit 0), and a write publish a new empty tree."""
    with trio.fail_after(TIMEOUT):
        down = env.holders()
        for node in down:
            await node.kill()
        status, out, err = await env.gridfs("ls", "grid:/")
        line = one_error_line(status, err)
        assert "the root of this tree cannot be found on any reachable server" in line
        assert "10 of 20 servers answered without it, 10 could not be reached" in line
        assert out == "" and status == 3
        status, _, err = await env.gridfs("mkdir", "grid:/new")
        one_error_line(status, err)
        async with open_broker(env.grid.addresses) as broker:
            with pytest.raises(RootUnavailableError):
                await env.tree(broker).commit([Put(("new",), lit(b"x"))])
            with pytest.raises(RootUnavailableError):
                await env.tree(broker).root()
        assert env.writes() == []  # not one slot write reached a server
        assert env.holders() == down and [on_disk(n, env.si) for n in down] == [2] * 10
        # The mkdir waits in the node's queue (shown laid over the tree, never
        # lost) until the root can be read again; then it lands on version 2.
        for node in down:
            await node.start()
        status, out, err = await env.gridfs("ls", "grid:/")
        assert (status, out.split()) == (0, ["hello", "new/"]), err
        assert env.writes() == []
        status, _, err = await env.gridfs("queue", "flush")
        assert status == 0, err
        assert {verify_version(env.si, w.record, w.signature).seq for w in env.writes()} == {3}


async def test_holders_answering_empty_are_asked_past(env: Env) -> None:
    """Servers that hold the root but answer "no slot": with fewer than
    happy honest holders left, the reader goes on down the list and still
    finds the root; with none, the read fails and nothing is published."""
    with trio.fail_after(TIMEOUT):
        async with open_broker(env.grid.addresses) as broker:  # healthy: n asked, no more
            read = await read_slot(broker, env.cap, PARAMS.n, happy=PARAMS.happy)
            assert read.servers == {2: {n.address.node_id for n in env.holders()}}  # type: ignore[union-attr]
        liars = env.holders()[:6]
        for node in liars:
            attack(node, "empty")
        async with open_broker(env.grid.addresses) as broker:
            seq, payload = await env.tree(broker).store.read_root()
            assert seq == 2
            assert list(await env.tree(broker).listdir((), unpack_root(payload))) == ["hello"]
            read = await read_slot(broker, env.cap, PARAMS.n, happy=PARAMS.happy)
            assert sum(len(ids) for ids in read.servers.values()) == SERVERS  # asked them all
            assert len(read.servers[2]) == 4
        for node in env.holders()[6:]:
            attack(node, "empty")
        async with open_broker(env.grid.addresses) as broker:
            with pytest.raises(RootUnavailableError, match="20 of 20 servers answered without"):
                await env.tree(broker).commit([Put(("lost",), lit(b"x"))])
        assert not [
            w for w in env.writes() if verify_version(env.si, w.record, w.signature).seq > 2
        ]
        assert [on_disk(n, env.si) for n in env.holders()] == [2] * 10


async def test_some_holders_down_the_root_is_read_and_written(env: Env) -> None:
    """Four holders down: 6 copies agree, fewer than happy, so the reader asks
    every server; the data is right and a write reaches happy servers."""
    with trio.fail_after(TIMEOUT):
        down = env.holders()[:4]
        for node in down:
            await node.kill()
        async with open_broker(env.grid.addresses) as broker:
            tree = env.tree(broker)
            assert list(await tree.listdir(())) == ["hello"]
            seq, _ = await tree.commit([Put(("second",), lit(b"2"))])
            assert seq == 3
        assert sum(on_disk(n, env.si) == 3 for n in env.grid.nodes) >= PARAMS.happy
        for node in down:
            await node.start()
        status, out, err = await env.gridfs("ls", "grid:/")
        assert (status, out.split()) == (0, ["hello", "second"]), err


async def test_stalling_holders(env: Env) -> None:
    """Holders that never answer cost a timeout, not the root: with three
    stalling, reads and writes go on; with all ten, one clear error."""
    with trio.fail_after(TIMEOUT):
        stalling = env.holders()[:3]
        for node in stalling:
            attack(node, "stall")
        async with open_broker(env.grid.addresses) as broker:
            tree = env.tree(broker)
            assert list(await tree.listdir(())) == ["hello"]
            assert (await tree.commit([Put(("during",), lit(b"s"))]))[0] == 3
        # The publish went past the three to other servers: 13 hold the root now.
        assert len(env.holders()) == 13
        for node in env.holders():
            attack(node, "stall")
        async with open_broker(env.grid.addresses) as broker:
            with pytest.raises(RootUnavailableError, match="13 could not be reached"):
                await env.tree(broker).commit([Put(("lost",), lit(b"x"))])


# -- forged -----------------------------------------------------------------------


async def test_forged_higher_seq_is_ignored_and_reported(env: Env) -> None:
    with trio.fail_after(TIMEOUT):
        forgers = env.holders()[:3]
        for node in forgers:
            attack(node, "forge")
        async with open_broker(env.grid.addresses) as broker:
            read = await read_slot(broker, env.cap, PARAMS.n, happy=PARAMS.happy, seen=env.seen)
            assert read.seq == 2 and set(read.servers) <= {0, 2}
            for node in forgers:
                (problem,) = [p for p in read.problems if node.where in p]
                assert "signature is invalid" in problem
            tree = env.tree(broker)
            assert (await tree.commit([Put(("after",), lit(b"a"))]))[0] == 3
            assert list(await tree.listdir(())) == ["after", "hello"]
        assert env.seen.get(env.si) == 3


# -- rolled back ------------------------------------------------------------------


async def test_a_server_rolling_the_root_back_is_refused_and_named(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """One holder offers version 2 after the node saw version 3: the read
    shows version 3, warns naming the server, and the command says so too."""
    old = SlotStore(env.holders()[0].dir.storage_path).read(env.si)
    assert old is not None
    with trio.fail_after(TIMEOUT):
        async with open_broker(env.grid.addresses) as broker:
            await env.tree(broker).commit([Put(("newer",), lit(b"3"))])
        roller = env.holders()[0]
        attack(roller, "replay", env.si, old)
        async with open_broker(env.grid.addresses) as broker:
            with caplog.at_level(logging.WARNING, "gridfs.client.slots"):
                read = await read_slot(broker, env.cap, PARAMS.n, happy=7, seen=env.seen)
            assert read.seq == 3 and read.rolled_back == {roller.address.node_id}  # type: ignore[union-attr]
            (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert roller.where in warning and "older than version 3" in warning
            assert list(await env.tree(broker).listdir(())) == ["hello", "newer"]
        status, out, err = await env.gridfs("ls", "grid:/")
        assert (status, out.split()) == (0, ["hello", "newer"])
        assert roller.where in err and "refused" in err and "Traceback" not in err


async def test_only_old_versions_reachable_is_an_error_not_the_old_tree(env: Env) -> None:
    """Every holder of version 3 hidden behind replays of version 2: a node
    that saw version 3 refuses to show version 2, and publishes nothing."""
    old = SlotStore(env.holders()[0].dir.storage_path).read(env.si)
    assert old is not None
    with trio.fail_after(TIMEOUT):
        async with open_broker(env.grid.addresses) as broker:
            await env.tree(broker).commit([Put(("newer",), lit(b"3"))])
        for node in env.holders():
            attack(node, "replay", env.si, old)
        before = len(env.writes())
        async with open_broker(env.grid.addresses) as broker:
            with pytest.raises(SlotRollbackError, match="older than version 3") as info:
                await env.tree(broker).commit([Put(("on-old",), lit(b"x"))])
            assert set(info.value.servers) == {s.name for s in broker.permuted(env.si)[: PARAMS.n]}
            with pytest.raises(SlotRollbackError):
                await publish_slot(broker, env.cap, b"x", None, PARAMS.n, 7, seen=env.seen)
        assert len(env.writes()) == before
        status, _, err = await env.gridfs("ls", "grid:/")
        assert "older than version 3 this node has seen" in one_error_line(status, err)
        assert env.seen.get(env.si) == 3


# -- forked -----------------------------------------------------------------------


async def test_racing_writers_of_one_seq_never_share_a_keystream(env: Env) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_broker(env.grid.addresses) as broker:
            base = await read_slot(broker, env.cap, PARAMS.n, happy=PARAMS.happy)
            texts = [b"alice's root " * 4, b"bob's root!! " * 4]
            outcomes: list[object] = []

            async def write(text: bytes) -> None:
                try:
                    outcomes.append(await publish_slot(broker, env.cap, text, base, 10, 7))
                except SlotConflictError as e:
                    outcomes.append(e)

            async with trio.open_nursery() as nursery:
                for text in texts:
                    nursery.start_soon(write, text)
            assert outcomes.count(3) <= 1
            sent = {(w.record, w.signature) for w in env.writes()}
            versions = [verify_version(env.si, r, s) for r, s in sent]
            racing = [v for v in versions if v.seq == 3]
            assert len(racing) == 2  # one version per writer, each sent to servers
            plain = [decrypt(env.cap, v) for v in racing]
            assert sorted(plain) == sorted(texts)
            a, b = racing
            assert a.salt != b.salt and a.payload != b.payload
            keystreams = [
                bytes(x ^ y for x, y in zip(v.payload, p, strict=True))
                for v, p in zip(racing, plain, strict=True)
            ]
            assert keystreams[0] != keystreams[1]
            after = await read_slot(broker, env.cap, PARAMS.n, happy=PARAMS.happy)
            assert after.seq == 3 and after.plaintext in texts


# -- the seen store ---------------------------------------------------------------


def test_seen_only_rises_persists_and_is_private(tmp_path: Path) -> None:
    si, other = b"s" * 16, b"o" * 16
    a = SeenVersions.of_node(tmp_path / "private")
    assert a.get(si) == 0
    assert a.raise_to(si, 5) == 5
    b = SeenVersions.of_node(tmp_path / "private")  # another process of the node
    assert b.raise_to(si, 3) == 5 and b.raise_to(si, 7) == 7
    assert a.raise_to(si, 6) == 7  # a's own memory was 5: it still cannot lower 7
    a.raise_to(other, 2**64 - 1)
    a.close()
    b.close()
    again = SeenVersions.of_node(tmp_path / "private")
    assert (again.get(si), again.get(other)) == (7, 2**64 - 1)
    assert stat.S_IMODE((tmp_path / "private" / "seen.sqlite").stat().st_mode) == 0o600
    again.close()


def test_seen_is_bounded(tmp_path: Path) -> None:
    seen = SeenVersions(tmp_path / "seen.sqlite", max_entries=5)
    for i in range(8):
        seen.raise_to(bytes([i]) * 16, i + 1)
    assert len(seen) == 5
    assert [seen.get(bytes([i]) * 16) for i in range(8)] == [0, 0, 0, 4, 5, 6, 7, 8]
    seen.close()
