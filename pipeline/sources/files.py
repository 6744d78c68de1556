"""Reading one input file, with every OS failure translated to an InputError.

Where a daemon confines path jobs to allowed roots, the check is made twice:
on the job's path when the job is read (a quick refusal), and on the file
actually opened, through its descriptor, so a link swapped in between the
two cannot lead out of the roots.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from typing import Optional

from pipeline.errors import InputError

ERRNO_CODES = {
    errno.ENOENT: ("not_found", "file does not exist (dangling link or removed)"),
    errno.EACCES: ("permission_denied", "permission denied"),
    errno.EPERM: ("permission_denied", "operation not permitted"),
    errno.ELOOP: ("symlink_loop", "too many levels of symbolic links (symlink loop)"),
    errno.EISDIR: ("not_a_file", "is a directory"),
}


def read_file(path: str, max_bytes: int, roots: Optional[Sequence[str]] = None) -> bytes:
    """Read a regular file of at most `max_bytes` bytes; with `roots` (real
    paths), only one that really lies beneath one of them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _translate(exc) from exc
    try:
        if roots is not None:
            _check_opened(fd, path, roots)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError("not_a_file", "not a regular file (device, pipe or socket)")
        if info.st_size > max_bytes:
            raise InputError("file_too_large",
                             f"file is {info.st_size:,} bytes; the limit is {max_bytes:,}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise _translate(exc) from exc
    finally:
        os.close(fd)
    # The size from fstat may be 0 (procfs) or stale (a growing file).
    if len(data) > max_bytes:
        raise InputError("file_too_large", f"file is larger than the limit of {max_bytes:,} bytes")
    return data


def _check_opened(fd: int, path: str, roots: Sequence[str]) -> None:
    """Refuse an opened file that lies outside the roots, whatever links led to it."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no procfs: compare the opened file with what its real path names
        real = os.path.realpath(path)
        opened, named = os.fstat(fd), os.stat(real)
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            raise InputError("path_not_allowed", f"path {path[:200]!r} changed while "
                             "it was opened") from None
    if not beneath(real, roots):
        raise InputError("path_not_allowed", f"path {path[:200]!r} leads outside the "
                         "allowed roots")


def beneath(real: str, roots: Sequence[str]) -> bool:
    """Whether the real path `real` is one of `roots` or lies under one."""
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _translate(exc: OSError) -> InputError:
    code, message = ERRNO_CODES.get(exc.errno or 0, ("io_error", exc.strerror or str(exc)))
    return InputError(code, message)


def resolve_allowed(path: str, roots: Sequence[str]) -> str:
    """The real path of `path` if it lies under one of `roots` (real paths).

    Symlinks are resolved before the check, so neither a link nor a `..`
    leads out of the roots. A relative path is taken relative to the first root.
    """
    shown = repr(path[:200])
    if "\0" in path:
        raise InputError("path_not_allowed", f"path {shown} contains a NUL byte")
    if not roots:
        raise InputError("path_not_allowed", "path jobs are disabled here (no "
                         "serve.allowed_roots configured); send the image as data")
    try:
        real = os.path.realpath(os.path.join(roots[0], path))
    except OSError as exc:  # a link that cannot be read, e.g. /proc/1/exe
        cause = _translate(exc)
        raise InputError(cause.code, f"path {shown} cannot be resolved: {cause.message}") \
            from None
    if beneath(real, roots):
        return real
    raise InputError("path_not_allowed", f"path {shown} is outside the allowed roots")
