"""Bad input: every file gets one record naming its problem; the run goes on."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.builders import png_claiming
from tests.integration.conftest import read_jsonl


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
    assert len(records) == len(os.listdir(bad_dir)) == 10
    codes = {name: r["error"]["code"] for name, r in records.items() if r["status"] == "error"}
    assert codes == {
        "zero.jpg": "empty_file",
        "truncated.jpg": "truncated",
        "random.jpg": "not_an_image",
        "notes.txt": "not_an_image",
        "bomb.png": "image_too_large",
        "secret.jpg": "permission_denied",
        "loop.jpg": "symlink_loop",
    }
    assert "100000x100000" in records["bomb.png"]["error"]["message"]
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
