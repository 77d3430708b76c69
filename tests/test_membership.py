"""Grid membership: certificates, revocation lists and invites as formats,
and attacks on real servers over loopback TLS by strangers, non-members and
members overstepping their kind."""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from cryptography.hazmat.primitives import serialization

import gridfs.introducer
import gridfs.node
from gridfs.announce import Announcement
from gridfs.client.broker import ServerUnavailable, StorageBroker
from gridfs.client.upload import UploadParams
from gridfs.config import NodeConfig, NodeDir
from gridfs.errors import NotMemberError, UsageError
from gridfs.membership import (
    INVITE_PREFIX,
    GridAuthority,
    GridKey,
    Invite,
    MembershipError,
    RevocationList,
    ca_public,
    load_certificate,
    make_invite,
    verify_member,
    write_membership,
)
from gridfs.net import tls
from gridfs.net.identity import NodeAddress, NodeKey
from gridfs.net.rpc import ConnectionLost, RemoteError, RpcClient
from gridfs.node import run_introducer

from .gridutil import MEMBERS, Grid, open_broker, open_grid, upload_bytes
from .test_protocol import HELLO, frame

TIMEOUT = 30
ADDRESS = NodeAddress(bytes(20), "127.0.0.1", 1234)


# == formats =======================================================================


def test_a_member_certificate_names_its_key_name_and_kind() -> None:
    grid, node = GridKey.generate(), NodeKey.generate()
    member = verify_member(grid.issue(node.public_bytes, "alice", "client"), grid.ca_certificate())
    assert (member.node_id, member.name, member.kind) == (node.node_id, "alice", "client")
    assert ca_public(grid.ca_certificate()) == grid.public_bytes


def test_a_certificate_of_another_grid_is_refused() -> None:
    ours, theirs, node = GridKey.generate(), GridKey.generate(), NodeKey.generate()
    forged = theirs.issue(node.public_bytes, "mallory", "storage")
    with pytest.raises(MembershipError, match="not signed by this grid"):
        verify_member(forged, ours.ca_certificate())


def test_a_member_certificate_is_not_a_grid_ca() -> None:
    grid, node = GridKey.generate(), NodeKey.generate()
    with pytest.raises(MembershipError):
        ca_public(grid.issue(node.public_bytes, "bob", "client"))


def test_bad_names_and_kinds_are_refused() -> None:
    grid, node = GridKey.generate(), NodeKey.generate()
    for name in ("", "../x", "a b", "x" * 64):
        with pytest.raises(UsageError, match="bad member name"):
            grid.issue(node.public_bytes, name, "client")
    with pytest.raises(UsageError, match="kind"):
        grid.issue(node.public_bytes, "carol", "root")


def test_revocation_lists_verify_only_under_their_grid_key() -> None:
    grid, other = GridKey.generate(), GridKey.generate()
    revoked = frozenset({os.urandom(20), os.urandom(20)})
    blob = grid.sign_revocations(3, revoked)
    assert RevocationList.verify(blob, grid.public_bytes) == RevocationList(
        grid.grid_id, 3, revoked
    )
    with pytest.raises(MembershipError, match="not signed by the grid key"):
        RevocationList.verify(blob, other.public_bytes)
    # Signed by a key, but naming another grid: refused as well.
    theirs = RevocationList(grid.grid_id, 9, revoked).sign(other)
    with pytest.raises(MembershipError, match="another grid"):
        RevocationList.verify(theirs, other.public_bytes)
    data, signature = msgpack.unpackb(blob)
    flipped = bytearray(data)
    flipped[-1] ^= 1
    with pytest.raises(MembershipError):
        RevocationList.verify(msgpack.packb([bytes(flipped), signature]), grid.public_bytes)
    with pytest.raises(MembershipError, match="malformed"):
        RevocationList.verify(b"\x93garbage", grid.public_bytes)


def test_an_invite_carries_a_key_and_its_membership() -> None:
    grid = GridKey.generate()
    invite, member = make_invite(grid, ADDRESS, "dave", "storage")
    line = invite.encode()
    assert line.startswith(INVITE_PREFIX) and "\n" not in line and line.isprintable()
    parsed = Invite.decode(line + "\n")
    assert parsed == invite
    assert parsed.key.node_id == member.node_id and parsed.introducer == ADDRESS
    assert ca_public(load_certificate(parsed.grid_cert)) == grid.public_bytes


