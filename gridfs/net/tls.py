"""Mutual TLS on trio streams between members of a grid.

Both ends present member certificates and trust only their grid's CA (see
gridfs/membership.py); a client also checks that the server's key is the one
the node id in its address names.
"""

from __future__ import annotations

import contextlib
import platform
import re
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from ..errors import GridError, NotMemberError
from ..membership import (
    GRID_CERT_NAME,
    MEMBER_CERT_NAME,
    Member,
    MembershipError,
    ca_public,
    grid_id,
    load_certificate,
    verify_member,
)
from .identity import NodeAddress, NodeKey, node_id_from_certificate


class WrongNodeError(GridError):
    """The server presented a key other than the one its address names."""


class ConnectError(GridError):
    """No TLS connection could be made (refused, reset, timed out)."""


class NotGridMemberError(ConnectError):
    """The server is not a member of our grid (its certificate does not
    verify against the grid CA), or not of the kind we asked for."""


class DrainingSSLObject(ssl.SSLObject):
    """An SSLObject whose ``read`` returns all the data already received, not
    just one TLS record.

    ``trio.SSLStream.receive_some`` makes one ``read`` per call, and OpenSSL
    decrypts one record (at most 16 KiB) per read: a 1 MiB block took 64 trips
    through trio's retry loop, its locks and checkpoints, and as many appends
    to the RPC buffer.  Reading on while the incoming buffer holds complete
    records makes it one trip per batch received from the socket.  It is
    installed as our contexts' ``sslobject_class`` (a documented ssl hook), so
    SSLStream's own handshake, close, cancellation and post-handshake handling
    stay as they are: SSLStream sends whatever OpenSSL has to write (a TLS 1.3
    KeyUpdate answer, say) after each ``read``, however many records it took.
    """

    _deferred: ssl.SSLError | None = None
    """An error met after some records were read (a damaged record behind good
    ones), raised by the next ``read`` so that those records are delivered
    first, as one read per record delivered them."""

    def read(self, size: int = 1024, buffer: Any = None) -> Any:
        if buffer is not None:  # trio never reads into a buffer: the stock way
            return super().read(size, buffer)
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        data: bytes = super().read(size)  # nothing complete yet: raises as before
        chunks = [data]
        wanted = size - len(data)
        while data and wanted > 0:
            try:
                data = super().read(wanted)
            except ssl.SSLWantReadError:  # no complete record left
                break
            except ssl.SSLError as e:
                self._deferred = e
                break
            chunks.append(data)  # b"" (the peer's close_notify) ends the loop
            wanted -= len(data)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _context(protocol: int, chain: tuple[Path, Path], anchor: Path | None) -> ssl.SSLContext:
    """TLS 1.3 presenting ``chain`` (certificate, key) and requiring a peer
    certificate signed by ``anchor``, the grid CA: without one, no peer
    certificate verifies and every handshake fails."""
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the node id in the address names the server, not DNS
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(*chain)
    if anchor is not None:
        ctx.load_verify_locations(cafile=str(anchor))
    ctx.sslobject_class = DrainingSSLObject
    return ctx


@dataclass(frozen=True)
class Credentials:
    """A node's TLS material: what it presents and whom it trusts.

    A member presents its member certificate and trusts only its grid's CA,
    as a client and as a server; a node that is no member (no
    ``member.crt``) presents its self-signed node certificate, trusts nobody,
    and so completes no handshake with anyone."""

    client: ssl.SSLContext
    server: ssl.SSLContext
    member: Member | None
    grid_ca: x509.Certificate | None
    grid_public: bytes
    """the grid key (b"" for a non-member)"""

    @property
    def grid_id(self) -> bytes:
        return grid_id(self.grid_public) if self.grid_public else b""

    @classmethod
    def load(cls, private: Path) -> Credentials:
        """From a node's ``private`` directory (``node.key``, ``member.crt``,
        ``grid.crt``)."""
        key_path, member_path = private / "node.key", private / MEMBER_CERT_NAME
        ca_path = private / GRID_CERT_NAME
        if not member_path.exists() or not ca_path.exists():
            chain = (private / "node.crt", key_path)
            return cls(
                _context(ssl.PROTOCOL_TLS_CLIENT, chain, None),
                _context(ssl.PROTOCOL_TLS_SERVER, chain, None),
                None,
                None,
                b"",
            )
        ca = load_certificate(ca_path.read_bytes())
        public = ca_public(ca)
        member = verify_member(load_certificate(member_path.read_bytes()), ca)
        own = NodeKey.from_pem(key_path.read_bytes())
        if own.node_id != member.node_id:
            raise MembershipError(f"{member_path} is not for this node's key")
        chain = (member_path, key_path)
        return cls(
            _context(ssl.PROTOCOL_TLS_CLIENT, chain, ca_path),
            _context(ssl.PROTOCOL_TLS_SERVER, chain, ca_path),
            member,
            ca,
            public,
        )

    def require_member(self, what: str) -> Member:
        """Our own membership, or NotMemberError naming ``what`` (a node dir)."""
        if self.member is None:
            raise NotMemberError(
                f"{what} is not a member of the grid (join with an invite: gridfs init --invite)"
            )
        return self.member

    def peer(self, stream: trio.SSLStream[Any]) -> Member:
        """The member at the other end of a handshaken stream.  OpenSSL checked
        the chain against the grid CA already; this checks the signature
        again, and reads who the certificate names."""
        der = stream.getpeercert(binary_form=True)
        if der is None or self.grid_ca is None:
            raise MembershipError("the peer presented no member certificate")
        return verify_member(load_certificate(der), self.grid_ca)


