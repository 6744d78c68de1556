"""Embeddings beside a results file: one float16 .npy that grows a batch at a time.

`imgpipe score --out FILE` with `model.output` "embedding" or "both" writes
each image's vector as one row of `FILE.embeddings.npy` and, in its record,
the row's index (`embedding_row`) instead of the numbers: a record stays a
line, and `np.load(..., mmap_mode="r")[row]` reads one vector without
loading the rest.

Memory stays flat: rows go to the end of the file as they come, and the
header's shape is rewritten in place after each batch. The header has a
fixed size (128 bytes, room for any row count), so rewriting it never moves
the rows. Rows are written before the records naming them, so a record's
row always exists; a run cut short leaves at worst rows no record names, and
a torn last row, which the next run cuts off before it appends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional

import numpy as np

from pipeline.embeddings import DTYPE
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.items import Record
    from pipeline.sinks.results import ResultSink

SUFFIX = ".embeddings.npy"
MAGIC = b"\x93NUMPY\x01\x00"
HEADER_BYTES = 128  # magic, length, then the dict padded with spaces to a newline


def embeddings_path(results: Path) -> Path:
    """Where the embeddings of the results file `results` go."""
    return results.with_name(results.name + SUFFIX)


class EmbeddingFile:
    """Appends float16 rows to a .npy file, its header kept up to date."""

    def __init__(self, path: Path, fresh: bool) -> None:
        """Continue `path` where an earlier run left it, or (`fresh`) start it anew:
        empty until the first row says how wide rows are, but there, so that a
        results file whose records name no row yet still has its file."""
        self.path = path
        self.dim: Optional[int] = None
        self.rows = 0
        self._handle: Optional[BinaryIO] = None
        if fresh or not path.exists():
            path.write_bytes(b"")
        elif path.stat().st_size > 0:
            self._resume()

    def append(self, vectors: np.ndarray) -> int:
        """Write `vectors` (rows x dim) and return the index of the first."""
        rows = np.ascontiguousarray(vectors, dtype=DTYPE)
        handle = self._open(rows.shape[1])
        if rows.shape[1] != self.dim:
            raise ValueError(f"embedding of {rows.shape[1]} values in a file of {self.dim}")
        first = self.rows
        handle.seek(HEADER_BYTES + first * self._row_bytes)
        handle.write(rows.tobytes())
        self.rows += rows.shape[0]
        self._write_header(handle)
        handle.flush()
        return first

    def close(self) -> None:
        if self._handle is not None:
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    @property
    def _row_bytes(self) -> int:
        assert self.dim is not None
        return self.dim * DTYPE.itemsize

    def _open(self, dim: int) -> BinaryIO:
        if self._handle is None:
            if self.dim is None:  # a new file: its width is the first vector's
                self.dim = dim
            self._handle = open(self.path, "r+b")  # noqa: SIM115 (closed by close())
        return self._handle

    def _resume(self) -> None:
        """Read the width from the header and count the whole rows after it."""
        try:
            with open(self.path, "rb") as handle:
                if np.lib.format.read_magic(handle) != (1, 0):
                    raise ValueError("not .npy format 1.0")
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                if handle.tell() != HEADER_BYTES or fortran or dtype != DTYPE or len(shape) != 2:
                    raise ValueError("not a float16 table with a 128-byte header")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path} is not an embeddings file imgpipe wrote ({exc}); "
                              f"--overwrite starts the results afresh") from exc
        self.dim = int(shape[1])
        self.rows = (self.path.stat().st_size - HEADER_BYTES) // self._row_bytes
        os.truncate(self.path, HEADER_BYTES + self.rows * self._row_bytes)  # a torn last row

    def _write_header(self, handle: BinaryIO) -> None:
        text = repr({"descr": DTYPE.str, "fortran_order": False, "shape": (self.rows, self.dim)})
        length = HEADER_BYTES - len(MAGIC) - 2
        header = MAGIC + length.to_bytes(2, "little") + text.ljust(length - 1).encode() + b"\n"
        handle.seek(0)
        handle.write(header)


class EmbeddingRows:
    """A result sink that puts each record's embedding in an EmbeddingFile and its
    row index in the record, then hands the records on."""

    def __init__(self, inner: ResultSink, rows: EmbeddingFile) -> None:
        self.inner = inner
        self.file = rows

    def write(self, records: list[Record]) -> None:
        carrying = [record for record in records if "embedding" in record]
        if carrying:
            first = self.file.append(np.stack([record["embedding"] for record in carrying]))
            for offset, record in enumerate(carrying):
                del record["embedding"]
                record["embedding_row"] = first + offset
        self.inner.write(records)

    def close(self) -> None:
        self.file.close()
        self.inner.close()
