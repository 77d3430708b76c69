"""The mount's permission rules (daemon/perms.py), case by case as Linux has them."""

from __future__ import annotations

import errno
import os
import stat
from types import SimpleNamespace

import pytest

from daemon import perms
from daemon.perms import Caller, Owner

ROOT = Caller(0, 0)
ALICE = Caller(1001, 1001, frozenset({1001, 3000}))
BOB = Caller(1002, 1002, frozenset({1002}))
REG, DIR = stat.S_IFREG, stat.S_IFDIR


def alices(mode: int, gid: int = 1001) -> Owner:
    return Owner(1001, gid, mode)


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(PermissionError) as info:
        fn(*args)
    return info.value.errno


@pytest.mark.parametrize(
    ("caller", "uid", "gid", "ok"),
    [
        (ROOT, 5, 6, True),
        (ALICE, None, 3000, True),  # one of her groups
        (ALICE, None, 1001, True),
        (ALICE, 1001, None, True),  # keeping her own uid
        (ALICE, None, 1002, False),
        (ALICE, 1002, None, False),
        (BOB, None, None, True),  # chown(-1, -1): no check
        (BOB, 1001, None, False),  # not the owner: not even to the same uid
        (BOB, None, 1001, False),
    ],
)
def test_chown(caller: Caller, uid: int | None, gid: int | None, ok: bool) -> None:
    owner = alices(REG | 0o644)
    if ok:
        perms.check_chown(owner, caller, uid, gid)
    else:
        assert errno_of(perms.check_chown, owner, caller, uid, gid) == errno.EPERM


@pytest.mark.parametrize(
    ("mode", "caller", "after"),
    [
        (REG | 0o4755, ROOT, REG | 0o755),  # even root's chown clears setuid
        (REG | 0o6755, ALICE, REG | 0o755),
        (REG | 0o2745, ALICE, REG | 0o2745),  # setgid without group x: locking mark
        (REG | 0o2745, BOB, REG | 0o745),  # ...unless the caller is not in the group
        (REG | 0o2745, ROOT, REG | 0o2745),
        (DIR | 0o7755, ROOT, DIR | 0o7755),  # directories keep theirs
    ],
)
def test_chown_clears_setuid_and_setgid(mode: int, caller: Caller, after: int) -> None:
    assert perms.chown_mode(alices(mode), caller) == after


@pytest.mark.parametrize(
    ("mode", "caller", "after"),
    [
        (REG | 0o4777, BOB, REG | 0o777),
        (REG | 0o4755, ALICE, REG | 0o755),  # the owner too
        (REG | 0o6755, ROOT, REG | 0o6755),  # CAP_FSETID
        (stat.S_IFIFO | 0o4755, BOB, stat.S_IFIFO | 0o4755),  # regular files only
    ],
)
def test_write_clears_setuid(mode: int, caller: Caller, after: int) -> None:
    assert perms.write_mode(alices(mode), caller) == after


def test_chmod() -> None:
    assert perms.check_chmod(alices(REG | 0o644), ALICE, 0o600) == 0o600
    assert perms.check_chmod(alices(REG | 0o644), ROOT, 0o4711) == 0o4711
    assert errno_of(perms.check_chmod, alices(REG | 0o666), BOB, 0o600) == errno.EPERM
    # setgid on a file of a group she is not in: dropped, silently
    assert perms.check_chmod(alices(REG | 0o644, gid=1002), ALICE, 0o2755) == 0o755
    assert perms.check_chmod(alices(REG | 0o644, gid=3000), ALICE, 0o2755) == 0o2755
    # the kernel clearing setuid/setgid on someone else's write
    assert perms.check_chmod(alices(REG | 0o6777), BOB, 0o777) == 0o777
    assert errno_of(perms.check_chmod, alices(REG | 0o6777), BOB, 0o4777 & ~0o100) == errno.EPERM


def test_times() -> None:
    writable, read_only = Owner(1002, 1002, REG | 0o666), Owner(1002, 1002, REG | 0o644)
    perms.check_times(writable, ALICE, to_now=True)
    assert errno_of(perms.check_times, read_only, ALICE, True) == errno.EACCES
    assert errno_of(perms.check_times, writable, ALICE, False) == errno.EPERM
    perms.check_times(read_only, BOB, to_now=False)
    perms.check_times(read_only, ROOT, to_now=False)
    perms.check_times(Owner(1002, 3000, REG | 0o664), ALICE, to_now=True)  # by group


def test_sticky() -> None:
    tmp = Owner(0, 0, DIR | 0o1777)
    alices_file = alices(REG | 0o666)
    perms.check_sticky(tmp, alices_file, ALICE)
    perms.check_sticky(tmp, alices_file, ROOT)
    assert errno_of(perms.check_sticky, tmp, alices_file, BOB) == errno.EPERM
    perms.check_sticky(Owner(1002, 0, DIR | 0o1777), alices_file, BOB)  # the directory's owner
    perms.check_sticky(Owner(0, 0, DIR | 0o777), alices_file, BOB)  # not sticky


def test_new_entries() -> None:
    plain = Owner(0, 0, DIR | 0o777)
    shared = Owner(0, 3000, DIR | 0o2777)
    assert perms.new_owner(plain, ALICE, REG | 0o644) == Owner(1001, 1001, REG | 0o644)
    assert perms.new_owner(shared, ALICE, REG | 0o644) == Owner(1001, 3000, REG | 0o644)
    assert perms.new_owner(shared, BOB, DIR | 0o755) == Owner(1002, 3000, DIR | 0o2755)