SOCKET_RECEIVE_SIZE = 256 * 1024
RECORD_SLACK = 17 * 1024
"""More than one TLS record (16 KiB of data, a 5-byte header and at most 256
bytes of tag and padding): at most this much of what a reader waits for can
sit, undecrypted, in the TLS object when it goes back to the socket."""
MAX_LOW_WATER = 1024 * 1024


def _kernel_wakes_readers_under_pressure() -> bool:
    """Linux 5.10 and later wake a reader below its ``SO_RCVLOWAT`` when the
    receive buffer or window runs short; an older kernel could stall it."""
    if not sys.platform.startswith("linux"):
        return False
    numbers = re.match(r"(\d+)\.(\d+)", platform.release())
    return numbers is not None and (int(numbers[1]), int(numbers[2])) >= (5, 10)


LOW_WATER_SAFE = _kernel_wakes_readers_under_pressure()


class LargeReads(trio.abc.HalfCloseableStream):
    """A TCP stream whose default ``receive_some`` takes up to 256 KiB.

    trio's SSLStream refills with ``receive_some()`` and SocketStream's
    default is 64 KiB, so a 1 MiB request took 16 trips through the event
    loop; with bigger reads (and :class:`DrainingSSLObject`) it takes 4."""

    def __init__(self, tcp: trio.SocketStream) -> None:
        self.tcp = tcp
        self.socket = tcp.socket
        self._low_water = 1
        self._marks = LOW_WATER_SAFE

    def wake_after(self, nbytes: int) -> None:
        """The reader cannot use less than ``nbytes`` more plaintext: wake it
        only once about that much has arrived (``SO_RCVLOWAT``), not for each
        64 KiB the loopback delivers; a block write took some twenty wake-ups,
        each a trip through trio's loop and the TLS stream.  The mark stays
        below what the peer still has to send (less a TLS record that may be
        buffered already), so it can never wait for bytes that will not come;
        the peer closing wakes the reader whatever the mark.  Where the mark
        cannot be set, reads go on as before."""
        if not self._marks:
            return
        mark = max(1, min(nbytes - RECORD_SLACK, MAX_LOW_WATER))
        if mark != self._low_water:
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
            except OSError:  # closed, or a stack without the option
                self._marks, self._low_water = False, 1
                with contextlib.suppress(OSError):  # no old mark left behind
                    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                return
            self._low_water = mark

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.tcp.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tcp.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.tcp.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes or SOCKET_RECEIVE_SIZE
        if self._low_water > 1 and self.socket.fileno() != -1:
            # Wait for the mark: a read now would take only what came so far.
            # (A socket closed meanwhile by another task is for the read
            # below to report, as ClosedResourceError.)
            await trio.lowlevel.wait_readable(self.socket)
            size = max(size, self._low_water + RECORD_SLACK)
        return await self.tcp.receive_some(size)

    async def aclose(self) -> None:
        await self.tcp.aclose()


TlsStream = trio.SSLStream[LargeReads]


def wake_after(stream: trio.abc.Stream, nbytes: int) -> None:
    """Tell a TLS stream's socket how much its reader is waiting for (see
    :meth:`LargeReads.wake_after`); other streams have nothing to tell."""
    if isinstance(stream, trio.SSLStream) and isinstance(stream.transport_stream, LargeReads):
        stream.transport_stream.wake_after(nbytes)


def server_side(tcp: trio.SocketStream, ctx: ssl.SSLContext) -> TlsStream:
    """The server's end of an accepted connection (handshake still to do)."""
    return trio.SSLStream(LargeReads(tcp), ctx, server_side=True)


async def connect(
    address: NodeAddress,
    credentials: Credentials,
    timeout: float = 10.0,
    kind: str | None = None,
) -> TlsStream:
    """Open a TLS connection to ``address`` as a member: the server must be
    a member of our grid (of ``kind``, if given) holding the key its address
    names.  Any failure is a GridError (ConnectError, WrongNodeError,
    NotGridMemberError)."""
    where = f"{address.host}:{address.port}"
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(address.host, address.port)
            stream = trio.SSLStream(LargeReads(tcp), credentials.client, server_hostname=None)
            try:
                await stream.do_handshake()
                der = stream.getpeercert(binary_form=True)
                if der is None or node_id_from_certificate(der) != address.node_id:
                    raise WrongNodeError(f"{where} is not node {address.short_id}")
                peer = credentials.peer(stream)
                if kind is not None and peer.kind != kind:
                    raise NotGridMemberError(f"{where} is a {peer.kind} member, not a {kind}")
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    except trio.TooSlowError:
        raise ConnectError(f"{where}: no TLS connection within {timeout:g}s") from None
    except MembershipError as e:
        raise NotGridMemberError(f"{where} is not a member of this grid ({e})") from None
    except (OSError, trio.BrokenResourceError) as e:  # refused; reset during the handshake
        cause = e if isinstance(e, ssl.SSLError) else e.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            message = f"{where} is not a member of this grid ({cause.verify_message})"
            raise NotGridMemberError(message) from None
        raise ConnectError(f"{where}: {e}") from None
    return stream
