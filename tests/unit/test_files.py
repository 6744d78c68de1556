"""read_file: bytes of a regular file, or an InputError with a stable code."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.sources.files import read_file

LIMIT = 1024 * 1024


def expect_code(path, code: str, max_bytes: int = LIMIT) -> InputError:
    with pytest.raises(InputError) as caught:
        read_file(str(path), max_bytes)
    assert caught.value.code == code, caught.value.message
    return caught.value


def test_regular_file_returns_its_bytes(tmp_path):
    # given a file with binary content
    content = bytes(range(256)) * 40
    path = tmp_path / "image.jpg"
    path.write_bytes(content)

    # when / then
    assert read_file(str(path), LIMIT) == content


def test_empty_file_returns_no_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert read_file(str(path), LIMIT) == b""


def test_file_of_exactly_max_bytes_is_read(tmp_path):
    path = tmp_path / "edge.bin"
    path.write_bytes(b"x" * 100)
    assert read_file(str(path), 100) == b"x" * 100


def test_symlink_to_a_file_is_followed(tmp_path):
    target = tmp_path / "target.jpg"
    target.write_bytes(b"pixels")
    link = tmp_path / "link.jpg"
    link.symlink_to(target)
    assert read_file(str(link), LIMIT) == b"pixels"


def test_missing_file_is_not_found(tmp_path):
    expect_code(tmp_path / "gone.jpg", "not_found")


def test_dangling_symlink_is_not_found(tmp_path):
    # given a link to a file that does not exist
    link = tmp_path / "dangling.jpg"
    link.symlink_to(tmp_path / "nowhere.jpg")

    # when / then
    expect_code(link, "not_found")


def test_self_referencing_symlink_is_a_symlink_loop(tmp_path):
    # given a link that points at itself
    link = tmp_path / "loop.jpg"
    link.symlink_to(link)

    # when / then
    expect_code(link, "symlink_loop")


def test_directory_is_not_a_file(tmp_path):
    directory = tmp_path / "photos.jpg"
    directory.mkdir()
    expect_code(directory, "not_a_file")


def test_fifo_is_not_a_file_and_does_not_block(tmp_path):
    # given a named pipe with no writer (a plain open() would block forever)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: list[Exception | bytes] = []

    def attempt() -> None:
        try:
            result.append(read_file(str(fifo), LIMIT))
        except Exception as exc:  # reported below
            result.append(exc)

    # when it is read in a thread
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=5)
    if thread.is_alive():  # unblock the reader so the test run can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=5)
        pytest.fail("read_file blocked on a FIFO")

    # then it failed at once with not_a_file
    assert len(result) == 1
    assert isinstance(result[0], InputError), result[0]
    assert result[0].code == "not_a_file"


def test_file_over_max_bytes_is_refused(tmp_path):
    # given a file one byte over the limit
    path = tmp_path / "big.jpg"
    path.write_bytes(b"x" * 101)

    # when / then
    error = expect_code(path, "file_too_large", max_bytes=100)
    assert "101" in error.message and "100" in error.message


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_file_whose_size_is_unknown_up_front_is_still_capped():
    # given a regular file that stat reports as 0 bytes but that holds more
    # (procfs; a file growing between stat and read behaves the same way)
    path = "/proc/self/status"
    assert os.stat(path).st_size == 0
    assert len(Path(path).read_bytes()) > 10

    # when it is read with a 10-byte cap, then the cap holds
    expect_code(path, "file_too_large", max_bytes=10)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file_is_permission_denied(tmp_path):
    path = tmp_path / "secret.jpg"
    path.write_bytes(b"pixels")
    path.chmod(0)
    try:
        expect_code(path, "permission_denied")
    finally:
        path.chmod(0o600)


def test_non_utf8_file_name_is_read(tmp_path):
    # given a file whose name is not valid UTF-8
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    with open(raw, "wb") as handle:
        handle.write(b"pixels")

    # when it is read by its surrogate-escaped str name
    assert read_file(os.fsdecode(raw), LIMIT) == b"pixels"