def test_expired_garbled_and_foreign_invites_are_one_clear_error() -> None:
    grid, other = GridKey.generate(), GridKey.generate()
    invite, _ = make_invite(grid, ADDRESS, "erin", "client", lifetime=60)
    line = invite.encode()
    with pytest.raises(MembershipError, match="expired"):
        Invite.decode(line, now=time.time() + 120)
    with pytest.raises(MembershipError, match="garbled"):
        Invite.decode(line[:-40])
    with pytest.raises(MembershipError, match="garbled"):
        Invite.decode(INVITE_PREFIX + "!!!!")
    with pytest.raises(MembershipError, match="not an invite"):
        Invite.decode("gridfs:chk:abc")
    with pytest.raises(MembershipError, match="version"):
        Invite.decode(line.replace(":v1:", ":v9:"))
    # A certificate of another grid, or for another key, inside a well-formed invite.
    theirs, _ = make_invite(other, ADDRESS, "erin", "client")
    for forged in (
        Invite(**{**invite.__dict__, "member_cert": theirs.member_cert}),
        Invite(**{**invite.__dict__, "node_key": theirs.node_key}),
        Invite(**{**invite.__dict__, "kind": "storage"}),
    ):
        with pytest.raises(MembershipError):
            Invite.decode(forged.encode())
    body = base64.urlsafe_b64decode(line[len(INVITE_PREFIX) :] + "==")
    assert len(body) < 1500  # one line a person can copy


def test_the_ledger_names_each_member_once(tmp_path: Path) -> None:
    authority = GridAuthority(tmp_path / "private")
    authority.create()
    assert (authority.key_path.stat().st_mode & 0o777) == 0o600
    first = Invite.decode(authority.invite(ADDRESS, "client", None).encode())
    second = Invite.decode(authority.invite(ADDRESS, "client", None).encode())
    storage = Invite.decode(authority.invite(ADDRESS, "storage", "disk-a").encode())
    assert (first.name, second.name, storage.name) == ("client-1", "client-2", "disk-a")
    with pytest.raises(UsageError, match="exists already"):
        authority.invite(ADDRESS, "storage", "disk-a")
    blob, member = authority.revoke("client-2")
    assert member.node_id == second.key.node_id
    assert RevocationList.verify(blob, authority.key().public_bytes).revoked == {member.node_id}
    blob, _ = authority.revoke("disk-a")
    assert RevocationList.verify(blob, authority.key().public_bytes).seq == 2
    assert authority.revocations().revoked == {second.key.node_id, storage.key.node_id}
    with pytest.raises(UsageError, match="no member named"):
        authority.revoke("nobody")


# == attacks on real servers =========================================================


@contextlib.asynccontextmanager
async def rpc_as(
    address: NodeAddress, credentials: tls.Credentials, kind: str | None = None
) -> AsyncIterator[RpcClient]:
    """A member's RPC connection to a server node."""
    stream = await tls.connect(address, credentials, kind=kind)
    rpc = RpcClient(stream, default_timeout=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(rpc.run)
        try:
            yield rpc
        finally:
            await rpc.aclose()
            nursery.cancel_scope.cancel()


def storage_member(private: Path, name: str = "") -> tuple[tls.Credentials, NodeKey]:
    credentials = MEMBERS.credentials("storage", name or None, private=private)
    return credentials, NodeKey.from_pem((private / "node.key").read_bytes())


def signed(key: NodeKey, seq: int, nickname: str = "") -> dict[str, bytes]:
    ann = Announcement(
        NodeAddress(key.node_id, "127.0.0.1", 9), key.public_bytes, nickname, {}, seq
    )
    data, signature = ann.sign(key)
    return {"announcement": data, "signature": signature}


async def start_introducer(nursery: trio.Nursery, root: Path) -> tuple[NodeDir, NodeAddress]:
    node = NodeDir(root / "introducer")
    node.create(NodeConfig("introducer", "introducer"))
    MEMBERS.enroll(node, "introducer", "introducer")
    address: NodeAddress = await nursery.start(run_introducer, node)
    return node, address


class Admitted:
    """Records every connection a server node admitted to serve_rpc."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = gridfs.node.serve_rpc

        async def recording(*args: Any, **kwargs: Any) -> None:
            self.count += 1
            await real(*args, **kwargs)

        monkeypatch.setattr(gridfs.node, "serve_rpc", recording)


async def stranger_talks(address: NodeAddress, chain: tuple[Path, Path] | None) -> bytes:
    """A stranger's TLS client (its own certificate, or none; trusting
    anything) sends hello and an announcement, and collects what comes back."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if chain is not None:
        ctx.load_cert_chain(*chain)
    tcp = await trio.open_tcp_stream(address.host, address.port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=None)
    received = b""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.do_handshake()  # (TLS 1.3: the client's side ends first)
        key = NodeKey.generate()  # and announces itself, for good measure
        await stream.send_all(HELLO + frame([0, 2, "announce", signed(key, 1)]))
        while data := await stream.receive_some(65536):
            received += data
    await trio.aclose_forcefully(stream)
    return received


