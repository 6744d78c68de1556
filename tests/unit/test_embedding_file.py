"""FILE.embeddings.npy: float16 rows appended a batch at a time, readable by
numpy at any moment, resumed where a run stopped, its torn last row cut off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.sinks.embeddings import HEADER_BYTES, EmbeddingFile, EmbeddingRows


def rows(count: int, start: int = 0, dim: int = 4) -> np.ndarray:
    return np.arange(start * dim, (start + count) * dim, dtype=np.float16).reshape(count, dim)


def test_rows_are_appended_and_numpy_reads_them_after_each_batch(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl.embeddings.npy"
    made = EmbeddingFile(path, fresh=True)
    assert made.append(rows(2)) == 0
    assert np.load(path).tolist() == rows(2).tolist()  # valid before the file is closed
    assert made.append(rows(3, start=2)) == 2
    made.close()
    loaded = np.load(path, mmap_mode="r")
    assert loaded.dtype == np.float16 and loaded.shape == (5, 4)
    assert loaded.tolist() == rows(5).tolist()


def test_a_later_run_continues_the_rows_and_cuts_a_torn_one(tmp_path: Path) -> None:
    # given a file of three rows and half a row more (a run killed mid-write)
    path = tmp_path / "e.npy"
    first = EmbeddingFile(path, fresh=True)
    first.append(rows(3))
    first.close()
    with open(path, "ab") as handle:
        handle.write(b"\x00" * 3)

    # when a later run appends
    later = EmbeddingFile(path, fresh=False)
    assert later.append(rows(1, start=3)) == 3
    later.close()

    # then the rows run on from where the whole rows ended
    assert np.load(path).tolist() == rows(4).tolist()
    assert path.stat().st_size == HEADER_BYTES + 4 * 4 * 2


def test_fresh_starts_over_and_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "e.npy"
    np.save(path, np.zeros((2, 4), np.float32))
    with pytest.raises(ConfigError, match="not an embeddings file imgpipe wrote"):
        EmbeddingFile(path, fresh=False)
    made = EmbeddingFile(path, fresh=True)
    assert made.append(rows(1)) == 0
    made.close()
    assert np.load(path).shape == (1, 4)


class Kept:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def write(self, records: list[Any]) -> None:
        self.records.extend(records)

    def close(self) -> None:
        pass


def test_records_get_their_row_index_instead_of_the_numbers(tmp_path: Path) -> None:
    kept = Kept()
    sink = EmbeddingRows(kept, EmbeddingFile(tmp_path / "e.npy", fresh=True))
    vectors = rows(3)
    sink.write([{"path": "a", "status": "ok", "embedding": vectors[0]},
                {"path": "bad", "status": "error", "error": {"code": "x", "message": "y"}},
                {"path": "b", "status": "ok", "embedding": vectors[1]}])
    sink.write([{"path": "c", "status": "ok", "embedding": vectors[2]}])
    sink.close()
    assert [(r["path"], r.get("embedding_row")) for r in kept.records] == [
        ("a", 0), ("bad", None), ("b", 1), ("c", 2)]
    assert all("embedding" not in r for r in kept.records)
    saved = np.load(tmp_path / "e.npy")
    for record in kept.records:
        if "embedding_row" in record:
            assert saved[record["embedding_row"]].tolist() == vectors["abc".index(
                record["path"])].tolist()


def test_a_run_without_rows_leaves_an_empty_file_the_next_one_continues(
        tmp_path: Path) -> None:
    path = tmp_path / "e.npy"
    EmbeddingFile(path, fresh=True).close()  # every image of the run failed
    assert path.exists() and path.stat().st_size == 0
    later = EmbeddingFile(path, fresh=False)
    assert later.append(rows(2)) == 0
    later.close()
    assert np.load(path).tolist() == rows(2).tolist()
