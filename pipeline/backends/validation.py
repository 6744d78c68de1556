"""Does a candidate variant (another backend, bf16, int8) score like the reference?

The reference is the eager fp32 `TorchBackend`. Both score the same
preprocessed samples. `agreement` and `check`: the candidate passes when its
top-1 class agrees with the reference's on at least `threshold` of them.

`imgpipe optimize` judges on a validation set of real photographs
(`validation_set`), labelled or not, with `judge`:

- labelled (subdirectories named by class, or a labels CSV): a candidate's
  top-1 accuracy must be at least `MIN_ACCURACY_RATIO` of the reference's on
  the same images (MLPerf's rule for closed-division quantized submissions);
- unlabelled: its top-1 agreement with the reference must reach
  `DEFAULT_AGREEMENT`, chosen from measurements on real photographs
  (README.md, `imgpipe optimize`);
- either way, on fewer than `MIN_JUDGED_IMAGES` images it is undecided.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from pipeline.errors import ConfigError, ModelLoadError
from pipeline.predictions import to_numpy

DEFAULT_THRESHOLD = 0.99  # `check`: a backend that must score like eager fp32
MIN_ACCURACY_RATIO = 0.99  # labelled sets: top-1 accuracy, as a fraction of eager fp32's
# Unlabelled photographs: least top-1 agreement. On imagenet-val-100, variants within
# 1% of fp32's accuracy agreed on 95-99% of the photos, broken ones on 85% or less
# (README.md, `imgpipe optimize`).
DEFAULT_AGREEMENT = 0.93
MIN_JUDGED_IMAGES = 100  # fewer leave a variant undecided: one image would be >1% of them
LABELS_CSV = "labels.csv"  # a labelled set's labels, when they are not its subdirectories
LABEL_COLUMNS = ("index", "wnid", "label", "name")  # in a labels CSV; the first present counts
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff",
                            ".webp", ".ppm", ".pgm", ".pbm", ".pnm"})
WNID = re.compile(r"n\d{8}")


class Scorer(Protocol):
    """What `agreement` needs of a backend."""

    max_batch_size: int

    def predict(self, samples: Sequence[np.ndarray]) -> torch.Tensor | np.ndarray: ...


@dataclass(frozen=True)
class Agreement:
    top1: float  # fraction of samples with the same top-1 class
    max_score_drift: float  # largest absolute difference of any softmax probability
    images: int


def agreement(reference: Scorer, candidate: Scorer, samples: Sequence[np.ndarray]) -> Agreement:
    """Score `samples` (uint8 CHW) with both backends, in batches both accept."""
    if not samples:
        raise ValueError("agreement needs at least one sample")
    step = min(reference.max_batch_size, candidate.max_batch_size)
    same, drift = 0, 0.0
    for start in range(0, len(samples), step):
        chunk = samples[start:start + step]
        expected = _probabilities(reference.predict(chunk))
        actual = _probabilities(candidate.predict(chunk))
        if expected.shape != actual.shape:
            raise ValueError(f"reference gives {tuple(expected.shape)} scores, "
                             f"candidate {tuple(actual.shape)}")
        same += int((expected.argmax(dim=1) == actual.argmax(dim=1)).sum())
        drift = max(drift, float((expected - actual).abs().max()))
    return Agreement(top1=same / len(samples), max_score_drift=drift, images=len(samples))


def check(result: Agreement, threshold: float = DEFAULT_THRESHOLD) -> None:
    """ModelLoadError (one line, with the numbers) when top-1 agreement is under `threshold`."""
    if result.top1 < threshold:
        raise ModelLoadError(
            f"candidate backend disagrees with the torch fp32 reference: top-1 agreement "
            f"{_percent(result.top1)} is under the {_percent(threshold)} threshold "
            f"({result.images} images, max score drift {result.max_score_drift:.4g})")


def _probabilities(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.softmax(torch.as_tensor(to_numpy(logits)).float(), dim=1)


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"


# --- judging a variant on a validation set ----------------------------------------


def probabilities(backend: Scorer, samples: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, classes) softmax of `samples` (uint8 CHW), in batches `backend` accepts."""
    if not samples:
        raise ValueError("probabilities needs at least one sample")
    step = backend.max_batch_size
    return torch.cat([_probabilities(backend.predict(samples[start:start + step]))
                      for start in range(0, len(samples), step)])