async def test_a_stranger_gets_nothing_from_a_storage_server_or_the_introducer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admitted = Admitted(monkeypatch)
    self_signed = NodeKey.generate().write(tmp_path / "stranger")
    other_grid = GridKey.generate()
    foreign_key = NodeKey.generate()
    foreign_key.write(tmp_path / "foreign")
    cert = other_grid.issue(foreign_key.public_bytes, "client-1", "client")
    (tmp_path / "foreign" / "member.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    chains = [
        (self_signed[1], self_signed[0]),
        (tmp_path / "foreign" / "member.crt", tmp_path / "foreign" / "node.key"),
        None,
    ]
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=1) as grid, trio.open_nursery() as nursery:
            _, introducer = await start_introducer(nursery, tmp_path)
            for address in (grid.addresses[0], introducer):
                for chain in chains:
                    assert await stranger_talks(address, chain) == b""
            assert admitted.count == 0
            async with rpc_as(introducer, MEMBERS.client()) as rpc:
                peers = await rpc.call("get_peers", {"after": 0, "wait": 0, "start": b""})
                assert peers["announcements"] == []
            async with open_broker(grid.addresses) as broker:  # a member is served
                assert "total" in await broker.servers[grid.addresses[0].node_id].call("stats", {})
            assert admitted.count == 2  # the member's two connections
            nursery.cancel_scope.cancel()


async def test_a_node_without_membership_cannot_connect_to_anyone(tmp_path: Path) -> None:
    node = NodeDir(tmp_path / "loner")
    node.create(NodeConfig("client", "loner", servers=[str(ADDRESS)]))
    credentials = node.credentials()
    assert credentials.member is None
    with pytest.raises(NotMemberError, match="not a member"):
        credentials.require_member(str(node.path))
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=1) as grid:
            with pytest.raises(tls.NotGridMemberError):
                await tls.connect(grid.addresses[0], credentials)
            # A server of another grid is no member of ours: not used.
            async with open_broker(grid.addresses, credentials=foreign_client(tmp_path)) as b:
                with pytest.raises(ServerUnavailable, match="not a member of this grid"):
                    await b.servers[grid.addresses[0].node_id].call("stats", {})


def foreign_client(tmp_path: Path) -> tls.Credentials:
    """A client member of another grid."""
    grid, key = GridKey.generate(), NodeKey.generate()
    private = tmp_path / "foreign-client"
    key.write(private)
    write_membership(private, grid.ca_certificate(), grid.issue(key.public_bytes, "x", "client"))
    return tls.Credentials.load(private)


async def test_only_a_storage_member_announces_and_only_itself(tmp_path: Path) -> None:
    storage, key = storage_member(tmp_path / "storage")
    other = NodeKey.generate()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            _, introducer = await start_introducer(nursery, tmp_path)
            async with rpc_as(introducer, MEMBERS.client(), kind="introducer") as client:
                with pytest.raises(RemoteError) as caught:
                    await client.call("announce", signed(NodeKey.generate(), 1))
                assert caught.value.code == "not-member"
            async with rpc_as(introducer, storage, kind="introducer") as rpc:
                with pytest.raises(RemoteError) as caught:
                    await rpc.call("announce", signed(other, 1))
                assert caught.value.code == "bad-announcement"
                await rpc.call("announce", signed(key, 1))
                peers = await rpc.call("get_peers", {"after": 0, "wait": 0, "start": b""})
                assert len(peers["announcements"]) == 1
            nursery.cancel_scope.cancel()


