"""walk/count: a lazy directory walk that yields one Job per input file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.items import Job
from pipeline.sources.directory import count, walk


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{a.jpg, b.png, notes.txt, .hidden.jpg, sub/{c.jpg, .x.jpg, deeper/d.jpg},
    .hiddendir/e.jpg}"""
    for name in ["a.jpg", "b.png", "notes.txt", ".hidden.jpg", "sub/c.jpg", "sub/.x.jpg",
                 "sub/deeper/d.jpg", ".hiddendir/e.jpg"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path


def relative(jobs: list[Job], root: Path) -> set[str]:
    return {os.path.relpath(job.path, root) for job in jobs}


def test_walk_yields_the_visible_files_of_the_top_directory(tree):
    # when the directory is walked without recursion
    jobs = list(walk(str(tree)))

    # then every visible file is a Job, with no error; hidden files and all
    # sub-directories are skipped
    assert relative(jobs, tree) == {"a.jpg", "b.png", "notes.txt"}
    assert all(isinstance(job, Job) and job.error is None for job in jobs)
    assert all(job.path.startswith(str(tree) + os.sep) for job in jobs)


def test_each_file_is_yielded_exactly_once(tree):
    jobs = list(walk(str(tree), recursive=True))
    assert len(jobs) == len({job.path for job in jobs})


def test_recursive_walk_descends_into_visible_subdirectories(tree):
    # when walked recursively
    jobs = list(walk(str(tree), recursive=True))

    # then files of nested directories are included, hidden ones still are not
    assert relative(jobs, tree) == {"a.jpg", "b.png", "notes.txt", "sub/c.jpg",
                                    "sub/deeper/d.jpg"}


def test_skip_callback_filters_paths(tree):
    # given a callback that skips text files
    def skip(path: str) -> bool:
        return path.endswith(".txt")

    # when / then
    jobs = list(walk(str(tree), recursive=True, skip=skip))
    assert relative(jobs, tree) == {"a.jpg", "b.png", "sub/c.jpg", "sub/deeper/d.jpg"}
    assert count(str(tree), recursive=True, skip=skip) == 4


def test_skip_callback_receives_the_job_paths(tree):
    seen: list[str] = []

    def skip(path: str) -> bool:
        seen.append(path)
        return False

    jobs = list(walk(str(tree), skip=skip))
    assert sorted(seen) == sorted(job.path for job in jobs)


def test_directory_symlink_to_a_parent_is_one_loop_error_and_the_walk_ends(tree):
    # given a link inside sub/ that points back at the root
    (tree / "sub" / "up").symlink_to(tree, target_is_directory=True)

    # when walked recursively
    jobs = list(walk(str(tree), recursive=True))

    # then the link is one Job carrying a symlink_loop error, and nothing repeats
    loops = [job for job in jobs if job.error is not None]
    assert len(loops) == 1
    assert loops[0].error.code == "symlink_loop"
    assert loops[0].path == str(tree / "sub" / "up")
    assert relative([j for j in jobs if j.error is None], tree) == {
        "a.jpg", "b.png", "notes.txt", "sub/c.jpg", "sub/deeper/d.jpg"}


def test_directory_symlink_to_itself_is_a_loop(tree):
    (tree / "sub" / "here").symlink_to(tree / "sub", target_is_directory=True)
    loops = [job for job in walk(str(tree), recursive=True) if job.error is not None]
    assert [(os.path.relpath(j.path, tree), j.error.code) for j in loops] == [
        ("sub/here", "symlink_loop")]


def test_directory_symlink_to_a_sibling_is_followed(tree):
    # given a link to a directory that is not an ancestor
    (tree / "other").mkdir()
    (tree / "other" / "f.jpg").write_bytes(b"x")
    (tree / "sub" / "shortcut").symlink_to(tree / "other", target_is_directory=True)

    # when / then
    jobs = list(walk(str(tree), recursive=True))
    assert {"other/f.jpg", "sub/shortcut/f.jpg"} <= relative(jobs, tree)
    assert all(job.error is None for job in jobs)


def test_directory_symlinks_are_skipped_without_recursion(tree):
    (tree / "up").symlink_to(tree, target_is_directory=True)
    assert relative(list(walk(str(tree))), tree) == {"a.jpg", "b.png", "notes.txt"}


def test_broken_entries_are_still_yielded(tree):
    # given a dangling link and a self-loop link among the files
    (tree / "dangling.jpg").symlink_to(tree / "missing.jpg")
    (tree / "loop.jpg").symlink_to(tree / "loop.jpg")

    # when / then: they become Jobs so that reading them reports why
    names = relative(list(walk(str(tree))), tree)
    assert {"dangling.jpg", "loop.jpg"} <= names


def test_non_utf8_file_name_round_trips(tmp_path):
    # given a file whose name is the Latin-1 bytes b"caf\xe9.jpg"
    raw_name = b"caf\xe9.jpg"
    with open(os.path.join(os.fsencode(tmp_path), raw_name), "wb") as handle:
        handle.write(b"x")

    # when the directory is walked
    jobs = list(walk(str(tmp_path)))

    # then the path is a str that encodes back to the exact bytes on disk
    assert len(jobs) == 1
    assert isinstance(jobs[0].path, str)
    assert os.path.basename(os.fsencode(jobs[0].path)) == raw_name
    assert os.path.exists(jobs[0].path)


def test_walk_is_a_lazy_iterator_and_count_matches(tmp_path):
    # given a directory of 2,000 files
    for index in range(2000):
        (tmp_path / f"img_{index:05d}.jpg").touch()

    # when
    jobs = walk(str(tmp_path))

    # then walk hands back an iterator (nothing listed yet) and count agrees
    assert isinstance(jobs, Iterator)
    first = next(jobs)
    assert first.path.startswith(str(tmp_path))
    assert 1 + sum(1 for _ in jobs) == 2000
    assert count(str(tmp_path)) == 2000


def test_walk_does_not_touch_the_disk_until_iterated(tmp_path):
    # a generator: creating it on a directory that does not exist yet is fine
    root = tmp_path / "later"
    jobs = walk(str(root))
    root.mkdir()
    (root / "a.jpg").touch()
    assert [os.path.basename(job.path) for job in jobs] == ["a.jpg"]


def test_empty_directory_yields_nothing(tmp_path):
    assert list(walk(str(tmp_path), recursive=True)) == []
    assert count(str(tmp_path)) == 0


REAL_SCANDIR = os.scandir


class ListingThatStops:
    """os.scandir over a real directory whose listing fails past its first entry:
    a walk that reads the whole listing before yielding cannot get its first job."""

    def __init__(self, path: str) -> None:
        self.real = REAL_SCANDIR(path)

    def __enter__(self) -> Iterator[os.DirEntry[str]]:
        return self._first_only()

    def __exit__(self, *exc_info: object) -> None:
        self.real.close()

    def _first_only(self) -> Iterator[os.DirEntry[str]]:
        yield next(entry for entry in self.real if not entry.name.startswith("."))
        raise AssertionError("the listing was read past the entry the walk yielded")


def test_the_walk_yields_its_first_job_before_reading_the_rest_of_the_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(1000):
        (tmp_path / f"{index:04}.jpg").write_bytes(b"x")
    monkeypatch.setattr(os, "scandir", ListingThatStops)
    first = next(walk(str(tmp_path)))
    assert first.path.startswith(str(tmp_path)) and first.error is None
