"""Benchmark inputs: a cached directory of JPEGs built from the photos in samples/,
a labelled directory of real ImageNet photographs (from ../shared/data), and the
random weights of the models that have no bundled ones.

Every image is a deterministic function of (seed, index): a camera-like size
from `SIZES` (a quarter of them portrait), filled with a mosaic of randomly
cropped, flipped and rescaled tiles of the sample photographs, with a little
sensor-like grain so that upscaled tiles carry the high-frequency detail (and
file size) of a real photo of that size, saved at JPEG quality 85-92.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import time
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
DATA = Path(__file__).resolve().parent / "data"
FORMAT_VERSION = 1  # bump when the generator changes what it writes

# Landscape (width, height); common camera and web sizes, smallest to largest.
SIZES: tuple[tuple[int, int], ...] = (
    (320, 240), (640, 480), (1024, 768), (1600, 1200),
    (2048, 1536), (3264, 2448), (4000, 3000),
)
PORTRAIT_FRACTION = 0.25
QUALITY = (85, 92)  # inclusive
TILE_SIDE = 700  # mosaic tiles are about this many pixels on their shorter side
COMPLETE = ".complete"  # marker file; hidden, so directory.walk skips it
FULL_SIZE = 1000  # the generated directory; smaller runs take its first files
# 100 labelled ImageNet validation photographs (one per tenth class), shared, read-only.
SHARED_PHOTOS = REPO.parent / "shared" / "data" / "imagenet-val-100"
PHOTO_QUALITIES = tuple(range(85, 95))  # each photo is re-encoded once per quality
LABELS_FILE = ".labels.csv"  # hidden, so `imgpipe score DIR` and list_images skip it


def plan(seed: int, index: int) -> tuple[int, int, int]:
    """The width, height and JPEG quality of image `index`, from a seeded RNG."""
    rng = np.random.default_rng([seed, index, 0])
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    if rng.random() < PORTRAIT_FRACTION:
        width, height = height, width
    return width, height, int(rng.integers(QUALITY[0], QUALITY[1] + 1))


def ensure_dataset(count: int, seed: int = 0, root: Path = DATA) -> Path:
    """Return a directory of `count` JPEGs, generating it (in parallel) once."""
    directory = root / f"photos-n{count}-s{seed}-v{FORMAT_VERSION}"
    if (directory / COMPLETE).exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    todo = [(seed, i, directory) for i in range(count)
            if not (directory / file_name(i)).exists()]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        for _ in pool.imap_unordered(_write_one, todo, chunksize=4):
            pass
    (directory / COMPLETE).write_text(f"{count}\n")
    return directory


def first_images(count: int, seed: int = 0) -> Path:
    """The first `count` files of the full-size dataset (image i is the same in every
    size), or a dataset of `count` when that is larger."""
    return ensure_subset(ensure_dataset(max(count, FULL_SIZE), seed), count)


def ensure_labelled_photos(source: Path = SHARED_PHOTOS, root: Path = DATA) -> Path:
    """The shared ImageNet photographs, each re-encoded at every quality in
    PHOTO_QUALITIES (1,000 files for 100 photos): every file's bytes differ, so no
    cache keyed by content can hit, and each keeps its photo's label. One flat
    directory, made once; the labels are in its LABELS_FILE (file,index,name)."""
    directory = root / f"imagenet-val-100-x{len(PHOTO_QUALITIES)}-v{FORMAT_VERSION}"
    if (directory / COMPLETE).exists():
        return directory
    if not (source / "labels.csv").exists():
        raise RuntimeError(f"the labelled photographs are missing: {source}/labels.csv")
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(source / "labels.csv", encoding="utf-8", newline="") as handle:
        for photo in csv.DictReader(handle):
            for quality in PHOTO_QUALITIES:
                name = f"{photo['wnid']}-q{quality}.jpg"
                _reencode(source / photo["file"], directory / name, quality)
                rows.append({"file": name, "index": photo["index"], "name": photo["name"]})
    with open(directory / LABELS_FILE, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["file", "index", "name"])
        writer.writeheader()
        writer.writerows(rows)
    (directory / COMPLETE).write_text(f"{len(rows)}\n")
    return directory


def labels_of(directory: Path) -> dict[str, int]:
    """File name -> ImageNet class index, from ensure_labelled_photos' LABELS_FILE."""
    with open(directory / LABELS_FILE, encoding="utf-8", newline="") as handle:
        return {row["file"]: int(row["index"]) for row in csv.DictReader(handle)}