async def test_a_thousand_announcements_leave_one_per_member(tmp_path: Path) -> None:
    """1,100 announcements over one storage member's connection (its own,
    again and again, and of made-up servers) leave one entry: get_peers stays
    small."""
    storage, key = storage_member(tmp_path / "storage")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, introducer = await start_introducer(nursery, tmp_path)
            async with rpc_as(introducer, storage) as rpc:
                refused = 0
                for i in range(1100):
                    if i % 2:
                        try:
                            await rpc.call("announce", signed(NodeKey.generate(), 1, "x" * 60))
                        except RemoteError:
                            refused += 1
                    else:
                        await rpc.call("announce", signed(key, i + 1, "x" * 60))
                assert refused == 550
                peers = await rpc.call("get_peers", {"after": 0, "wait": 0, "start": b""})
                assert len(peers["announcements"]) == 1 and peers["next"] is None
            nursery.cancel_scope.cancel()


async def test_peer_lists_come_in_pages_and_the_broker_reads_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers = 9
    members = [storage_member(tmp_path / f"s{i}") for i in range(servers)]
    one = len(signed(members[0][1], 1, "n" * 40)["announcement"]) + 64
    monkeypatch.setattr(gridfs.introducer, "PAGE_BYTES", 2 * one + 10)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            _, introducer = await start_introducer(nursery, tmp_path)
            held: list[RpcClient] = []
            for credentials, key in members:
                rpc = await nursery_rpc(nursery, introducer, credentials)
                await rpc.call("announce", signed(key, 1, "n" * 40))
                held.append(rpc)
            pages, start = [], b""
            while True:
                reply = await held[0].call("get_peers", {"after": 0, "wait": 0, "start": start})
                pages.append(len(reply["announcements"]))
                if reply["next"] is None:
                    break
                start = reply["next"]
            assert pages == [2, 2, 2, 2, 1]
            broker = StorageBroker(nursery, MEMBERS.client(), introducer=introducer)
            assert await broker.wait_for_servers(servers, 10) == servers
            assert set(broker.servers) == {key.node_id for _, key in members}
            nursery.cancel_scope.cancel()


async def nursery_rpc(
    nursery: trio.Nursery, address: NodeAddress, credentials: tls.Credentials
) -> RpcClient:
    rpc = RpcClient(await tls.connect(address, credentials), default_timeout=10)
    await nursery.start(rpc.run)
    return rpc


async def wait_closed(rpc: RpcClient, seconds: float = 5) -> None:
    with trio.fail_after(seconds):
        await rpc.wait_closed()


async def test_a_revoked_client_is_refused_and_cut_off_while_others_go_on(
    tmp_path: Path,
) -> None:
    """Written into the servers' directories, a revocation list closes the
    revoked member's live connections and refuses its new ones (with a
    'not-member' answer, so its broker can say why); another member goes on."""
    alice = MEMBERS.credentials("client", "alice")
    bob = MEMBERS.credentials("client", "bob")
    assert alice.member is not None
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=3) as grid, trio.open_nursery() as nursery:
            live = [await nursery_rpc(nursery, a, alice) for a in grid.addresses]
            blob = MEMBERS.key.sign_revocations(1, frozenset({alice.member.node_id}))
            for node in grid.nodes:
                (node.dir.private / "revocations").write_bytes(blob)
            for rpc in live:
                await wait_closed(rpc)
            for address in grid.addresses:
                with pytest.raises(ConnectionLost, match="not-member"):
                    await nursery_rpc(nursery, address, alice)
                rpc = await nursery_rpc(nursery, address, bob)
                assert "total" in await rpc.call("stats", {})
            async with open_broker(grid.addresses, credentials=alice) as broker:
                with pytest.raises(ServerUnavailable):
                    await broker.servers[grid.addresses[0].node_id].call("stats", {})
                assert isinstance(broker.refusal, NotMemberError)
                assert "revoked" in str(broker.refusal)
            nursery.cancel_scope.cancel()