@dataclass(frozen=True)
class Judgement:
    """A candidate's scores next to the reference's, on the same images."""

    images: int
    top1_agreement: float  # fraction with the reference's top-1 class
    max_score_drift: float  # largest absolute difference of any softmax probability
    top1: Optional[float] = None  # accuracy, when the images are labelled
    top5: Optional[float] = None
    reference_top1: Optional[float] = None  # the reference's, on the same images
    reference_top5: Optional[float] = None


def judge(reference: torch.Tensor, candidate: torch.Tensor,
          labels: Optional[Sequence[int]] = None) -> Judgement:
    """Compare two (N, classes) probability tensors, and both with `labels` if given."""
    if reference.shape != candidate.shape:
        raise ValueError(f"reference gives {tuple(reference.shape)} scores, "
                         f"candidate {tuple(candidate.shape)}")
    images = int(reference.shape[0])
    if images == 0:
        return Judgement(0, 0.0, 0.0)
    agree = float((reference.argmax(dim=1) == candidate.argmax(dim=1)).double().mean())
    drift = float((reference - candidate).abs().max())
    if labels is None:
        return Judgement(images, agree, drift)
    truth = torch.as_tensor(list(labels), dtype=torch.long)
    if truth.shape != (images,):
        raise ValueError(f"{len(labels)} labels for {images} images")
    return Judgement(images, agree, drift, _top(candidate, truth, 1), _top(candidate, truth, 5),
                     _top(reference, truth, 1), _top(reference, truth, 5))


def refusal(result: Judgement, threshold: float = DEFAULT_AGREEMENT,
            min_ratio: float = MIN_ACCURACY_RATIO) -> Optional[str]:
    """Why `result` fails its rule (accuracy ratio when labelled, agreement otherwise),
    or None when it passes. Whether there were enough images is the caller's question."""
    if result.top1 is None or result.reference_top1 is None:
        if result.top1_agreement < threshold:
            return (f"top-1 agreement {result.top1_agreement:.2%} under the "
                    f"{threshold:.2%} threshold")
        return None
    if result.reference_top1 == 0:
        return "eager fp32 gets none of these images right: the labels cannot judge it"
    ratio = result.top1 / result.reference_top1
    if ratio < min_ratio:
        return (f"top-1 accuracy {result.top1:.2%} is {ratio:.2%} of eager fp32's "
                f"{result.reference_top1:.2%} on the same images, under {min_ratio:.0%}")
    return None


