"""The systemd user units in ``systemd/``: their essentials, that their command
lines parse with the real ``gridfs`` argument parser, and ``systemd-analyze
--user verify`` where it can run."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from gridfs_daemon.main import MountOptions

from gridfs.cli import build_parser
from gridfs.cli.mount import cmd_mount
from gridfs.cli.nodes import cmd_run

UNITS = Path(__file__).resolve().parent.parent / "systemd"
INTRODUCER = "gridfs-introducer.service"
STORAGE = "gridfs-storage@.service"
MOUNT = "gridfs-mount@.service"
HOME = "/home/me"
Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """``[Section]`` → key → every value in order (systemd keys may repeat)."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set once, not {values}"
    return values[0]


def environment(unit: Unit) -> dict[str, str]:
    env = {}
    for value in unit["Service"].get("Environment", []):
        for item in shlex.split(value):
            name, _, val = item.partition("=")
            env[name] = val
    return env


def command(line: str, unit: Unit, instance: str = "") -> list[str]:
    """An Exec line as systemd would run it, for a user whose home is /home/me."""
    line = line.lstrip("-@+!:")
    specifiers = {
        "h": HOME,
        "i": instance,
        "f": "/" + instance.replace("-", "/"),  # enough for the plain names used here
        "%": "%",
    }
    env = environment(unit)
    argv = []
    for word in shlex.split(line):
        word = re.sub(r"%(.)", lambda m: specifiers[m.group(1)], word)
        word = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word)
        argv.append(word.replace("$$", "$"))
    return argv


def gridfs_args(argv: list[str]) -> list[str]:
    assert argv[0] == f"{HOME}/.local/bin/gridfs", argv
    return argv[1:]


@pytest.fixture(scope="module")
def units() -> dict[str, Unit]:
    return {name: parse_unit(UNITS / name) for name in (INTRODUCER, STORAGE, MOUNT)}


@pytest.mark.parametrize("name", [INTRODUCER, STORAGE, MOUNT])
def test_every_unit_has_the_essentials(units: dict[str, Unit], name: str) -> None:
    unit = units[name]
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Unit", "Description")
    assert one(unit, "Install", "WantedBy") == "default.target"  # a user unit
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert "2" in one(unit, "Service", "RestartPreventExitStatus").split()  # usage errors
    assert one(unit, "Service", "ExecStart").startswith("%h/.local/bin/gridfs ")


def test_mount_unit(units: dict[str, Unit]) -> None:
    unit = units[MOUNT]
    assert one(unit, "Service", "Type") == "notify"  # the daemon sends READY=1
    assert one(unit, "Service", "NotifyAccess") == "main"
    exec_start = one(unit, "Service", "ExecStart")
    assert "gridfs mount --foreground" in exec_start
    assert "%f" in exec_start  # the mountpoint is the (path-escaped) instance
    env = environment(unit)
    assert env["GRIDFS_NODE"] == "%h/.config/gridfs/client"
    assert env["GRIDFS_TREE"] == "grid"
    MountOptions.parse(env["GRIDFS_MOUNT_OPTIONS"])  # the default options are valid

    # The command line is what `gridfs mount` expects.
    argv = command(exec_start, unit, "home-me-grid")
    args = build_parser().parse_args(gridfs_args(argv))
    assert args.func is cmd_mount
    assert args.foreground
    assert args.mountpoint == Path("/home/me/grid")
    assert args.tree == "grid"
    assert args.options == ""

    # Stopping gives the daemon time to drain its queue after unmounting.
    stop = one(unit, "Service", "TimeoutStopSec")
    assert stop.isdigit() and int(stop) >= MountOptions().drain_timeout + 30
    assert one(unit, "Service", "KillMode") == "mixed"
    assert "mkdir -p %f" in one(unit, "Service", "ExecStartPre")
    cleanup = one(unit, "Service", "ExecStopPost")
    assert cleanup.startswith("-")  # nothing to clean up is fine
    assert "fusermount3 -u" in cleanup and "%f" in cleanup


def test_mount_cleanup_only_detaches_a_dead_mount(units: dict[str, Unit], tmp_path: Path) -> None:
    """ExecStopPost stats the mountpoint first: a healthy directory (or a live
    mount) is left alone, fusermount3 is not even run."""
    argv = command(one(units[MOUNT], "Service", "ExecStopPost"), units[MOUNT])
    assert argv[:2] == ["/bin/sh", "-c"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "fusermount3.log"
    fake = bin_dir / "fusermount3"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    healthy = tmp_path / "grid"
    healthy.mkdir()
    subprocess.run([*argv[:-1], str(healthy)], check=True, env=env, timeout=10)
    assert not log.exists()
    gone = tmp_path / "gone"  # stat fails, as on a dead FUSE mount
    subprocess.run([*argv[:-1], str(gone)], check=True, env=env, timeout=10)
    assert log.read_text().split() == ["-u", "-z", str(gone)]


def test_storage_unit(units: dict[str, Unit]) -> None:
    unit = units[STORAGE]
    assert one(unit, "Service", "Type") == "exec"
    exec_start = one(unit, "Service", "ExecStart")
    assert "gridfs storage run %h/.local/share/gridfs/%i" in exec_start
    args = build_parser().parse_args(gridfs_args(command(exec_start, unit, "storage-1")))
    assert (args.func, args.kind) == (cmd_run, "storage")
    assert args.dir == Path("/home/me/.local/share/gridfs/storage-1")


def test_introducer_unit(units: dict[str, Unit]) -> None:
    unit = units[INTRODUCER]
    assert one(unit, "Service", "Type") == "exec"
    exec_start = one(unit, "Service", "ExecStart")
    assert "gridfs introducer run %h/.local/share/gridfs/introducer" in exec_start
    args = build_parser().parse_args(gridfs_args(command(exec_start, unit)))
    assert (args.func, args.kind) == (cmd_run, "introducer")
    assert args.dir == Path("/home/me/.local/share/gridfs/introducer")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # A home with ~/.local/bin/gridfs (verify checks that ExecStart is
    # executable) and a runtime directory, which --user needs even here.
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    stub = home / ".local" / "bin" / "gridfs"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for name in (INTRODUCER, STORAGE, MOUNT):
        shutil.copy(UNITS / name, unit_dir / name)
    env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
    env.pop("SYSTEMD_UNIT_PATH", None)
    # Templates are verified through an instance, as they would be started.
    names = [INTRODUCER, "gridfs-storage@storage-1.service", "gridfs-mount@home-me-grid.service"]
    proc = subprocess.run(
        [analyze, "--user", "verify", *(str(unit_dir / n) for n in names)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and re.search(
        r"Failed to initialize manager|Failed to lookup RuntimeDirectory|"
        r"Operation not permitted|Cannot determine cgroup|Failed to (connect|allocate)",
        output,
    ):
        pytest.skip(f"systemd-analyze --user verify cannot run here: {output.strip()}")
    assert proc.returncode == 0, output
    # Bad settings are only warnings ("…, ignoring"), with exit status 0.
    ours = [line for line in output.splitlines() if "gridfs-" in line]
    assert not ours, output