async def test_revocations_reach_storage_servers_through_the_introducer(
    tmp_path: Path,
) -> None:
    """``introducer revoke`` writes the list beside the grid key only; the
    introducer serves it, storage servers fetch it (and keep a copy), and
    clients stop using a revoked server."""
    carol = MEMBERS.credentials("client", "carol")
    assert carol.member is not None
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            intro, introducer = await start_introducer(nursery, tmp_path)
            grid = Grid(nursery, tmp_path / "grid")
            await grid.add_servers(2, introducer=str(introducer))
            broker = StorageBroker(nursery, MEMBERS.client(), introducer=introducer)
            assert await broker.wait_for_servers(2, 10) == 2
            revoked_server = grid.nodes[1].dir.key().node_id
            revoked = frozenset({carol.member.node_id, revoked_server})
            (intro.private / "revocations").write_bytes(MEMBERS.key.sign_revocations(1, revoked))
            copy = grid.nodes[0].dir.private / "revocations"
            while not copy.exists() or revoked_server in broker.servers:
                await trio.sleep(0.05)
            assert RevocationList.verify(copy.read_bytes(), MEMBERS.key.public_bytes).seq == 1
            with pytest.raises(ConnectionLost, match="not-member"):
                await nursery_rpc(nursery, grid.addresses[0], carol)
            with pytest.raises(ConnectionLost, match="not-member"):
                await nursery_rpc(nursery, introducer, carol)
            # The revoked server's announcement is gone from the introducer too.
            rpc = await nursery_rpc(nursery, introducer, MEMBERS.client())
            peers = await rpc.call("get_peers", {"after": 0, "wait": 0, "start": b""})
            assert len(peers["announcements"]) == 1
            nursery.cancel_scope.cancel()


async def test_an_uninvited_storage_server_gets_no_share(tmp_path: Path) -> None:
    """A storage server outside the grid, in a client's static server list:
    its TLS certificate does not verify, so no share lands on it and nothing
    is read from it; the upload goes to the members."""
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=4) as grid:
            loner = NodeDir(tmp_path / "loner")
            loner.create(NodeConfig("storage", "loner", reserved_space=0))
            address: NodeAddress = await grid.nursery.start(gridfs.node.run_storage, loner)
            params = UploadParams(2, 3, 5, 1 << 16)
            async with open_broker([*grid.addresses, address]) as broker:
                report = await upload_bytes(
                    broker, os.urandom(200_000), tmp_path / "t", params, b"s" * 32
                )
                assert report.cap is not None
            assert not (loner.storage_path / "shares").exists() or not any(
                p.is_file() for p in (loner.storage_path / "shares").rglob("*")
            )
            assert len(grid.all_shares()) == 5


async def test_members_of_the_wrong_kind_are_neither_served_nor_used(tmp_path: Path) -> None:
    """A storage member calling a storage server as a client is refused; a
    client member posing as a storage server is not used."""
    other_storage, _ = storage_member(tmp_path / "other-storage")
    impostor_dir = tmp_path / "impostor"
    impostor = MEMBERS.credentials("client", private=impostor_dir)
    impostor_id = NodeKey.from_pem((impostor_dir / "node.key").read_bytes()).node_id

    async def serve(tcp: trio.SocketStream) -> None:
        stream = tls.server_side(tcp, impostor.server)
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.do_handshake()
            await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=1) as grid, trio.open_nursery() as nursery:
            with pytest.raises(ConnectionLost, match="not-member"):
                await nursery_rpc(nursery, grid.addresses[0], other_storage)
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            fake = NodeAddress(impostor_id, "127.0.0.1", port)
            with pytest.raises(tls.NotGridMemberError, match="client member, not a storage"):
                await tls.connect(fake, MEMBERS.client(), kind="storage")
            nursery.cancel_scope.cancel()
        node = NodeDir(tmp_path / "misfit")
        node.create(NodeConfig("storage", "misfit"))
        MEMBERS.enroll(node, "client")
        with pytest.raises(UsageError, match="membership of a client"):
            await gridfs.node.run_storage(node)
