"""The imgpipe error tree.

    ImgpipeError
     ├── PermanentError        retrying cannot help: report it and move on
     │    ├── InputError       one bad input (file, bytes, job); carries a stable `code`
     │    ├── ConfigError      invalid settings; fatal at start-up
     │    └── ModelLoadError   a model or its weights cannot be loaded; fatal
     └── TransientError        may succeed later (a Redis hiccup, device out of memory)

Third-party exceptions are translated where they are caught, with
``raise ... from exc``, into the most specific class here.
"""

from __future__ import annotations

import re

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
REASON_CHARS = 300


class ImgpipeError(Exception):
    """Base of every error imgpipe raises on purpose."""


class PermanentError(ImgpipeError):
    """Retrying the same work cannot succeed."""


class TransientError(ImgpipeError):
    """The same work may succeed if retried later."""


class InputError(PermanentError):
    """One input cannot be scored; `code` is stable and machine-readable.

    Codes for images: empty_file, not_an_image, truncated, decode_failed,
    image_too_large, file_too_large, not_found, permission_denied,
    symlink_loop, not_a_file, io_error, worker_crashed, internal_error (a
    bug met by this input). Codes for Redis jobs (pipeline/transport/contract.py):
    invalid_field, unknown_field, missing_field, conflicting_fields,
    unsupported_version, unknown_model, data_too_large, path_not_allowed,
    deadline_exceeded, too_many_deliveries; for URL jobs
    (pipeline/sources/urls.py): url_not_allowed, fetch_failed, fetch_timeout,
    http_error, data_too_large.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Crosses process boundaries from the preprocessing workers.
        return (type(self), (self.code, self.message))

    def __repr__(self) -> str:
        return f"InputError({self.code!r}, {self.message!r})"


class ConfigError(PermanentError):
    """A setting is invalid; the message names the key, the value and the fix."""


class ModelLoadError(PermanentError):
    """A model cannot be built or its weights cannot be loaded."""


def internal_error(exc: BaseException) -> InputError:
    """An unexpected failure in one input's handling, as that input's error."""
    return InputError("internal_error", f"unexpected {type(exc).__name__} while handling "
                      f"this input: {first_line(exc)}")


def first_line(exc: BaseException) -> str:
    """An exception's first non-blank line, without colour codes, for one-line reasons."""
    text = ANSI_ESCAPE.sub("", str(exc)).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:REASON_CHARS]


def root_cause(exc: BaseException) -> str:
    """The innermost cause's type and first line: exporters wrap the real reason
    (e.g. a data-dependent branch) in a generic "Failed to export" error."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {first_line(exc)}"
