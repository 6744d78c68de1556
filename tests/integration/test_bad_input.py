"""Bad input: every file gets one record naming its problem; the run goes on."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.builders import png_claiming
from tests.integration.conftest import IMGPIPE, read_jsonl


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_with_broken_data(width: int, height: int) -> bytes:
    """A PNG whose header and checksums are all valid, and whose compressed
    pixel data is not a zlib stream: it opens, then cannot be decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    garbage = bytes((index * 37 + 11) % 256 for index in range(400))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", garbage)
            + png_chunk(b"IEND", b""))


def large_png(width: int, height: int) -> bytes:
    """A valid one-colour RGB PNG of width x height: small on disk, and
    width x height x 4 bytes once decoded."""
    compressor = zlib.compressobj(1)
    row = b"\0" + bytes((120, 60, 200)) * width
    data = b"".join([*(compressor.compress(row) for _ in range(height)), compressor.flush()])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data)
            + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path) -> Path:
    """One directory with every kind of bad input, and two good photos."""
    root = tmp_path_factory.mktemp("bad")
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes((samples_dir / "rocket.jpg").read_bytes()[:20_000])
    (root / "random.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "notes.txt").write_text("not an image\n")
    (root / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    noise = np.random.default_rng(1).integers(0, 255, (6000, 8000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "huge.jpg", quality=75)
    (root / "secret.jpg").write_bytes((samples_dir / "coffee.jpg").read_bytes())
    os.chmod(root / "secret.jpg", 0)
    (root / "broken.png").write_bytes(png_with_broken_data(64, 48))
    # reading its own /proc/self/mem from offset 0 (never mapped) fails with EIO
    os.symlink("/proc/self/mem", root / "unreadable.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    shutil.copy(samples_dir / "coffee.jpg", os.fsencode(root) + b"/caf\xe9.jpg")
    shutil.copy(samples_dir / "chelsea.jpg", root / "cat.jpg")
    return root


def test_every_bad_file_gets_an_error_record(run, bad_dir: Path, tmp_path: Path) -> None:
    # given a directory of broken, hostile and valid files
    out = tmp_path / "results.jsonl"
    # when it is scored, obeying file modes so that a chmod 000 file is unreadable
    result = run("score", str(bad_dir), "--out", str(out), obey_file_modes=True)
    # then the run completes, with exactly one record per file
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    records = {os.path.basename(r["path"]): r for r in read_jsonl(out)}
    assert len(records) == len(os.listdir(bad_dir)) == 12
    codes = {name: r["error"]["code"] for name, r in records.items() if r["status"] == "error"}
    assert codes == {
        "zero.jpg": "empty_file",
        "truncated.jpg": "truncated",
        "random.jpg": "not_an_image",
        "notes.txt": "not_an_image",
        "bomb.png": "image_too_large",
        "secret.jpg": "permission_denied",
        "loop.jpg": "symlink_loop",
        "broken.png": "decode_failed",
        "unreadable.jpg": "io_error",
    }
    assert "100000x100000" in records["bomb.png"]["error"]["message"]
    assert "Input/output error" in records["unreadable.jpg"]["error"]["message"]
    # and the valid ones, including the huge one and the non-UTF-8 name, are scored
    assert records["cat.jpg"]["status"] == records["huge.jpg"]["status"] == "ok"
    assert records["caf\udce9.jpg"]["predictions"][0]["label"] == "espresso"
    assert os.path.exists(os.fsencode(records["caf\udce9.jpg"]["path"]))
    assert "errors by kind:" in result.stderr


def test_directory_link_loops_end(run, samples_dir: Path, tmp_path: Path) -> None:
    # given a tree whose subdirectory links back to its parent
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    shutil.copy(samples_dir / "coffee.jpg", root / "sub" / "coffee.jpg")
    os.symlink("..", root / "sub" / "up")
    out = tmp_path / "results.jsonl"
    # when it is scored recursively
    result = run("score", str(root), "--recursive", "--out", str(out))
    # then the walk ends, the photo is scored once and the loop is reported once
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out)
    assert sorted((os.path.basename(r["path"]), r["status"]) for r in records) == [
        ("coffee.jpg", "ok"), ("up", "error")]
    assert next(r for r in records if r["status"] == "error")["error"]["code"] == "symlink_loop"


class OomKiller:
    """What the kernel's OOM killer does to a process over its memory limit:
    SIGKILL any descendant of `pid` whose resident memory passes `limit_bytes`."""

    def __init__(self, pid: int, limit_bytes: int) -> None:
        self.parent = psutil.Process(pid)
        self.limit_bytes = limit_bytes
        self.killed: set[int] = set()  # pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            try:
                children = self.parent.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    if child.pid not in self.killed and \
                            child.memory_info().rss > self.limit_bytes:
                        child.kill()
                        self.killed.add(child.pid)
                except psutil.NoSuchProcess:
                    continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)


@pytest.mark.slow
def test_an_image_that_kills_its_worker_every_time_is_a_worker_crash(
        samples_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    # given two photos and a valid 9900x9900 PNG (about 400 MB once decoded),
    # scored by one worker under an OOM killer's 300 MB limit for the workers
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(samples_dir / "coffee.jpg", images / "coffee.jpg")
    shutil.copy(samples_dir / "chelsea.jpg", images / "cat.jpg")
    (images / "huge.png").write_bytes(large_png(9900, 9900))
    out = tmp_path / "results.jsonl"
    scoring = subprocess.Popen(
        [*IMGPIPE, "score", str(images), "--out", str(out), "--model", str(tiny_model),
         "--no-cache", "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, cwd=Path(__file__).resolve().parents[2])
    killer = OomKiller(scoring.pid, limit_bytes=300 * 2**20)
    try:
        _, stderr = scoring.communicate(timeout=240)
    finally:
        killer.stop()
        scoring.kill()
    # then the run completes, the huge image (killed with its chunk, then alone)
    # is a worker crash, and the photos that shared its chunk are scored
    assert scoring.returncode == 0, stderr
    assert "Traceback" not in stderr
    records = {os.path.basename(r["path"]): r for r in read_jsonl(out)}
    assert sorted(records) == ["cat.jpg", "coffee.jpg", "huge.png"]
    assert records["huge.png"]["status"] == "error", records["huge.png"]
    assert records["huge.png"]["error"]["code"] == "worker_crashed"
    assert records["coffee.jpg"]["status"] == records["cat.jpg"]["status"] == "ok"
    assert len(killer.killed) == 2, killer.killed
