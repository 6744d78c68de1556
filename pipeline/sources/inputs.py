"""The inputs of `imgpipe score`: files, directories and glob patterns named on
the command line, then the files a list names (--files-from), as Jobs.

Everything is lazy. A directory is walked one entry at a time; a pattern is
matched one directory entry at a time (Python's glob module lists whole
directories first); a list is read one name at a time. Memory stays flat
however many files there are.

An operand that names nothing (no such file or directory, or a pattern that
matches nothing) is a bad argument, refused before anything loads, as the
shell or `ls` would. A listed name is data: one that cannot be read (missing,
a directory, unreadable) gets an error record like any file that cannot be.

Paths are named in records in pathlib's normal form (no `./`, no doubled or
trailing `/`), as directories always were, so one results file resumes
whichever way its files were named.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Optional

from pipeline.errors import ConfigError, ImgpipeError, InputError
from pipeline.items import Job
from pipeline.sources import directory

MAGIC = re.compile(r"[*?[]")
LIST_BLOCK_BYTES = 1 << 16
STDIN = "-"
Skip = Callable[[str], bool]


def never(path: str) -> bool:
    return False


class Inputs:
    """Operands (files, directories, patterns) and an optional list of files.

    open() checks the operands and opens the list, jobs() yields one Job per
    input file, close() closes the list. A directory operand (or a directory
    a pattern without `**` matches) is walked like `score DIR` walks it:
    visible files only, subdirectories with `recursive`. A pattern with a
    `**` component matches files at any depth (it skips hidden directories
    and does not follow links to directories); the directories it matches
    are left out, since `**` already reaches into them.
    """

    def __init__(self, operands: Sequence[str], files_from: Optional[str] = None,
                 null_separated: bool = False, recursive: bool = False,
                 stdin: Optional[BinaryIO] = None) -> None:
        self.operands = [os.fspath(operand) for operand in operands]
        self.files_from = files_from
        self.null_separated = null_separated
        self.recursive = recursive
        self.stdin = stdin
        self.subdirectories_left_out = 0  # counted as the walks pass them
        self._kinds: list[str] = []
        self._list: Optional[BinaryIO] = None

    def open(self) -> Inputs:
        """Check every operand and open the list; ConfigError (one line) when an
        operand names nothing or the list cannot be read."""
        if not self.operands and self.files_from is None:
            raise ConfigError("nothing to score: name image files, directories or glob "
                              "patterns, or --files-from FILE")
        self._kinds = [_kind(operand) for operand in self.operands]
        if self.files_from is not None:
            self._list = self._open_list()
        return self

    def close(self) -> None:
        if self._list is not None and self.files_from != STDIN:
            self._list.close()
        self._list = None

    def __enter__(self) -> Inputs:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __str__(self) -> str:
        named = list(self.operands)
        if self.files_from is not None:
            source = "standard input" if self.files_from == STDIN else self.files_from
            named.append(f"the files listed in {source}")
        if len(named) > 4:  # a shell's expansion may have named thousands
            named = [*named[:3], f"{len(named) - 3} more"]
        return ", ".join(named)

    def jobs(self, skip: Skip = never) -> Iterator[Job]:
        """One Job per input file not skipped: the operands' first, in order, then
        the list's."""
        for operand, kind in zip(self.operands, self._kinds, strict=True):
            if kind == "directory":
                yield from self._walk(normal(operand), skip)
            elif kind == "file":
                yield from _unless_skipped(normal(operand), skip)
            else:
                yield from self._matches(operand, skip)
        if self._list is not None:
            yield from self._listed(skip)

    def count(self, skip: Skip = never) -> Optional[int]:
        """How many jobs jobs() yields (a second pass, for a progress bar); None
        when the list cannot be read twice (standard input, a pipe)."""
        again = Inputs(self.operands, self.files_from, self.null_separated, self.recursive)
        again._kinds = self._kinds
        if self.files_from is not None:
            if self.files_from == STDIN or not _is_regular(self.files_from):
                return None
            again._list = again._open_list()
        try:
            return sum(1 for _ in again.jobs(skip))
        finally:
            again.close()

    def _walk(self, root: str, skip: Skip) -> Iterator[Job]:
        return directory.walk(root, self.recursive, skip, self._left_out)

    def _left_out(self, path: str) -> None:
        self.subdirectories_left_out += 1

    def _matches(self, pattern: str, skip: Skip) -> Iterator[Job]:
        reaches_down = "**" in _parts(pattern)
        for path, is_dir in glob(pattern):
            if not is_dir:
                yield from _unless_skipped(normal(path), skip)
            elif not reaches_down:
                yield from self._walk(normal(path), skip)

    def _listed(self, skip: Skip) -> Iterator[Job]:
        assert self._list is not None
        for raw in _names(self._list, self.null_separated, str(self)):
            name = normal(os.fsdecode(raw))
            if b"\0" in raw:
                yield Job(name, InputError("not_found", "a file name cannot hold a NUL byte "
                                           "(is the list NUL-separated? then give -0)"))
            else:
                yield from _unless_skipped(name, skip)

    def _open_list(self) -> BinaryIO:
        assert self.files_from is not None
        if self.files_from == STDIN:
            return self.stdin or sys.stdin.buffer
        try:
            return open(self.files_from, "rb")
        except OSError as exc:
            raise ConfigError(f"cannot read --files-from {self.files_from}: "
                              f"{exc.strerror or exc}") from exc


