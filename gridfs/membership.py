"""Grid membership: the grid key, member certificates, revocations and invites.

A grid is an Ed25519 **grid key**.  Its self-signed X.509 **grid CA
certificate** is the only trust anchor of the grid's TLS: every member node
(client, storage server, introducer) holds a **member certificate** for its
own node key, signed by the grid key, naming the member (CN) and its kind
(OU).  The grid key signs a **revocation list** too (node ids that are no
longer members, with a sequence number so a newer list replaces an older
one).  An **invite** is one printable line carrying all a node needs to join:
the introducer's address, the grid CA certificate, and a fresh node key with
its member certificate.  See docs/formats.md, "Membership".
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from .caps import b32decode, b32encode
from .errors import FormatError, GridError, UsageError
from .fileutil import atomic_output
from .hashes import NODE_ID_SIZE, TAG_GRID_ID, TAG_REVOCATIONS, node_id, tagged_hash
from .net.identity import NodeAddress, NodeKey, SigningKey, raw_public

MEMBER_KINDS = ("client", "storage", "introducer")
CERT_DAYS = 365 * 100
"""Certificates do not expire in practice: membership ends by revocation."""
INVITE_PREFIX = "gridfs-invite:v1:"
INVITE_LIFETIME = 7 * 24 * 3600
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
GRID_KEY_NAME = "grid.key"
GRID_CERT_NAME = "grid.crt"
MEMBER_CERT_NAME = "member.crt"
LEDGER_NAME = "members.json"
REVOCATIONS_NAME = "revocations"


class MembershipError(GridError):
    """A certificate, invite or revocation list does not verify."""


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"bad member name {name[:70]!r}: 1-63 letters, digits, '.', '_' or '-'")
    return name


def grid_id(public: bytes) -> bytes:
    """The 20-byte id of the grid whose key is ``public``."""
    return tagged_hash(TAG_GRID_ID, public)[:NODE_ID_SIZE]


@dataclass(frozen=True)
class Member:
    """A verified member certificate: who it names."""

    node_id: bytes
    name: str
    kind: str

    @property
    def short_id(self) -> str:
        return b32encode(self.node_id)[:8]

    def __str__(self) -> str:
        return f"{self.kind} {self.name} ({self.short_id})"


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(
        now + datetime.timedelta(days=CERT_DAYS)
    )


@dataclass(frozen=True)
class GridKey(SigningKey):
    """The grid's signing key (held by the introducer's operator)."""

    WHAT: ClassVar[str] = "grid key"

    @property
    def grid_id(self) -> bytes:
        return grid_id(self.public_bytes)

    def _name(self) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gridfs"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"grid {b32encode(self.grid_id)}"),
            ]
        )

    def ca_certificate(self) -> x509.Certificate:
        """The grid CA certificate: self-signed, CA=True, for certificates only."""
        public = self.private.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(self._name())
            .issuer_name(self._name())
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        return _validity(builder).sign(self.private, None)

    def issue(self, public: bytes, name: str, kind: str) -> x509.Certificate:
        """A member certificate for the node key ``public``."""
        if kind not in MEMBER_KINDS:
            raise UsageError(f"unknown member kind {kind!r}")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gridfs"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                x509.NameAttribute(NameOID.COMMON_NAME, check_name(name)),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name())
            .public_key(Ed25519PublicKey.from_public_bytes(public))
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private.public_key()),
                critical=False,
            )
        )
        return _validity(builder).sign(self.private, None)

    def sign_revocations(self, seq: int, revoked: frozenset[bytes]) -> bytes:
        return RevocationList(self.grid_id, seq, revoked).sign(self)


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes (FormatError if neither)."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise FormatError("not an X.509 certificate") from None


def ca_public(ca: x509.Certificate) -> bytes:
    """The grid public key of a grid CA certificate (which must be one)."""
    public = ca.public_key()
    if not isinstance(public, Ed25519PublicKey):
        raise MembershipError("the grid certificate does not carry an Ed25519 key")
    try:
        ca.verify_directly_issued_by(ca)
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        raise MembershipError("the grid certificate is not a self-signed grid CA") from None
    if not constraints.ca:
        raise MembershipError("the grid certificate is not a CA certificate")
    return raw_public(public)


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        raise MembershipError("a member certificate names one member of one kind")
    return str(values[0].value)


def verify_member(cert: x509.Certificate, ca: x509.Certificate) -> Member:
    """The member a certificate names, if the grid key ``ca`` signed it for an
    Ed25519 key, as a leaf, and it is in its validity period."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise MembershipError("the certificate is not signed by this grid's key") from None
    public = cert.public_key()
    if not isinstance(public, Ed25519PublicKey):
        raise MembershipError("a member certificate must carry an Ed25519 key")
    try:
        ca_flag = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca_flag = True
    if ca_flag:
        raise MembershipError("a member certificate must not be a CA certificate")
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise MembershipError("the member certificate is outside its validity period")
    kind = _attribute(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if kind not in MEMBER_KINDS:
        raise MembershipError(f"unknown member kind {kind[:20]!r}")
    return Member(node_id(raw_public(public)), _attribute(cert.subject, NameOID.COMMON_NAME), kind)


# -- revocation lists ---------------------------------------------------------
@dataclass(frozen=True)
class RevocationList:
    """Node ids the grid key no longer admits; a higher ``seq`` supersedes."""

    grid: bytes
    seq: int
    revoked: frozenset[bytes]

    def sign(self, key: GridKey) -> bytes:
        data = msgpack.packb(
            {"grid": self.grid, "seq": self.seq, "revoked": sorted(self.revoked), "version": 1}
        )
        signature = key.private.sign(tagged_hash(TAG_REVOCATIONS, data))
        return msgpack.packb([data, signature])

    @classmethod
    def verify(cls, blob: bytes, grid_public: bytes) -> RevocationList:
        """Parse and check a signed list of the grid with key ``grid_public``."""
        try:
            data, signature = msgpack.unpackb(blob)
            Ed25519PublicKey.from_public_bytes(grid_public).verify(
                signature, tagged_hash(TAG_REVOCATIONS, data)
            )
            d = msgpack.unpackb(data)
            revoked = frozenset(bytes(x) for x in d["revoked"])
            result = cls(bytes(d["grid"]), int(d["seq"]), revoked)
        except InvalidSignature:
            raise MembershipError("the revocation list is not signed by the grid key") from None
        except Exception as e:
            raise MembershipError(f"malformed revocation list: {type(e).__name__}") from None
        if result.grid != grid_id(grid_public):
            raise MembershipError("the revocation list is for another grid")
        if d.get("version") != 1 or any(len(x) != NODE_ID_SIZE for x in revoked):
            raise MembershipError("malformed revocation list")
        return result


EMPTY_SEQ = 0


# -- invites ----------------------------------------------------------------
@dataclass(frozen=True)
class Invite:
    """What a new member needs: where the grid is, its CA, and its own key
    and member certificate (made by the inviter)."""

    introducer: NodeAddress
    grid_cert: bytes
    """DER of the grid CA certificate"""
    kind: str
    name: str
    node_key: bytes
    """the 32-byte Ed25519 private key the new node will use"""
    member_cert: bytes
    """DER of its member certificate"""
    expires: int
    """Unix time after which the invite is refused"""

    def encode(self) -> str:
        body = msgpack.packb(
            {
                "introducer": str(self.introducer),
                "grid": self.grid_cert,
                "kind": self.kind,
                "name": self.name,
                "key": self.node_key,
                "cert": self.member_cert,
                "expires": self.expires,
            }
        )
        return INVITE_PREFIX + base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str, now: float | None = None) -> Invite:
        """Parse and check an invite: its certificate must be the grid's, for
        its key, and it must not have expired (MembershipError otherwise)."""
        text = text.strip()
        if not text.startswith(INVITE_PREFIX):
            if text.startswith("gridfs-invite:"):
                raise MembershipError("this invite is of a version this gridfs does not read")
            raise MembershipError("not an invite (it starts with gridfs-invite:v1:)")
        try:
            b64 = text[len(INVITE_PREFIX) :]
            body = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
            d = msgpack.unpackb(body)
            invite = cls(
                NodeAddress.parse(d["introducer"]),
                bytes(d["grid"]),
                str(d["kind"]),
                str(d["name"]),
                bytes(d["key"]),
                bytes(d["cert"]),
                int(d["expires"]),
            )
            ca = x509.load_der_x509_certificate(invite.grid_cert)
            cert = x509.load_der_x509_certificate(invite.member_cert)
            key = Ed25519PrivateKey.from_private_bytes(invite.node_key)
        except Exception:
            raise MembershipError("the invite is garbled (was it copied whole?)") from None
        if (time.time() if now is None else now) > invite.expires:
            raise MembershipError("the invite has expired; ask for a new one")
        ca_public(ca)
        member = verify_member(cert, ca)
        if member.node_id != node_id(raw_public(key.public_key())):
            raise MembershipError("the invite's certificate is not for its key")
        if (member.kind, member.name) != (invite.kind, invite.name):
            raise MembershipError("the invite's certificate names another member")
        return invite

    @property
    def key(self) -> NodeKey:
        return NodeKey(Ed25519PrivateKey.from_private_bytes(self.node_key))