def _top(probabilities: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    k = min(k, probabilities.shape[1])
    hits = (probabilities.topk(k, dim=1).indices == truth[:, None]).any(dim=1)
    return float(hits.double().mean())


# --- validation sets: real photographs, labelled or not ---------------------------


class ClassNames:
    """Resolves a label as written in a validation set to the model's class index.

    A label is a class index (``"5"``), a WordNet id (``"n01496331"``, with a
    list of the model's WordNet ids in class order) or a class name (``"electric
    ray"``, as the model's labels spell it; case is ignored when that is unambiguous).
    """

    def __init__(self, model: str, labels: Sequence[str],
                 wnids: Optional[Sequence[str]] = None) -> None:
        self.model, self.count = model, len(labels)
        self.wnids = {wnid: index for index, wnid in enumerate(wnids or ())}
        self.has_wnids = wnids is not None
        self.names: dict[str, list[int]] = {}
        self.folded: dict[str, list[int]] = {}
        for index, name in enumerate(labels):
            self.names.setdefault(name, []).append(index)
            self.folded.setdefault(name.casefold(), []).append(index)

    def index(self, label: str, where: str) -> Optional[int]:
        """The class index `label` names; None when it names none of them.
        ConfigError when it names several, or is a WordNet id without a list."""
        text = label.strip()
        if text.isdigit():
            return int(text) if int(text) < self.count else None
        if WNID.fullmatch(text) and text not in self.names:
            if not self.has_wnids:
                raise ConfigError(
                    f"{where}: labels such as {text!r} are WordNet ids, and {self.model} "
                    f"comes with no WordNet id list: pass --wnids FILE (one id per line, "
                    f"in class-index order), or label by class index or class name")
            return self.wnids.get(text)
        found = self.names.get(text) or self.folded.get(text.casefold()) or []
        if len(found) > 1:
            raise ConfigError(f"{where}: label {text!r} names {len(found)} classes of "
                              f"{self.model} ({', '.join(map(str, found))}): use the class "
                              f"index or WordNet id")
        return found[0] if found else None

    def unknown(self, labels: Sequence[str], where: str) -> ConfigError:
        """The one-line error for labels that name no class of the model."""
        shown = ", ".join(repr(label) for label in labels[:5])
        more = f" and {len(labels) - 5} more" if len(labels) > 5 else ""
        ways = "a class index (0-{}), {}or a class name".format(
            self.count - 1, "a WordNet id, " if self.has_wnids else "")
        return ConfigError(f"{where}: {len(labels)} label{'s' if len(labels) > 1 else ''} "
                           f"unknown to {self.model}: {shown}{more} (a label is {ways}; "
                           f"--unlabelled judges on agreement with eager fp32 instead)")


def read_wnids(path: Path, count: int) -> list[str]:
    """WordNet ids in class-index order: the first word of each line (a plain list, or
    ImageNet's LOC_synset_mapping.txt), as many as the model has classes."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--wnids {path}: cannot read it ({exc})") from exc
    wnids = [line.split()[0] for line in lines if line.strip()]
    wrong = [wnid for wnid in wnids if not WNID.fullmatch(wnid)]
    if wrong:
        raise ConfigError(f"--wnids {path}: {wrong[0]!r} is not a WordNet id (n + 8 digits)")
    if len(wnids) != count:
        raise ConfigError(f"--wnids {path} lists {len(wnids)} WordNet ids, but the model "
                          f"has {count} classes")
    if len(set(wnids)) != len(wnids):
        raise ConfigError(f"--wnids {path} lists a WordNet id twice")
    return wnids


@dataclass(frozen=True)
class ValidationSet:
    """The files a variant is judged on, with their class indices when labelled."""

    directory: Path
    files: tuple[str, ...]
    labels: Optional[tuple[int, ...]]  # None: unlabelled
    labelled_by: str  # how the labels were found ("" when unlabelled)
    left_out: int  # files under `directory` with no label (labelled sets), not judged


def validation_set(directory: Path, classes: Optional[ClassNames],
                   labels_csv: Optional[Path] = None, limit: int = 500) -> ValidationSet:
    """At most `limit` files of `directory` (recursively), spread evenly over it (the
    smallest hashes of their relative paths, not the first in path order, which would
    be the first few classes of an ImageNet-style tree).

    Labelled (`classes` given) from `labels_csv`, else `directory`/labels.csv, else
    the first-level subdirectory names when every image is in one; unlabelled
    otherwise, or when `classes` is None. ConfigError for labels unknown to the model.
    """
    from pipeline.sources import directory as walker

    csv_file = labels_csv or directory / LABELS_CSV
    labeller: Optional[_Labeller] = None
    if classes is not None and (labels_csv is not None or csv_file.is_file()):
        labeller = _CsvLabels(csv_file, directory, classes)
    elif classes is not None and _class_subdirectories(directory):
        labeller = _SubdirectoryLabels(directory, classes)
    own = os.path.normpath(csv_file)
    left_out = 0

    def judged() -> Iterator[tuple[bytes, str, int]]:
        nonlocal left_out
        for job in walker.walk(str(directory), recursive=True):
            path = os.path.normpath(job.path)
            if path == own:
                continue
            label = labeller.label(path) if labeller is not None else -1
            if label is None:
                left_out += 1
                continue
            yield _spread(os.path.relpath(path, directory)), job.path, label

    chosen = sorted(heapq.nsmallest(limit, judged()), key=lambda item: item[1])
    if labeller is None:
        return ValidationSet(directory, tuple(path for _, path, _ in chosen), None, "", 0)
    labeller.check()
    if not chosen and left_out:
        raise ConfigError(f"{labeller.where}: none of the {left_out} files under "
                          f"{directory} has a label")
    return ValidationSet(directory, tuple(path for _, path, _ in chosen),
                         tuple(label for _, _, label in chosen), labeller.source, left_out)


class _Labeller(Protocol):
    where: str  # for error messages
    source: str  # how the labels were found, for the report

    def label(self, path: str) -> Optional[int]: ...

    def check(self) -> None: ...


class _SubdirectoryLabels:
    """Each file's label is the name of the first-level subdirectory it is in."""

    def __init__(self, directory: Path, classes: ClassNames) -> None:
        self.directory, self.classes = directory, classes
        self.where, self.source = f"--images {directory}", "subdirectory names"
        self.names: dict[str, Optional[int]] = {}

    def label(self, path: str) -> Optional[int]:
        parts = Path(os.path.relpath(path, self.directory)).parts
        if len(parts) < 2:
            return None  # beside the classes: not an image (a README, say)
        if parts[0] not in self.names:
            self.names[parts[0]] = self.classes.index(parts[0], self.where)
        return self.names[parts[0]]

    def check(self) -> None:
        unknown = sorted(name for name, index in self.names.items() if index is None)
        if unknown:
            raise self.classes.unknown(unknown, f"{self.where} (subdirectory names)")


class _CsvLabels:
    """Labels from a CSV with a `file` column and one of LABEL_COLUMNS; its files are
    relative to the validation directory (or absolute)."""

    def __init__(self, path: Path, directory: Path, classes: ClassNames) -> None:
        self.where = f"labels CSV {path}"
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                header = [name.strip() for name in reader.fieldnames or []]
                reader.fieldnames = header
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(f"{self.where}: cannot read it ({exc})") from exc
        column = next((name for name in LABEL_COLUMNS if name in header), None)
        if "file" not in header or column is None:
            raise ConfigError(f"{self.where}: needs a header with a 'file' column and one of "
                              f"{', '.join(LABEL_COLUMNS)} (it has: "
                              f"{', '.join(header) or 'none'})")
        self.source = f"{path.name} (column {column})"
        self.labels: dict[str, int] = {}
        unknown: set[str] = set()
        for row in rows:
            file, text = (row.get("file") or "").strip(), (row.get(column) or "").strip()
            if not file:
                continue
            index = classes.index(text, self.where)
            if index is None:
                unknown.add(text)
                continue
            key = os.path.normpath(os.path.join(directory, file))
            if self.labels.setdefault(key, index) != index:
                raise ConfigError(f"{self.where}: {file!r} has two labels")
        if unknown:
            raise classes.unknown(sorted(unknown), f"{self.where} (column {column})")

    def label(self, path: str) -> Optional[int]:
        return self.labels.get(path)

    def check(self) -> None:
        pass


def _spread(relative: str) -> bytes:
    return hashlib.blake2b(os.fsencode(relative), digest_size=8).digest()


def _class_subdirectories(directory: Path) -> bool:
    """Whether `directory` is in the ImageNet validation layout: subdirectories, and
    no image directly inside it."""
    from pipeline.sources import directory as walker

    subdirectories = False
    for entry in walker.entries(str(directory)):
        if entry.name.startswith("."):
            continue
        if walker.is_dir(entry):
            subdirectories = True
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            return False
    return subdirectories
