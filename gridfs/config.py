"""Node directories: ``gridfs.toml``, keys under ``private/``, and state files.

A node directory looks like::

    gridfs.toml          configuration (TOML), see docs/configuration.md
    private/node.key     Ed25519 node key, mode 0600
    private/node.crt     self-signed certificate for that key (a non-member's TLS)
    private/grid.crt     the grid CA certificate (members; see gridfs/membership.py)
    private/member.crt   this node's member certificate, signed by the grid key
    private/grid.key     the grid key (the introducer of a grid only), mode 0600
    private/members.json the ledger of issued members (beside the grid key)
    private/revocations  the newest signed revocation list this node knows
    private/convergence  client convergence secret, mode 0600
    private/lease        client lease secret (renew/cancel secrets derive from it)
    node.url             the node's address, written once it listens
    node.pid             pid of the running node
    node.log             its log
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .codec import DEFAULT_K, DEFAULT_N, DEFAULT_SEGMENT_SIZE, check_k_n
from .errors import ParamsError, UsageError
from .fileutil import atomic_output, make_private_dir
from .membership import Invite, install_invite
from .net.identity import NodeAddress, NodeKey
from .net.tls import Credentials

CONFIG_NAME = "gridfs.toml"
DEFAULT_HAPPY = 7
KINDS = ("introducer", "storage", "client")


def default_node_dir() -> Path:
    env = os.environ.get("GRIDFS_NODE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "gridfs" / "client"


def resolve_node_dir(arg: str | Path | None) -> Path:
    """``--node DIR``, else ``$GRIDFS_NODE``, else the user's default node."""
    return Path(arg) if arg else default_node_dir()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(tables: dict[str, dict[str, Any]]) -> str:
    """TOML for a two-level mapping of scalars and lists (all our config needs)."""
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        out.append("")
    return "\n".join(out)


@dataclass
class NodeConfig:
    kind: str
    nickname: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    introducer: str = ""
    servers: list[str] = field(default_factory=list)
    reserved_space: int = 1 << 30
    max_share_size: int = 1 << 40
    client_quota: int = 0
    idle_timeout: float = 300.0
    lease_duration: float = 31 * 24 * 3600.0
    expire_interval: float = 60.0
    k: int = DEFAULT_K
    happy: int = DEFAULT_HAPPY
    n: int = DEFAULT_N
    segment_size: int = DEFAULT_SEGMENT_SIZE
    renew_interval: float = 24 * 3600.0
    check_interval: float = 24 * 3600.0
    check_rate: float = 5.0
    repair_threshold: int = 0
    snapshot_retention: float = 30 * 24 * 3600.0
    """seconds every root version stays readable (gridfs.client.snapshots)"""
    snapshot_keep: int = 10
    """the newest root versions kept whatever their age"""
    local_limit: int | str = "auto"
    """bytes of the node's disk its mounts may use for staging, queue and
    segment cache (gridfs.localspace): a size (``10G``) or ``"auto"``"""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown node kind {self.kind!r}")
        check_k_n(self.k, self.n)
        if not self.k <= self.happy <= self.n:
            raise ParamsError(f"happy must be between k={self.k} and n={self.n}, not {self.happy}")
        if not self.idle_timeout > 0:
            raise UsageError(f"idle_timeout must be positive, not {self.idle_timeout}")
        for name in ("lease_duration", "expire_interval", "renew_interval", "check_interval"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be positive, not {getattr(self, name)}")
        if not self.check_rate > 0 or not 0 <= self.repair_threshold <= self.n:
            raise UsageError("check_rate must be positive and repair_threshold in 0..n")
        if not self.snapshot_retention >= 0 or self.snapshot_keep < 1:
            raise UsageError("snapshot_retention must be >= 0 and snapshot_keep >= 1")
        if self.reserved_space < 0 or self.max_share_size < 1:
            raise UsageError("reserved_space must be >= 0 and max_share_size >= 1")
        if type(self.client_quota) is not int or self.client_quota < 0:
            raise UsageError("client_quota must be a size in bytes >= 0 (0: no limit)")
        self.local_limit_bytes()
        for url in ([self.introducer] if self.introducer else []) + self.servers:
            NodeAddress.parse(url)

    def local_limit_bytes(self) -> int | None:
        """``local_limit`` in bytes, or None for the default (gridfs.localspace)."""
        value = self.local_limit
        if value == "auto":
            return None
        if isinstance(value, str):
            import argparse

            from .cli.util import parse_size

            try:
                value = parse_size(value)
            except argparse.ArgumentTypeError:
                value = -1
        if type(value) is not int or value < 1:
            raise UsageError(
                f'local_limit must be a size (e.g. 10G, 512M) or "auto", not {self.local_limit!r}'
            )
        return value

    def to_toml(self) -> str:
        tables: dict[str, dict[str, Any]] = {
            "node": {"kind": self.kind, "nickname": self.nickname},
        }
        if self.kind != "client":
            tables["listen"] = {"host": self.host, "port": self.port}
        if self.kind != "introducer":
            tables["grid"] = {"introducer": self.introducer, "servers": self.servers}
        if self.kind == "storage":
            tables["storage"] = {
                "reserved_space": self.reserved_space,
                "max_share_size": self.max_share_size,
                "client_quota": self.client_quota,
                "idle_timeout": self.idle_timeout,
                "lease_duration": self.lease_duration,
                "expire_interval": self.expire_interval,
            }
        if self.kind == "client":
            tables["client"] = {
                "k": self.k,
                "happy": self.happy,
                "n": self.n,
                "segment_size": self.segment_size,
                "renew_interval": self.renew_interval,
                "check_interval": self.check_interval,
                "check_rate": self.check_rate,
                "repair_threshold": self.repair_threshold,
                "snapshot_retention": self.snapshot_retention,
                "snapshot_keep": self.snapshot_keep,
                "local_limit": self.local_limit,
            }
        return dump_toml(tables)

    @classmethod
    def from_toml(cls, text: str) -> NodeConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"bad {CONFIG_NAME}: {e}") from None
        flat: dict[str, Any] = {}
        for table in ("node", "listen", "grid", "storage", "client"):
            flat.update(data.get(table, {}))
        known = set(cls.__dataclass_fields__)
        unknown = set(flat) - known
        if unknown:
            raise UsageError(f"unknown settings in {CONFIG_NAME}: {', '.join(sorted(unknown))}")
        try:
            return cls(**flat)
        except TypeError as e:
            raise UsageError(f"bad {CONFIG_NAME}: {e}") from None


