"""Node identity: an Ed25519 key, its 20-byte node id, and node addresses.

A node address ``gridfs://<node id>@host:port`` (the seed's PBURL) names the
key the node must present: the TLS certificate is self-signed with the node
key, and a client refuses a server whose certificate carries another key.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from ..caps import b32decode, b32encode
from ..errors import CapError, UsageError
from ..hashes import NODE_ID_SIZE, node_id


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key: a node's, or a grid's (gridfs.membership)."""

    private: Ed25519PrivateKey
    WHAT: ClassVar[str] = "signing key"

    @classmethod
    def generate(cls) -> Self:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_bytes(self) -> bytes:
        return raw_public(self.private.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> Self:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise UsageError(f"{cls.WHAT} is not an Ed25519 key")
        return cls(key)


@dataclass(frozen=True)
class NodeKey(SigningKey):
    WHAT: ClassVar[str] = "node key"

    @property
    def node_id(self) -> bytes:
        return node_id(self.public_bytes)

    def certificate_pem(self) -> bytes:
        """A self-signed certificate for TLS; only its key matters."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gridfs node")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365 * 100))
            .sign(self.private, None)
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``node.key`` (mode 0600) and ``node.crt`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, cert_path = directory / "node.key", directory / "node.crt"
        key_path.touch(mode=0o600)
        key_path.chmod(0o600)
        key_path.write_bytes(self.private_pem())
        cert_path.write_bytes(self.certificate_pem())
        return key_path, cert_path


def node_id_from_certificate(der: bytes) -> bytes:
    """The node id of the key a DER certificate carries (any other key type is
    refused)."""
    public = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(public, Ed25519PublicKey):
        raise UsageError("peer certificate does not carry an Ed25519 key")
    return node_id(raw_public(public))


_ADDR_RE = re.compile(r"gridfs://([a-z2-7]{32})@(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


@dataclass(frozen=True)
class NodeAddress:
    node_id: bytes
    host: str
    port: int

    def __post_init__(self) -> None:
        if len(self.node_id) != NODE_ID_SIZE:
            raise CapError("node id must be 20 bytes")
        if not 0 < self.port < 65536:
            raise CapError(f"port {self.port} out of range")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"gridfs://{b32encode(self.node_id)}@{host}:{self.port}"

    @property
    def short_id(self) -> str:
        return b32encode(self.node_id)[:8]

    @classmethod
    def parse(cls, text: str) -> NodeAddress:
        m = _ADDR_RE.fullmatch(text.strip())
        if m is None:
            raise CapError(f"not a node address (gridfs://NODEID@HOST:PORT): {text[:60]!r}")
        host = m[2].strip("[]")
        return cls(b32decode(m[1], NODE_ID_SIZE, "node id"), host, int(m[3]))
