"""Inputs: the files, directories, patterns and lists `imgpipe score` is given,
turned lazily into one Job per input file."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.sources.inputs import Inputs, glob


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path, holding a/{1.jpg, 2.png, .h.jpg, sub/{3.jpg, deep/4.jpg},
    .hid/5.jpg}, b/6.jpg and 7.jpg."""
    for name in ["a/1.jpg", "a/2.png", "a/.h.jpg", "a/sub/3.jpg", "a/sub/deep/4.jpg",
                 "a/.hid/5.jpg", "b/6.jpg", "7.jpg"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def paths(inputs: Inputs, skip=lambda path: False) -> list[str]:
    with inputs:
        return [job.path for job in inputs.jobs(skip)]


def test_files_directories_and_patterns_in_the_order_given(tree: Path) -> None:
    got = paths(Inputs(["7.jpg", "b", "a/*.png"]))
    assert got == ["7.jpg", "b/6.jpg", "a/2.png"]


def test_paths_are_in_pathlibs_normal_form_as_directories_always_were(tree: Path) -> None:
    assert paths(Inputs(["./7.jpg", "./b/", "a//*.png"])) == ["7.jpg", "b/6.jpg", "a/2.png"]


def test_a_directory_argument_is_walked_with_or_without_recursion(tree: Path) -> None:
    flat = Inputs(["a"])
    assert sorted(paths(flat)) == ["a/1.jpg", "a/2.png"]
    assert flat.subdirectories_left_out == 1  # a/sub; the hidden a/.hid is not counted
    assert sorted(paths(Inputs(["a"], recursive=True))) == [
        "a/1.jpg", "a/2.png", "a/sub/3.jpg", "a/sub/deep/4.jpg"]


def test_a_directory_a_pattern_matches_is_walked_like_an_argument(tree: Path) -> None:
    inputs = Inputs(["[ab]"])
    assert sorted(paths(inputs)) == ["a/1.jpg", "a/2.png", "b/6.jpg"]
    assert inputs.subdirectories_left_out == 1


def test_double_star_reaches_files_at_any_depth_and_keeps_only_files(tree: Path) -> None:
    assert sorted(paths(Inputs(["a/**/*.jpg"]))) == ["a/1.jpg", "a/sub/3.jpg",
                                                    "a/sub/deep/4.jpg"]
    # `**` alone: every visible file beneath, each once (no directory walked again)
    assert sorted(paths(Inputs(["a/**"]))) == ["a/1.jpg", "a/2.png", "a/sub/3.jpg",
                                              "a/sub/deep/4.jpg"]
    assert sorted(paths(Inputs(["**/6.jpg"]))) == ["b/6.jpg"]


def test_hidden_names_match_only_a_pattern_that_names_them(tree: Path) -> None:
    assert paths(Inputs(["a/*.jpg"])) == ["a/1.jpg"]
    assert paths(Inputs(["a/.*.jpg"])) == ["a/.h.jpg"]
    assert paths(Inputs(["a/.h.jpg"])) == ["a/.h.jpg"]  # named outright: scored


def test_double_star_does_not_follow_links_to_directories(tree: Path) -> None:
    (tree / "a" / "sub" / "up").symlink_to(tree / "a", target_is_directory=True)
    assert sorted(paths(Inputs(["a/**/*.jpg"]))) == ["a/1.jpg", "a/sub/3.jpg",
                                                    "a/sub/deep/4.jpg"]


def test_a_name_that_exists_is_taken_literally_even_with_pattern_characters(
        tree: Path) -> None:
    (tree / "[x].jpg").write_bytes(b"x")
    (tree / "x.jpg").write_bytes(b"x")
    assert paths(Inputs(["[x].jpg"])) == ["[x].jpg"]


@pytest.mark.parametrize(("operand", "message"), [
    ("missing.jpg", "missing.jpg is not a directory, a file, or a glob pattern"),
    ("a/*.gif", "a/*.gif: no file or directory matches this pattern"),
    ("nowhere/*.jpg", "nowhere/*.jpg: no file or directory matches this pattern"),
])
def test_an_argument_that_names_nothing_is_refused_before_any_job(
        tree: Path, operand: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        Inputs(["7.jpg", operand]).open()


def test_no_inputs_at_all_is_refused() -> None:
    with pytest.raises(ConfigError, match="nothing to score"):
        Inputs([]).open()


def test_a_dangling_link_is_an_input_whose_reading_says_why(tree: Path) -> None:
    (tree / "gone.jpg").symlink_to(tree / "never.jpg")
    assert paths(Inputs(["gone.jpg"])) == ["gone.jpg"]


def test_skip_applies_to_every_kind_of_input(tree: Path) -> None:
    skipped = {"7.jpg", "b/6.jpg", "a/2.png", "a/1.jpg"}
    listing = tree / "list.txt"
    listing.write_text("a/1.jpg\na/sub/3.jpg\n")
    got = paths(Inputs(["7.jpg", "b", "a/*.png"], files_from=str(listing)),
                skip=skipped.__contains__)
    assert got == ["a/sub/3.jpg"]


def test_a_list_names_one_file_a_line(tree: Path) -> None:
    listing = tree / "list.txt"
    listing.write_bytes(b"7.jpg\n\n./b/6.jpg\r\nmissing.jpg\na\n")
    # listed names are files, never walked or globbed: missing and a directory too
    assert paths(Inputs([], files_from=str(listing))) == [
        "7.jpg", "b/6.jpg", "missing.jpg", "a"]


def test_a_nul_separated_list_keeps_newlines_and_raw_bytes_in_names(tree: Path) -> None:
    odd = os.fsdecode(b"new\nline \xe9.jpg")
    stdin = io.BytesIO(b"7.jpg\0" + os.fsencode(odd) + b"\0\0b/6.jpg")
    assert paths(Inputs([], files_from="-", null_separated=True, stdin=stdin)) == [
        "7.jpg", odd, "b/6.jpg"]


def test_a_nul_in_a_line_is_that_names_error_job(tree: Path) -> None:
    with Inputs([], files_from="-", stdin=io.BytesIO(b"7.jpg\0b/6.jpg\n")) as inputs:
        [job] = list(inputs.jobs())
    assert job.error is not None and job.error.code == "not_found"
    assert "-0" in job.error.message


def test_an_unreadable_list_is_refused_at_open(tree: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read --files-from nolist.txt"):
        Inputs([], files_from="nolist.txt").open()


def test_operands_come_before_the_list_and_count_matches(tree: Path) -> None:
    listing = tree / "list.txt"
    listing.write_text("a/1.jpg\n")
    inputs = Inputs(["b", "a/**/*.jpg"], files_from=str(listing))
    with inputs:
        assert [job.path for job in inputs.jobs()] == [
            "b/6.jpg", "a/1.jpg", "a/sub/3.jpg", "a/sub/deep/4.jpg", "a/1.jpg"]
        assert inputs.count() == 5


def test_a_list_read_from_standard_input_cannot_be_counted_in_advance(tree: Path) -> None:
    with Inputs(["7.jpg"], files_from="-", stdin=io.BytesIO(b"b/6.jpg\n")) as inputs:
        assert inputs.count() is None
        assert [job.path for job in inputs.jobs()] == ["7.jpg", "b/6.jpg"]


class Trickle(io.RawIOBase):
    """A pipe that hands out its first names, then fails if read again."""

    def __init__(self, first: bytes) -> None:
        self.first: bytes | None = first

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        if self.first is None:
            raise AssertionError("the list was read past the names the first job needs")
        n = len(self.first)
        buffer[:n] = self.first
        self.first = None
        return n


@pytest.mark.parametrize("null", [False, True])
def test_a_list_is_read_as_jobs_are_taken_not_whole(tree: Path, null: bool) -> None:
    separator = b"\0" if null else b"\n"
    stdin = io.BufferedReader(Trickle(b"7.jpg" + separator + b"b/6.jpg" + separator))
    with Inputs([], files_from="-", null_separated=null, stdin=stdin) as inputs:
        jobs = inputs.jobs()
        assert [next(jobs).path, next(jobs).path] == ["7.jpg", "b/6.jpg"]


REAL_SCANDIR = os.scandir


class ListingThatStops:
    """os.scandir whose listing fails past the first entry it hands out."""

    def __init__(self, path: str = ".") -> None:
        self.real = REAL_SCANDIR(path)

    def __enter__(self) -> Iterator[os.DirEntry[str]]:
        return self._first_only()

    def __exit__(self, *exc_info: object) -> None:
        self.real.close()

    def _first_only(self) -> Iterator[os.DirEntry[str]]:
        yield next(entry for entry in self.real if entry.name.endswith(".jpg"))
        raise AssertionError("the listing was read past the entry the pattern matched")


def test_a_pattern_matches_one_entry_at_a_time_not_a_whole_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(1000):
        (tmp_path / f"{index:04}.jpg").write_bytes(b"x")
    monkeypatch.setattr(os, "scandir", ListingThatStops)
    path, is_dir = next(glob(f"{tmp_path}/*.jpg"))
    assert path.startswith(str(tmp_path)) and not is_dir


def test_the_inputs_are_described_in_one_short_line(tree: Path) -> None:
    assert str(Inputs(["7.jpg", "b"], files_from="-")) == \
        "7.jpg, b, the files listed in standard input"
    assert str(Inputs([f"{n}.jpg" for n in range(1000)])) == "0.jpg, 1.jpg, 2.jpg, 997 more"
