"""Walk a directory lazily: memory stays flat however many files it holds."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from pipeline.errors import InputError
from pipeline.items import Job


def walk(root: str, recursive: bool = False,
         skip: Callable[[str], bool] = lambda path: False,
         left_out: Callable[[str], None] = lambda path: None) -> Iterator[Job]:
    """Yield a Job for every non-hidden entry that is not a directory.

    Unreadable entries are still yielded (reading them reports why), so every
    input file gets exactly one record. Directory symlinks are followed when
    recursive; a link back to an ancestor yields a `symlink_loop` error job.
    Without `recursive`, `left_out` is told of each visible subdirectory passed
    over (for a hint to use --recursive).
    """
    pending = [(root, frozenset({_identity(root)}))]
    while pending:
        directory, ancestors = pending.pop()
        for entry in entries(directory):
            if entry.name.startswith("."):
                continue
            if is_dir(entry):
                if recursive:
                    yield from _descend(entry, ancestors, pending)
                else:
                    left_out(entry.path)
            elif not skip(entry.path):
                yield Job(entry.path)


def _descend(entry: os.DirEntry[str], ancestors: frozenset[tuple[int, int]],
             pending: list[tuple[str, frozenset[tuple[int, int]]]]) -> Iterator[Job]:
    identity = _identity(entry.path)
    if identity in ancestors:
        yield Job(entry.path, InputError(
            "symlink_loop", "directory link points back to one of its parents"))
    else:
        pending.append((entry.path, ancestors | {identity}))


def entries(directory: str) -> Iterator[os.DirEntry[str]]:
    """The entries of `directory`, one at a time; none when it cannot be listed."""
    try:
        with os.scandir(directory) as listing:
            yield from listing
    except OSError:
        return  # an unreadable sub-directory has no files we can list


def is_dir(entry: os.DirEntry[str]) -> bool:
    """Whether `entry` is a directory or a link to one (False when that cannot be told)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return (info.st_dev, info.st_ino)


def count(root: str, recursive: bool = False,
          skip: Callable[[str], bool] = lambda path: False) -> int:
    """How many jobs `walk` would yield (a cheap pass for progress bars)."""
    return sum(1 for _ in walk(root, recursive, skip))