def make_invite(
    key: GridKey, introducer: NodeAddress, name: str, kind: str, lifetime: float = INVITE_LIFETIME
) -> tuple[Invite, Member]:
    """A fresh node key and its member certificate, packed as an invite."""
    node = NodeKey.generate()
    cert = key.issue(node.public_bytes, name, kind)
    der = serialization.Encoding.DER
    invite = Invite(
        introducer,
        key.ca_certificate().public_bytes(der),
        kind,
        name,
        node.private.private_bytes(
            der.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        ),
        cert.public_bytes(der),
        int(time.time() + lifetime),
    )
    return invite, Member(node.node_id, name, kind)


# -- what lives in node directories ------------------------------------------
def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_output(path, mode) as f:
        f.write(data)


def write_membership(private: Path, ca: x509.Certificate, cert: x509.Certificate) -> None:
    """Install the grid CA and a member certificate in a node's ``private``."""
    pem = serialization.Encoding.PEM
    _write_private(private / GRID_CERT_NAME, ca.public_bytes(pem), 0o644)
    _write_private(private / MEMBER_CERT_NAME, cert.public_bytes(pem), 0o644)


def install_invite(private: Path, invite: Invite) -> None:
    """Give a new node the invite's key, grid CA and member certificate."""
    invite.key.write(private)
    write_membership(
        private,
        x509.load_der_x509_certificate(invite.grid_cert),
        x509.load_der_x509_certificate(invite.member_cert),
    )