def normal(path: str) -> str:
    """`path` as records name it: pathlib's normal form."""
    return str(Path(path))


def has_magic(text: str) -> bool:
    return MAGIC.search(text) is not None


def glob(pattern: str) -> Iterator[tuple[str, bool]]:
    """(path, whether it is a directory) for each path `pattern` matches, one
    directory entry at a time. Hidden names match only a component that starts
    with `.`; `**` matches any number of directories, hidden ones and links
    to directories excepted."""
    return _glob(os.sep if pattern.startswith(os.sep) else "", _parts(pattern))


def _parts(pattern: str) -> list[str]:
    return [part for part in pattern.split(os.sep) if part]


def _glob(base: str, parts: list[str]) -> Iterator[tuple[str, bool]]:
    literal = 0
    while literal < len(parts) and not has_magic(parts[literal]):
        literal += 1
    if literal:
        base, parts = os.path.join(base, *parts[:literal]), parts[literal:]
        if not parts:
            if os.path.lexists(base):
                yield base, os.path.isdir(base)
            return
    part, rest = parts[0], parts[1:]
    if part == "**":
        for below in _tree(base):
            if rest:
                yield from _glob(below, rest)
            else:
                yield below, True
                yield from _files_in(below)
        return
    for entry in directory.entries(base or os.curdir):
        if entry.name.startswith(".") and not part.startswith("."):
            continue
        if fnmatch.fnmatchcase(entry.name, part):
            path = os.path.join(base, entry.name)
            if not rest:
                yield path, directory.is_dir(entry)
            elif directory.is_dir(entry):
                yield from _glob(path, rest)


def _tree(base: str) -> Iterator[str]:
    """`base` and every visible directory beneath it, links to directories not followed."""
    yield base
    pending = [base]
    while pending:
        current = pending.pop()
        for entry in directory.entries(current or os.curdir):
            if not entry.name.startswith(".") and _really_dir(entry):
                path = os.path.join(current, entry.name)
                pending.append(path)
                yield path


def _files_in(base: str) -> Iterator[tuple[str, bool]]:
    """The visible entries of `base` that _tree does not visit itself."""
    for entry in directory.entries(base or os.curdir):
        if not entry.name.startswith(".") and not _really_dir(entry):
            yield os.path.join(base, entry.name), directory.is_dir(entry)


def _really_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _kind(operand: str) -> str:
    """"directory", "file" or "pattern"; ConfigError when it names nothing. A
    name that exists is taken literally, whatever characters it holds."""
    if os.path.isdir(operand):
        return "directory"
    if os.path.lexists(operand):
        return "file"  # even a dangling link: reading it gives its record
    if has_magic(operand):
        if next(glob(operand), None) is None:
            raise ConfigError(f"{operand}: no file or directory matches this pattern")
        return "pattern"
    raise ConfigError(f"{operand} is not a directory, a file, or a glob pattern that "
                      "matches any (no such file or directory)")


def _unless_skipped(path: str, skip: Skip) -> Iterator[Job]:
    if not skip(path):
        yield Job(path)


def _names(handle: BinaryIO, null_separated: bool, shown: str) -> Iterator[bytes]:
    """The non-empty names in a list: one a line (a trailing CR dropped), or
    NUL-separated; read as they come, never the whole list at once."""
    try:
        if null_separated:
            read = getattr(handle, "read1", handle.read)  # what a pipe has now, not 64 KiB
            rest = b""
            while block := read(LIST_BLOCK_BYTES):
                *names, rest = (rest + block).split(b"\0")
                yield from (name for name in names if name)
            if rest:
                yield rest
        else:
            for line in handle:
                name = line.rstrip(b"\n")
                name = name[:-1] if name.endswith(b"\r") else name
                if name:
                    yield name
    except OSError as exc:
        raise ImgpipeError(f"cannot read {shown}: {exc.strerror or exc}") from exc


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
