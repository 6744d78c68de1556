"""The script a user would write instead of `imgpipe score`, and the baseline the
benchmarks compare imgpipe with: a torch DataLoader (one worker per core, batch
32) over files opened with PIL, converted to RGB and run through torchvision's
Resize(256), CenterCrop(224), ToTensor() and Normalize (the model's own mean and
std), then the eager model in eval mode under torch.no_grad(), softmax and top-5.

    python -m benchmarks.baseline DIR [--model NAME] [--out FILE | --out -]

--out writes each file's top-5 class indices as JSON lines; `-` writes them to
stdout a batch at a time, so that a reader sees the first record as soon as it
exists. The last line on stdout is {"images": N, "images_per_s": R}, timed from
creating the DataLoader iterator to the last batch. Run it as its own process
with OpenMP's default wait policy (harness.user_env), as a user's script runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Optional

from PIL import Image

from benchmarks import datasets
from benchmarks.harness import BATCH, CORES


class PhotoFiles:
    """A map-style dataset: files opened with PIL and run through `transform`."""

    def __init__(self, files: list[Path], transform: Callable[[Image.Image], Any]) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


def score(directory: Path, model_name: str, out: Optional[IO[str]]) -> dict[str, float]:
    """Every file of `directory` through the model; top-5 lines to `out`."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from pipeline.models import load_model

    loaded = load_model(model_name, datasets.weights_for(model_name))
    model = loaded.module.eval()
    torch.set_num_threads(CORES)
    recipe = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([m / 255 for m in loaded.mean], [s / 255 for s in loaded.std])])
    files = datasets.list_images(directory)
    loader: DataLoader[Any] = DataLoader(PhotoFiles(files, recipe),  # type: ignore[arg-type]
                                         batch_size=BATCH, num_workers=CORES)
    seen = 0
    started = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            top5 = model(batch).softmax(dim=1).topk(5).indices.tolist()
            if out is not None:
                out.writelines(json.dumps({"file": f.name, "top5": t}) + "\n"
                               for f, t in zip(files[seen:], top5, strict=False))
                out.flush()
            seen += len(batch)
    return {"images": seen, "images_per_s": seen / (time.perf_counter() - started)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--out", help="top-5 per file, as JSON lines (- for stdout)")
    args = parser.parse_args(argv)
    if args.out in (None, "-"):
        summary = score(args.directory, args.model, sys.stdout if args.out else None)
    else:
        with open(args.out, "w", encoding="utf-8") as out:
            summary = score(args.directory, args.model, out)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
