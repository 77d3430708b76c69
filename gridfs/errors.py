"""The one exception hierarchy of gridfs.

Every error a user can meet derives from :class:`GridError`; the CLI prints its
message on one line and exits with its ``exit_code``, the mount maps it to its
``errno``.  Anything else escaping to the user is a bug.
"""

from __future__ import annotations

import contextlib
import errno as _errno
from collections.abc import Iterator

import trio


class GridError(Exception):
    """Base of every gridfs error."""

    exit_code = 1
    errno = _errno.EIO


class UsageError(GridError, ValueError):
    """The caller asked for something that cannot be done as asked."""

    exit_code = 2
    errno = _errno.EINVAL


class ParamsError(UsageError):
    """Encoding parameters (k, n, segment size) are out of range."""


class CapError(UsageError):
    """A capability string is malformed or of the wrong kind."""


class FormatError(GridError):
    """Bytes that should follow one of our formats do not."""


class IntegrityError(GridError):
    """Data failed verification against a hash we trust."""


class BadHashError(IntegrityError):
    """A hash or leaf is inconsistent with the trusted hash tree."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class NotEnoughHashesError(GridError):
    """A leaf cannot be verified yet: hashes on its path to the root are missing."""


class CorruptShareError(IntegrityError):
    """A share (or one of its blocks) failed verification."""

    def __init__(self, sharenum: int, reason: str) -> None:
        super().__init__(f"share {sharenum} is corrupt: {reason}")
        self.sharenum = sharenum
        self.reason = reason


class NotEnoughSharesError(GridError):
    """Fewer than k good shares could be found."""

    exit_code = 3


def unwrap(exc: BaseException) -> BaseException:
    """The one error that matters in a (nested) exception group.

    Concurrent code reports failures as exception groups; users need the
    first real error (a GridError if there is one), not the group."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        for leaf in leaves:
            if isinstance(leaf, GridError):
                return leaf
        return leaves[0] if leaves else exc
    return exc


@contextlib.contextmanager
def plain_grid_errors() -> Iterator[None]:
    """Raise a nursery's exception group made only of GridErrors as its first
    one, so that callers can catch GridError (any other group passes; the
    cancellations a failing task causes in its siblings do not count)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if leaves and all(isinstance(e, GridError) for e in leaves):
            raise leaves[0] from group
        raise


def _leaves(exc: BaseExceptionGroup[BaseException]):  # type: ignore[no-untyped-def]
    for e in exc.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


class NotMemberError(GridError):
    """This node is not (or no longer) a member of the grid: it has no member
    certificate, or the grid's servers refuse it (revoked, another grid)."""

    code = "not-member"
