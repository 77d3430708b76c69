"""The xattrs that name caps: ``user.gridfs.cap`` and ``user.gridfs.rwcap``.

Computed on each ``getxattr``, never stored nor listed (``cp -a`` and
``rsync -X`` must not copy a cap onto another file), and refused by
``setxattr``:

* ``user.gridfs.cap`` of a file is its read cap (ENODATA for a small file
  kept inside its directory, which has none of its own: ``gridfs share``
  stores it); of the top directory, the tree's slot read cap; of a shared
  directory (``gridfs share``), its slot's read cap (live); of another
  directory, the cap of its last committed version (immutable: a snapshot of
  it, which does not follow later changes).
* ``user.gridfs.rwcap`` of the top directory is the tree's write cap, and of
  a shared directory its slot's write cap, to the mount's owner only (EACCES
  for anyone else; ENODATA where the mount has no write cap, and on every
  other inode).
"""

from __future__ import annotations

import errno
from typing import Any

import pyfuse3

from gridfs.caps import LITERAL_MAX, LiteralCap
from gridfs.mutable import SlotReadCap, SlotWriteCap
from gridfs.shares import open_write_cap, slot_of
from gridfs.tree import NotFoundError
from gridfs.workqueue import is_placeholder

from .snapshots import SNAPSHOTS, in_snapshots

CAP_XATTR = "user.gridfs.cap"
RWCAP_XATTR = "user.gridfs.rwcap"
CAP_XATTRS = (CAP_XATTR, RWCAP_XATTR)


async def cap_xattr(ops: Any, inode: int, key: str, ctx: Any) -> bytes:
    """The value of ``key`` (one of :data:`CAP_XATTRS`) for ``inode`` of the
    mount ``ops`` (a :class:`daemon.fs.GridOperations`)."""
    path = ops.inodes.path(inode)
    tree_cap = ops.session.cap
    entry = None
    if path and path != (SNAPSHOTS,):
        entry = await ops.view.lookup(path)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
    shared = None if entry is None or in_snapshots(path) else slot_of(entry)
    if key == RWCAP_XATTR:
        write = tree_cap if not path and isinstance(tree_cap, SlotWriteCap) else None
        if entry is not None and shared is not None:
            write = open_write_cap(entry, ops.view.batch.write_key(path[:-1]))
        if write is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if getattr(ctx, "uid", None) != ops.uid:
            raise pyfuse3.FUSEError(errno.EACCES)
        return write.to_string().encode()
    if not path:
        assert isinstance(tree_cap, SlotWriteCap | SlotReadCap)
        return tree_cap.read_cap().to_string().encode()
    if entry is None:
        raise pyfuse3.FUSEError(errno.ENODATA)
    if shared is not None:
        return shared.to_string().encode()
    if entry.is_dir and not in_snapshots(path):
        try:  # the view's cap of a directory may hold queued changes: the committed one
            entry = await ops.session.tree.lookup(path)
        except NotFoundError:
            raise pyfuse3.FUSEError(errno.ENODATA) from None
    if entry.kind == "symlink":
        raise pyfuse3.FUSEError(errno.ENODATA)
    if entry.cap and not is_placeholder(entry.cap):
        return str(entry.cap).encode()
    if entry.data is not None and len(entry.data) <= LITERAL_MAX:
        return LiteralCap(entry.data).to_string().encode()
    raise pyfuse3.FUSEError(errno.ENODATA)