class GridAuthority:
    """The grid key and what its holder keeps beside it in the introducer's
    ``private`` directory: the ledger of issued members and the revocation
    list.  Only one process (the CLI of the key's holder) writes them."""

    def __init__(self, private: Path) -> None:
        self.private = Path(private)

    @property
    def key_path(self) -> Path:
        return self.private / GRID_KEY_NAME

    @property
    def ledger_path(self) -> Path:
        return self.private / LEDGER_NAME

    @property
    def revocations_path(self) -> Path:
        return self.private / REVOCATIONS_NAME

    def exists(self) -> bool:
        return self.key_path.exists()

    def create(self) -> GridKey:
        if self.exists():
            raise UsageError(f"{self.key_path} already exists")
        key = GridKey.generate()
        _write_private(self.key_path, key.private_pem())
        pem = serialization.Encoding.PEM
        _write_private(self.private / GRID_CERT_NAME, key.ca_certificate().public_bytes(pem), 0o644)
        return key

    def key(self) -> GridKey:
        try:
            return GridKey.from_pem(self.key_path.read_bytes())
        except FileNotFoundError:
            raise UsageError(f"no grid key in {self.private} (not a grid's introducer)") from None

    def ca(self) -> x509.Certificate:
        return load_certificate((self.private / GRID_CERT_NAME).read_bytes())

    def ledger(self) -> dict[str, dict[str, Any]]:
        """name → {"node_id": b32, "kind": ..., "issued": unix time, "revoked": bool}"""
        try:
            return dict(json.loads(self.ledger_path.read_text()))
        except FileNotFoundError:
            return {}

    def _save_ledger(self, ledger: dict[str, dict[str, Any]]) -> None:
        _write_private(self.ledger_path, json.dumps(ledger, indent=1, sort_keys=True).encode())

    def fresh_name(self, kind: str) -> str:
        ledger = self.ledger()
        n = 1 + sum(1 for entry in ledger.values() if entry["kind"] == kind)
        while f"{kind}-{n}" in ledger:
            n += 1
        return f"{kind}-{n}"

    def record(self, member: Member) -> None:
        """Add an issued member to the ledger (a name is issued once)."""
        ledger = self.ledger()
        if member.name in ledger:
            raise UsageError(f"a member named {member.name} exists already")
        ledger[member.name] = {
            "node_id": b32encode(member.node_id),
            "kind": member.kind,
            "issued": int(time.time()),
            "revoked": False,
        }
        self._save_ledger(ledger)

    def issue_local(self, public: bytes, name: str, kind: str) -> tuple[x509.Certificate, Member]:
        """Issue (and record) a certificate for a node whose key we hold; a
        member the ledger has already (same name and key) gets a new copy."""
        key = self.key()
        member = Member(node_id(public), check_name(name), kind)
        entry = self.ledger().get(name)
        if entry is None or entry["node_id"] != b32encode(member.node_id):
            self.record(member)
        return key.issue(public, name, kind), member

    def invite(self, introducer: NodeAddress, kind: str, name: str | None) -> Invite:
        key = self.key()
        name = check_name(name) if name else self.fresh_name(kind)
        if name in self.ledger():
            raise UsageError(f"a member named {name} exists already")
        invite, member = make_invite(key, introducer, name, kind)
        self.record(member)
        return invite

    def revocations(self) -> RevocationList:
        key = self.key()
        try:
            return RevocationList.verify(self.revocations_path.read_bytes(), key.public_bytes)
        except FileNotFoundError:
            return RevocationList(key.grid_id, EMPTY_SEQ, frozenset())

    def revoke(self, name: str) -> tuple[bytes, Member]:
        """Revoke the member ``name``: the new signed list, and who it was."""
        ledger = self.ledger()
        entry = ledger.get(name)
        if entry is None:
            raise UsageError(f"no member named {name[:70]!r} (see the ledger {self.ledger_path})")
        member = Member(b32decode(entry["node_id"], NODE_ID_SIZE, "node id"), name, entry["kind"])
        old = self.revocations()
        blob = self.key().sign_revocations(old.seq + 1, old.revoked | {member.node_id})
        _write_private(self.revocations_path, blob, 0o644)
        entry["revoked"] = True
        self._save_ledger(ledger)
        return blob, member