def _reencode(source: Path, target: Path, quality: int) -> None:
    """Save `source` again as a JPEG of `quality`, in its own colour mode (L, RGB,
    CMYK) so that decoding still has to deal with it."""
    with Image.open(source) as image:
        image.load()
        picture = image if image.mode in ("L", "RGB", "CMYK") else image.convert("RGB")
        partial = target.parent / f".{target.name}.partial"
        picture.save(partial, "JPEG", quality=quality)
    partial.replace(target)


def ensure_subset(source: Path, count: int) -> Path:
    """A directory of hard links to the first `count` files of `source` (sorted)."""
    files = list_images(source)
    if count >= len(files):
        return source
    directory = source.parent / f"{source.name}-first{count}"
    marker = directory / COMPLETE
    if not marker.exists():
        directory.mkdir(exist_ok=True)
        for path in files[:count]:
            link = directory / path.name
            if not link.exists():
                _link_or_copy(path, link)
        marker.write_text(f"{count}\n")
    return directory


def list_images(directory: Path) -> list[Path]:
    """Non-hidden files of a dataset directory, sorted by name."""
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def spread(files: list[Path], count: int) -> list[Path]:
    """`count` files evenly spaced over the list (keeps the mix of sizes)."""
    step = max(1, len(files) // count)
    return files[::step][:count]


def warm_page_cache(directory: Path) -> float:
    """Read every file once so no measurement pays for the disk; seconds taken."""
    started = time.perf_counter()
    for path in list_images(directory):
        path.read_bytes()
    return time.perf_counter() - started


def weights_for(model: str) -> Optional[Path]:
    """The bundled weights for EfficientNet-Lite0; random ones saved once otherwise."""
    if model == "efficientnet_lite0":
        return None
    path = DATA / f"{model}-random.pth"
    if not path.exists():
        import torch
        import torchvision

        torch.manual_seed(0)
        DATA.mkdir(parents=True, exist_ok=True)
        torch.save(torchvision.models.get_model(model, weights=None).state_dict(), path)
    return path


def file_name(index: int) -> str:
    return f"img{index:05d}.jpg"


def describe(directory: Path) -> dict[str, object]:
    """Counts by size and the total bytes of a dataset directory."""
    files = list_images(directory)
    sizes: dict[str, int] = {}
    for path in files:
        with Image.open(path) as image:
            key = "x".join(map(str, sorted(image.size, reverse=True)))
        sizes[key] = sizes.get(key, 0) + 1
    total = sum(p.stat().st_size for p in files)
    return {"files": len(files), "bytes": total, "sizes": dict(sorted(sizes.items()))}


def _write_one(task: tuple[int, int, Path]) -> None:
    seed, index, directory = task
    width, height, quality = plan(seed, index)
    image = render(width, height, np.random.default_rng([seed, index, 1]))
    final = directory / file_name(index)
    partial = directory / f".{final.name}.partial"
    image.save(partial, "JPEG", quality=quality)
    partial.replace(final)


def render(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photo-mosaic of the sample images at this size, with grain."""
    canvas = Image.new("RGB", (width, height))
    xs = np.linspace(0, width, max(1, round(width / TILE_SIDE)) + 1).astype(int)
    ys = np.linspace(0, height, max(1, round(height / TILE_SIDE)) + 1).astype(int)
    for left, right in pairwise(xs):
        for top, bottom in pairwise(ys):
            canvas.paste(_tile(int(right - left), int(bottom - top), rng), (int(left), int(top)))
    return _add_grain(canvas, rng)


def _tile(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A random crop of a random sample with the tile's aspect ratio, flipped maybe."""
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    aspect = width / height
    pw, ph = photo.size
    crop_w = min(pw, ph * aspect) * rng.uniform(0.6, 1.0)
    crop_h = crop_w / aspect
    left = rng.uniform(0, pw - crop_w)
    top = rng.uniform(0, ph - crop_h)
    tile = photo.resize((width, height), Image.Resampling.BICUBIC,
                        box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return tile


def _add_grain(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mild luminance grain (sigma 2-4 levels), as a camera sensor would add."""
    pixels = np.asarray(image, dtype=np.int16)
    sigma = rng.uniform(2.0, 4.0)
    grain = rng.normal(0.0, sigma, size=pixels.shape[:2]).astype(np.int16)
    noisy = np.clip(pixels + grain[..., None], 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB")


@lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    """The sample photographs as RGB images (loaded once per process)."""
    photos = []
    for path in sorted(SAMPLES.iterdir()):
        try:
            with Image.open(path) as image:
                photos.append(image.convert("RGB"))
        except OSError:
            continue  # LICENSE.md and anything else that is not an image
    if not photos:
        raise RuntimeError(f"no sample photos found in {SAMPLES}")
    return tuple(photos)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        target.write_bytes(source.read_bytes())
