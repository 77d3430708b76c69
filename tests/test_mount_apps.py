"""Real programs on a mounted tree: rsync, git, sqlite3, tar."""

from __future__ import annotations

import io
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import Mount, run  # noqa: E402

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def make_tree(root: Path) -> None:
    """A few directories, ~60 files: tiny, 15 KiB (more than a directory keeps
    inline), a 3 MB one, a symlink, an empty file and directory, odd modes."""
    rnd = random.Random(7)
    (root / "docs" / "deep" / "deeper").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "inline-overflow").mkdir()
    (root / "empty-dir").mkdir()
    for i in range(20):
        (root / "src" / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * i)
    for i in range(80):  # 80 x 15 KiB > the 1 MiB of inline files a directory holds
        (root / "inline-overflow" / f"blob{i:02d}").write_bytes(rnd.randbytes(15 * 1024))
    (root / "docs" / "readme.txt").write_text("read me\n")
    (root / "docs" / "deep" / "deeper" / "bottom").write_bytes(rnd.randbytes(40_000))
    (root / "big.bin").write_bytes(rnd.randbytes(3_000_000))
    (root / "empty").write_bytes(b"")
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o755)
    os.chmod(root / "docs" / "readme.txt", 0o600)
    os.symlink("docs/readme.txt", root / "link-to-readme")
    os.symlink("nowhere", root / "docs" / "dangling")
    for p in root.rglob("*"):  # times rsync and tar must carry over
        os.utime(
            p, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789), follow_symlinks=False
        )


def snapshot(root: Path) -> dict[str, tuple[str, int, int, bytes | str]]:
    """kind, mode, mtime (s) and content or link target of everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        rel = str(p.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", 0, int(st.st_mtime), os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), 0, "")
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), int(st.st_mtime), p.read_bytes())
    return out


def test_rsync_in_and_out(mount_dir: Path, tmp_path: Path) -> None:
    need("rsync")
    src, back = tmp_path / "src", tmp_path / "back"
    src.mkdir()
    make_tree(src)
    run(["rsync", "-a", f"{src}/", f"{mount_dir}/tree/"], timeout=180)
    inside = mount_dir / "tree"
    assert snapshot(inside) == snapshot(src)
    run(["rsync", "-a", f"{inside}/", f"{back}/"], timeout=180)
    run(["diff", "-r", "--no-dereference", str(src), str(back)])
    assert snapshot(back) == snapshot(src)
    # nothing left to do the second time: sizes, times and modes all stuck
    again = run(["rsync", "-ai", f"{src}/", f"{inside}/"]).stdout
    changed = [line for line in again.splitlines() if not line.startswith(".d")]
    assert changed == [], again


def test_git(mount_dir: Path, tmp_path: Path) -> None:
    need("git")
    repo = mount_dir / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=T", "-c", "gc.auto=0"]
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}
    run([*git, "init", "-q", "-b", "main"], cwd=repo, env=env)
    for i in range(30):
        (repo / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    (repo / "sub").mkdir()
    (repo / "sub" / "data.bin").write_bytes(os.urandom(200_000))
    run([*git, "add", "."], cwd=repo, env=env)
    run([*git, "commit", "-q", "-m", "first"], cwd=repo, env=env)
    (repo / "f3.txt").write_text("changed\n")
    os.unlink(repo / "f4.txt")
    run([*git, "commit", "-q", "-am", "second"], cwd=repo, env=env)
    run([*git, "gc", "-q"], cwd=repo, env=env)  # packs, mmaps and renames
    run([*git, "fsck", "--full", "--strict"], cwd=repo, env=env)
    assert run([*git, "status", "--porcelain"], cwd=repo, env=env).stdout == ""
    log = run([*git, "log", "--format=%s"], cwd=repo, env=env).stdout.split()
    assert log == ["second", "first"]
    clone = tmp_path / "clone"
    run([*git, "clone", "-q", str(repo), str(clone)], env=env)
    assert (clone / "f3.txt").read_text() == "changed\n"
    assert not (clone / "f4.txt").exists()
    assert (clone / "sub" / "data.bin").read_bytes() == (repo / "sub" / "data.bin").read_bytes()


def test_sqlite_survives_remount(fresh_mount: Mount) -> None:
    db_path = fresh_mount.mountpoint / "app.db"
    if shutil.which("sqlite3"):
        script = ["create table t (id integer primary key, name text, blob blob);"]
        for batch in range(10):
            script.append("begin;")
            script += [
                f"insert into t (name, blob) values ('row {batch * 100 + i}', randomblob(300));"
                for i in range(100)
            ]
            script.append("commit;")
        script.append("create index t_name on t (name);")
        run(["sqlite3", str(db_path)], input="\n".join(script))
        out = run(["sqlite3", str(db_path), "pragma integrity_check; select count(*) from t;"])
        assert out.stdout.split() == ["ok", "1000"]
    else:
        db = sqlite3.connect(db_path)
        db.execute("create table t (id integer primary key, name text, blob blob)")
        for batch in range(10):
            with db:
                db.executemany(
                    "insert into t (name, blob) values (?, randomblob(300))",
                    [(f"row {batch * 100 + i}",) for i in range(100)],
                )
        db.execute("create index t_name on t (name)")
        db.close()
    # a change to a file the grid already has (a rewrite of some pages)
    fresh_mount.flush()
    db = sqlite3.connect(db_path)
    with db:
        db.execute("update t set name = name || '!' where id % 10 = 0")
        db.execute("delete from t where id > 990")
    db.close()
    fresh_mount.remount()
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("pragma integrity_check").fetchall() == [("ok",)]
        assert db.execute("select count(*) from t").fetchone()[0] == 990
        assert db.execute("select name from t where id = 500").fetchone()[0] == "row 499!"
        assert db.execute("select name from t where id = 501").fetchone()[0] == "row 500"
        assert db.execute("select count(*) from t where name like '%!'").fetchone()[0] == 99
    finally:
        db.close()
    assert not (fresh_mount.mountpoint / "app.db-journal").exists()


def test_tar_extract(mount_dir: Path, tmp_path: Path) -> None:
    need("tar")
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    tarball = tmp_path / "t.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(src, arcname="t")
        info = tarfile.TarInfo("t/from-memory.txt")
        payload = b"added from memory\n" * 100
        info.size, info.mode, info.mtime = len(payload), 0o640, 1_500_000_000
        tar.addfile(info, io.BytesIO(payload))
    run(["tar", "xf", str(tarball), "-C", str(mount_dir)], timeout=180)
    expected = snapshot(src)
    expected["from-memory.txt"] = ("file", 0o640, 1_500_000_000, payload)
    assert snapshot(mount_dir / "t") == expected
    # and back out again with tar c
    out = tmp_path / "out"
    out.mkdir()
    with open(tmp_path / "back.tar", "wb") as f:
        cmd = ["tar", "cf", "-", "-C", str(mount_dir), "t"]
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, timeout=120)
        assert proc.returncode == 0, proc.stderr
    run(["tar", "xf", str(tmp_path / "back.tar"), "-C", str(out)])
    assert snapshot(out / "t") == expected
