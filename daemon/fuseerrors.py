"""Errors to errno at the FUSE edge: every handler answers an errno, never a
traceback (a bug in one answers EIO and is logged; the mount stays up)."""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import pyfuse3

from gridfs.dirnode import check_name
from gridfs.errors import GridError, UsageError
from gridfs.localspace import disk_errno
from gridfs.tree import NotFoundError

log = logging.getLogger("gridfs_daemon.fs")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def errors_to_errno(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except NotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except PermissionError as e:  # daemon.perms: EPERM or EACCES
            raise pyfuse3.FUSEError(e.errno or errno.EPERM) from None
        except UsageError as e:
            log.debug("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except GridError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:
            code = disk_errno(e)  # a full or failing local disk (e.g. SQLite's)
            if code is None:
                log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(code or errno.EIO) from None

    return cast(F, wrapper)


def fuse_name(name: bytes) -> str:
    try:
        return check_name(name.decode("utf-8"))
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EILSEQ) from None
    except UsageError:
        if len(name) > 255:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG) from None
        raise pyfuse3.FUSEError(errno.EINVAL) from None
