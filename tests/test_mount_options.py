"""``-o`` options of ``gridfs mount`` and ``mount -t gridfs``: parsed, or refused in one line."""

from __future__ import annotations

import pytest
from gridfs_daemon.main import MountOptions

from gridfs.errors import UsageError


def test_options_are_parsed_and_the_rest_handed_back() -> None:
    opts, rest = MountOptions.parse(
        "sync,cache_size=512M,cache_scans,refresh=2.5,nomaintain,node=/n,alias=work,defaults,_netdev"
    )
    assert opts.sync and opts.cache_scans and not opts.maintain
    assert opts.cache_size == 512 << 20 and opts.refresh == 2.5
    assert rest == {"node": "/n", "alias": "work"}


def test_defaults() -> None:
    opts, rest = MountOptions.parse("")
    assert opts == MountOptions() and rest == {}
    assert not opts.sync and not opts.cache_scans and opts.maintain
    assert opts.cache_size is None  # the node's local_limit (gridfs.localspace)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cache_size=lots", "-o cache_size= needs a size"),
        ("cache_size=0", "-o cache_size= needs a size"),
        ("space_wait=later", "-o space_wait= needs a number of seconds"),
        ("refresh=soon", "-o refresh= needs a number of seconds"),
        ("cache_scan", "unknown mount option 'cache_scan'"),
        ("cache_scans=no", "-o cache_scans takes no value"),
        ("sync=1", "-o sync takes no value"),
    ],
)
def test_bad_options_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        MountOptions.parse(text)
    assert "\n" not in str(info.value)


def test_mounts_are_nosuid_nodev_unless_told() -> None:
    """suid/dev were swallowed as fstab words, so nobody could opt out (or
    be sure of the default): now they are options of their own."""
    fuse = MountOptions.parse("")[0].fuse_options()
    assert {"nosuid", "nodev"} <= fuse and not {"suid", "dev"} & fuse
    opts, rest = MountOptions.parse("suid,dev,cap_file=/k")
    assert opts.suid and opts.dev and rest == {"cap_file": "/k"}
    assert {"suid", "dev"} <= opts.fuse_options()
    assert not {"nosuid", "nodev"} & opts.fuse_options()
    assert MountOptions.parse("suid,nosuid")[0].fuse_options() >= {"nosuid"}
    with pytest.raises(UsageError, match="-o suid takes no value"):
        MountOptions.parse("suid=1")


def test_id_maps_are_parsed_and_checked() -> None:
    opts, _ = MountOptions.parse("uidmap=1000:2000,uidmap=5000:6000:10,gidmap=100:200")
    assert [opts.uidmap.local(i) for i in (1000, 1001, 5009, 5010)] == [2000, 1001, 6009, 5010]
    assert [opts.uidmap.stored(i) for i in (2000, 6003, 7)] == [1000, 5003, 7]
    assert opts.gidmap.local(100) == 200 and opts.gidmap.stored(100) == 100
    for bad, message in [
        ("uidmap=1000", "STORED:LOCAL"),
        ("uidmap=a:b", "STORED:LOCAL"),
        ("uidmap=1:2:0", "out of range"),
        ("gidmap=1:2,gidmap=3:2", "overlaps"),
        ("uidmap=1:10:5,uidmap=3:20", "overlaps"),
    ]:
        with pytest.raises(UsageError, match=message):
            MountOptions.parse(bad)