def test_allowed() -> None:
    f = Owner(1001, 3000, REG | 0o640)
    assert perms.allowed(f, ALICE, 6) and perms.allowed(f, Caller(7, 3000), 4)
    assert not perms.allowed(f, Caller(7, 3000), 2) and not perms.allowed(f, BOB, 4)
    assert perms.allowed(f, ROOT, 6) and not perms.allowed(f, ROOT, 1)
    assert perms.allowed(Owner(1, 1, DIR | 0o700), ROOT, 1)


def test_a_callers_groups_come_from_proc() -> None:
    me = perms.caller_of(SimpleNamespace(uid=1001, gid=1001, pid=os.getpid()))
    assert me.groups == frozenset(os.getgroups())
    gone = perms.caller_of(SimpleNamespace(uid=1001, gid=1001, pid=2**22 + 12345))
    assert gone.groups == frozenset() and gone.in_group(1001) and not gone.in_group(0)


def test_owners_of_a_multi_user_mount_and_of_a_users_own() -> None:
    from gridfs.dirnode import Entry

    legacy = Entry("file", "", 0, 0o644)
    owned = legacy.with_(uid=1002, gid=3000)
    multi, single = perms.Owners(0, 0, True), perms.Owners(1001, 1001, False)
    assert multi.ids(legacy) == (0, 0) and multi.ids(owned) == (1002, 3000)
    assert single.ids(owned) == (1001, 1001)  # everything is the mounting user's
    assert single.caller(SimpleNamespace(uid=5, gid=5, pid=1)) == Caller(1001, 1001)
    assert single.chown(single.of(owned), ALICE, 1001, 1001) == {}
    assert errno_of(single.chown, single.of(owned), ALICE, 0, None) == errno.EPERM
    changes = multi.chown(multi.of(owned.with_(mode=0o4755)), ROOT, 7, None)
    assert changes == {"uid": 7, "gid": 3000, "mode": 0o755}
    parent = Entry("dir", "", 0, 0o2775, uid=0, gid=3000)
    made = multi.created(Entry("dir", "", 0, 0o755), parent, BOB)
    assert (made.uid, made.gid, made.mode) == (1002, 3000, 0o2755)


def setattr_of(**set_: int) -> tuple[SimpleNamespace, SimpleNamespace]:
    """pyfuse3's (attr, fields) for a SETATTR of ``set_`` (st_uid=..., ...)."""
    names = ("uid", "gid", "mode", "size", "mtime", "atime", "ctime")
    fields = SimpleNamespace(
        **{f"update_{n}": f"st_{n}" in set_ or f"st_{n}_ns" in set_ for n in names}
    )
    return SimpleNamespace(**set_), fields


@pytest.mark.parametrize(
    ("caller", "mode", "set_", "expected"),
    [
        (ROOT, 0o4755, {"st_uid": 7}, {"uid": 7, "gid": 1001, "mode": 0o755}),
        (ALICE, 0o644, {"st_gid": 3000}, {"uid": 1001, "gid": 3000, "mode": 0o644}),
        (BOB, 0o4755, {}, {"uid": 1001, "gid": 1001, "mode": 0o755}),  # chown(-1, -1)
        (ALICE, 0o644, {"st_mode": REG | 0o2600}, {"mode": 0o600}),  # not in group 1002
        (BOB, 0o6777, {"st_mode": REG | 0o777}, {"mode": 0o777}),  # the kernel's killpriv
        (BOB, 0o4666, {"st_size": 0}, {"mode": 0o666}),
        (ROOT, 0o4666, {"st_size": 0}, {}),
        (
            BOB,
            0o666,
            {"st_mtime_ns": 5, "st_atime_ns": 5},  # "now", writable
            {"mtime_ns": 5, "extra": {"atime": 5}},
        ),
        (ALICE, 0o644, {"st_atime_ns": 5}, {"extra": {"atime": 5}}),  # stored; the ctime moves
    ],
)
def test_setattr_changes(caller: Caller, mode: int, set_: dict, expected: dict) -> None:
    from gridfs.dirnode import Entry

    entry = Entry("file", "", 0, mode, uid=1001, gid=1002 if "st_mode" in set_ else 1001)
    attr, fields = setattr_of(**set_)
    changes = perms.Owners(0, 0, True).setattr_changes(entry, caller, attr, fields)
    assert changes.pop("ctime_ns") > 0
    assert changes == expected


@pytest.mark.parametrize(
    ("caller", "mode", "set_", "code"),
    [
        (BOB, 0o666, {"st_mode": REG | 0o600}, errno.EPERM),
        (BOB, 0o644, {"st_mtime_ns": 5}, errno.EACCES),
        (ALICE, 0o644, {"st_uid": 1002}, errno.EPERM),
    ],
)
def test_setattr_refusals(caller: Caller, mode: int, set_: dict, code: int) -> None:
    from gridfs.dirnode import Entry

    attr, fields = setattr_of(**set_)
    owners, entry = perms.Owners(0, 0, True), Entry("file", "", 0, mode, uid=1001, gid=1001)
    assert errno_of(owners.setattr_changes, entry, caller, attr, fields) == code