class NodeDir:
    """One node's directory on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def private(self) -> Path:
        return self.path / "private"

    @property
    def key_path(self) -> Path:
        return self.private / "node.key"

    @property
    def cert_path(self) -> Path:
        return self.private / "node.crt"

    @property
    def url_path(self) -> Path:
        return self.path / "node.url"

    @property
    def pid_path(self) -> Path:
        return self.path / "node.pid"

    @property
    def log_path(self) -> Path:
        return self.path / "node.log"

    @property
    def storage_path(self) -> Path:
        return self.path / "storage"

    def exists(self) -> bool:
        return self.config_path.exists()

    def create(self, config: NodeConfig, invite: Invite | None = None) -> None:
        """Make the node: a fresh node key, or the key and membership an
        invite carries (of the same kind as the node)."""
        if self.exists():
            raise UsageError(f"{self.path} already holds a gridfs node")
        if invite is not None and invite.kind != config.kind:
            raise UsageError(f"this invite is for a {invite.kind} node, not a {config.kind} node")
        make_private_dir(self.path)
        if invite is not None:
            install_invite(self.private, invite)
        else:
            NodeKey.generate().write(self.private)
        if config.kind == "client":
            for name in ("convergence", "lease"):
                secret = self.private / name
                secret.touch(mode=0o600)
                secret.write_bytes(os.urandom(32))
        self.save(config)

    def save(self, config: NodeConfig) -> None:
        with atomic_output(self.config_path) as f:
            f.write(config.to_toml().encode())

    def config(self) -> NodeConfig:
        if not self.exists():
            raise UsageError(f"no gridfs node at {self.path} (create one, or use --node DIR)")
        return NodeConfig.from_toml(self.config_path.read_text())

    def key(self) -> NodeKey:
        return NodeKey.from_pem(self.key_path.read_bytes())

    def credentials(self) -> Credentials:
        """The node's TLS material (a non-member's, if it has no member
        certificate)."""
        return Credentials.load(self.private)

    def convergence_secret(self) -> bytes:
        return (self.private / "convergence").read_bytes()

    def lease_secret(self) -> bytes:
        """The node's lease secret, made on first use (nodes created before
        leases existed have none yet)."""
        path = self.private / "lease"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            with atomic_output(path, 0o600) as f:
                f.write(os.urandom(32))
            return path.read_bytes()

    def address(self) -> NodeAddress | None:
        """The running node's address, or None before it has written one
        (an empty file: a node older than the atomic write, mid-write)."""
        try:
            text = self.url_path.read_text()
        except FileNotFoundError:
            return None
        return NodeAddress.parse(text) if text.strip() else None

    def publish_address(self, address: NodeAddress) -> None:
        """Write ``node.url`` at once, never seen half-written: ``grid
        start`` reads it while the node starts (it once read it empty)."""
        with atomic_output(self.url_path, durable=False) as f:
            f.write(f"{address}\n".encode())

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        try:  # a killed node not yet reaped by its parent is not running
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        except (OSError, IndexError):
            pass
        return pid
