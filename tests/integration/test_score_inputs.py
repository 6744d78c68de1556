"""`imgpipe score` given files, directories, glob patterns and lists of files:
the real command, model and workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from tests.integration.conftest import IMGPIPE, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def score(*args: str, stdin: Optional[bytes] = None,
          cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*IMGPIPE, "score", *args], input=stdin, capture_output=True,
                          cwd=cwd, timeout=300)
    return subprocess.CompletedProcess(done.args, done.returncode,
                                       done.stdout.decode(errors="surrogateescape"),
                                       done.stderr.decode(errors="surrogateescape"))


def records(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out) if "imgpipe_results" not in r]


def top1(record: dict) -> str:
    return (record["predictions"][0]["label"] if record["status"] == "ok"
            else record["error"]["code"])


@pytest.fixture
def photos(tmp_path: Path, samples_dir: Path) -> Path:
    """tmp/{astronaut.jpg, extra/camera.png, photos/{coffee.jpg, chelsea.jpg, sub/rocket.jpg}}"""
    for name, target in [("astronaut.jpg", "astronaut.jpg"),
                         ("camera.png", "extra/camera.png"),
                         ("coffee.jpg", "photos/coffee.jpg"),
                         ("chelsea.jpg", "photos/chelsea.jpg"),
                         ("rocket.jpg", "photos/sub/rocket.jpg")]:
        (tmp_path / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples_dir / name, tmp_path / target)
    return tmp_path


def test_a_mix_of_files_patterns_and_directories_resumes_and_takes_a_list(
        photos: Path) -> None:
    out = photos / "results.jsonl"
    args = ["astronaut.jpg", "extra/*.png", "photos/", "--out", str(out), "--topk", "2"]
    # when a file, a pattern and a directory are scored (relative to the working directory)
    first = score(*args, cwd=photos)
    # then each file has one record, named as given, in the order given
    assert first.returncode == 0, first.stderr
    got = records(out)
    assert [r["path"] for r in got[:2]] == ["astronaut.jpg", "extra/camera.png"]
    assert sorted(r["path"] for r in got[2:]) == ["photos/chelsea.jpg", "photos/coffee.jpg"]
    labels = {r["path"]: top1(r) for r in got}
    assert labels["extra/camera.png"] == "tripod" and labels["photos/coffee.jpg"] == "espresso"
    assert labels["photos/chelsea.jpg"] in CATS
    assert "4 scored, 0 errors" in first.stderr
    assert "skipped 1 subdirectory; use --recursive" in first.stderr

    # when the same command runs again, with the same files named another way
    again = score("./astronaut.jpg", "extra/*.png", "photos", "--out", str(out), "--topk", "2",
                  cwd=photos)
    # then everything is already there: nothing is scored, no model loads
    assert again.returncode == 0, again.stderr
    assert "done: nothing to score in ./astronaut.jpg, extra/*.png, photos" in again.stderr
    assert len(records(out)) == 4

    # when a list adds a file below, one that is missing, and one already scored
    listing = photos / "more.txt"
    listing.write_text("photos/sub/rocket.jpg\nphotos/gone.jpg\nastronaut.jpg\n")
    listed = score(*args, "--files-from", str(listing), cwd=photos)
    # then only the new two get records; the missing one a not_found record
    assert listed.returncode == 0, listed.stderr
    new = records(out)[4:]
    assert [(r["path"], top1(r)) for r in new] == [("photos/sub/rocket.jpg", "missile"),
                                                   ("photos/gone.jpg", "not_found")]
    assert "1 scored, 1 errors" in listed.stderr


def test_a_nul_separated_list_on_standard_input(photos: Path) -> None:
    # given a file whose name holds a newline, listed NUL-separated as find -print0 does
    odd = photos / "photos" / "line\nbreak.jpg"
    shutil.copy(photos / "photos" / "coffee.jpg", odd)
    names = [str(odd), str(photos / "extra" / "camera.png")]
    # when the list comes on standard input and the records go to standard output
    done = score("--files-from", "-", "-0", "--out", "-", stdin=b"\0".join(
        os.fsencode(name) for name in names) + b"\0")
    # then each listed file has its record, the name kept whole
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["path"], top1(r)) for r in got] == [(str(odd), "espresso"),
                                                   (names[1], "tripod")]


@pytest.mark.parametrize(("argument", "message"), [
    ("photos/missing.jpg", "photos/missing.jpg is not a directory, a file, or a glob pattern"),
    ("photos/*.gif", "photos/*.gif: no file or directory matches this pattern"),
])
def test_an_argument_that_names_nothing_stops_the_command_with_one_line(
        photos: Path, argument: str, message: str) -> None:
    out = photos / "results.jsonl"
    done = score("astronaut.jpg", argument, "--out", str(out), cwd=photos)
    assert done.returncode == 2
    assert done.stderr.startswith(f"imgpipe: error: {message}")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()  # stopped before anything was written
