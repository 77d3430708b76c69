"""TLS on trio streams, authenticated by node id instead of by a CA."""

from __future__ import annotations

import contextlib
import platform
import re
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import trio

from ..errors import GridError
from .identity import NodeAddress, node_id_from_certificate


class WrongNodeError(GridError):
    """The server presented a key other than the one its address names."""


class ConnectError(GridError):
    """No TLS connection could be made (refused, reset, timed out)."""


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


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.sslobject_class = DrainingSSLObject
    return ctx


def client_context() -> ssl.SSLContext:
    # No CA: the certificate is checked against the node id in the address
    # after the handshake, which proved the server holds the certified key.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.sslobject_class = DrainingSSLObject
    return ctx


_CLIENT_CTX = client_context()
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


async def connect(address: NodeAddress, timeout: float = 10.0) -> TlsStream:
    """Open a TLS connection to ``address`` and check the server's key; any
    failure is a GridError (ConnectError, WrongNodeError)."""
    where = f"{address.host}:{address.port}"
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(address.host, address.port)
            stream = trio.SSLStream(LargeReads(tcp), _CLIENT_CTX, server_hostname=None)
            try:
                await stream.do_handshake()
                der = stream.getpeercert(binary_form=True)
                if der is None or node_id_from_certificate(der) != address.node_id:
                    raise WrongNodeError(f"{where} is not node {address.short_id}")
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    except trio.TooSlowError:
        raise ConnectError(f"{where}: no TLS connection within {timeout:g}s") from None
    except (OSError, trio.BrokenResourceError) as e:  # refused; reset during the handshake
        raise ConnectError(f"{where}: {e}") from None
    return stream
