"""TLS on trio streams, authenticated by node id instead of by a CA."""

from __future__ import annotations

import ssl
from pathlib import Path

import trio

from ..errors import GridError
from .identity import NodeAddress, node_id_from_certificate


class WrongNodeError(GridError):
    """The server presented a key other than the one its address names."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    return ctx


def client_context() -> ssl.SSLContext:
    # No CA: the certificate is checked against the node id in the address
    # after the handshake, which proved the server holds the certified key.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_CLIENT_CTX = client_context()


async def connect(address: NodeAddress, timeout: float = 10.0) -> trio.SSLStream[trio.SocketStream]:
    """Open a TLS connection to ``address`` and check the server's key."""
    with trio.fail_after(timeout):
        tcp = await trio.open_tcp_stream(address.host, address.port)
        stream = trio.SSLStream(tcp, _CLIENT_CTX, server_hostname=None)
        try:
            await stream.do_handshake()
            der = stream.getpeercert(binary_form=True)
            if der is None or node_id_from_certificate(der) != address.node_id:
                where = f"{address.host}:{address.port}"
                raise WrongNodeError(f"{where} is not node {address.short_id}")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return stream
