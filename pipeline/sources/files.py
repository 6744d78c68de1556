"""Reading one input file, with every OS failure translated to an InputError."""

from __future__ import annotations

import errno
import os
import stat

from pipeline.errors import InputError

ERRNO_CODES = {
    errno.ENOENT: ("not_found", "file does not exist (dangling link or removed)"),
    errno.EACCES: ("permission_denied", "permission denied"),
    errno.EPERM: ("permission_denied", "operation not permitted"),
    errno.ELOOP: ("symlink_loop", "too many levels of symbolic links (symlink loop)"),
    errno.EISDIR: ("not_a_file", "is a directory"),
}


def read_file(path: str, max_bytes: int) -> bytes:
    """Read a regular file of at most `max_bytes` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _translate(exc) from exc
    try:
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


def _translate(exc: OSError) -> InputError:
    code, message = ERRNO_CODES.get(exc.errno or 0, ("io_error", exc.strerror or str(exc)))
    return InputError(code, message)
