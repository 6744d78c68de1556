"""Decoding a JPEG's crop window only (`preprocess.dali_roi_decode`) against
decoding it whole, with DALI's CPU decoder.

(a) Decoding alone: `DaliBackend` (batches of 32, every core) over (i) the
100 ImageNet photos of ../shared/data (about 500x375) and (ii) 12-megapixel
photos made from 40 of them (upscaled to 4000x3000, with grain, quality 90;
made once under benchmarks/data). (b) The whole command a user types with
DALI, `imgpipe score DIR --backend dali --no-cache`, over (ii). Windowed and
whole alternate, each first in every other pair.

    .venv/bin/python -m benchmarks.bench_roi_decode [--repeats 3]
"""

from __future__ import annotations

import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from benchmarks import datasets, harness
from benchmarks.bench_handoff import flat_photos

MODES = ("off", "on")
LARGE = (4000, 3000)


def large_photos(count: int = 40) -> Path:
    """`count` 12-megapixel JPEGs made from the shared photos, made once."""
    directory = datasets.DATA / f"photos-12mp-n{count}-v1"
    if (directory / datasets.COMPLETE).exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index, path in enumerate(sorted(datasets.SHARED_PHOTOS.glob("*/*.JPEG"))[:count]):
        with Image.open(path) as photo:
            size = LARGE if photo.width >= photo.height else LARGE[::-1]
            big = np.asarray(photo.convert("RGB").resize(size, Image.Resampling.BICUBIC),
                             np.int16)
        grain = rng.normal(0, 3, big.shape[:2]).astype(np.int16)[..., None]
        Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8)).save(
            directory / f"{index:03d}.jpg", quality=90)
    (directory / datasets.COMPLETE).write_text(f"{count}\n")
    return directory


def decode_rate(directory: Path, roi_decode: str) -> dict[str, Any]:
    """Images/s of DaliBackend over `directory`, in batches of 32."""
    from pipeline.preprocess import DecoderHints
    from pipeline.preprocess.dali import DaliBackend
    from pipeline.spec import InputLimits, PreprocessSpec

    images = [path.read_bytes() for path in datasets.list_images(directory)]
    dali = DaliBackend(PreprocessSpec(), InputLimits(), num_threads=harness.CORES,
                       batch_size=32, hints=DecoderHints(roi_decode=roi_decode))
    dali.setup()
    try:
        started = time.perf_counter()
        outcomes = dali.run(images)
        seconds = time.perf_counter() - started
    finally:
        dali.close()
    if not all(isinstance(out, np.ndarray) for out in outcomes):
        raise RuntimeError(f"roi_decode {roi_decode}: not every image was decoded")
    return {"images_per_s": len(images) / seconds}


def command_rate(directory: Path, roi_decode: str, scratch: Path) -> dict[str, Any]:
    env = {**os.environ, "IMGPIPE_PREPROCESS__DALI_ROI_DECODE": roi_decode}
    out = scratch / f"{roi_decode}-{time.monotonic_ns()}.jsonl"
    timings, _ = harness.score_command(
        [harness.IMGPIPE, "score", str(directory), "--backend", "dali", "--no-cache",
         "--out", str(out)], env)
    return timings


def run(args: Any) -> dict[str, Any]:
    photos, large = flat_photos(), large_photos()
    info = harness.run_header(large, args, photos_warm_s=datasets.warm_page_cache(photos))
    for name, directory in (("decode_photos", photos), ("decode_large", large)):
        info[name] = harness.alternating(partial(decode_rate, directory), args.repeats,
                                         MODES)
    with tempfile.TemporaryDirectory() as scratch:
        command_rate(large, "off", Path(scratch))  # builds what a first run builds: not timed
        info["command_large"] = harness.alternating(
            lambda mode: command_rate(large, mode, Path(scratch)), args.repeats, MODES)
    return info


def report(n: dict[str, Any]) -> str:
    rows = [("(a) decoding alone, ImageNet photos (~500x375), images/s", "decode_photos",
             "images_per_s", True),
            ("(a) decoding alone, 12-megapixel photos, images/s", "decode_large",
             "images_per_s", True),
            ("(b) whole command, 12-megapixel photos, wall s", "command_large", "wall_s",
             False),
            ("(b) its scoring s (start-up excluded)", "command_large", "scoring_s", False)]
    lines = [harness.measured_on(n, "nvidia-dali-cuda120"), "",
             f"DALI's CPU decoder, batches of 32; {len(n['decode_large']['on'])} alternating "
             f"pairs; medians, and the median of the per-pair ratios.", "",
             *harness.paired_table(("whole", "window"), n, ("off", "on"), rows)]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = harness.parser(__doc__, "one pair")
    parser.add_argument("--repeats", type=int, default=3, help="alternating pairs")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    started = time.perf_counter()
    return harness.finish("roi_decode", args, run(args), started, report, block="roi_decode")


if __name__ == "__main__":
    raise SystemExit(main())
