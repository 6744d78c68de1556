"""The profile store: which inference variant `optimize` chose per model and weights,
and the batch and thread plan it measured fastest with it (pipeline/plans.py).

Read at every start when `model.backend = "auto"`, written by `optimize`.
For embeddings the variant is the fastest that `optimize` accepted for both
scores and features (pipeline/feature_guard.py), which may be slower than
the one chosen for scores alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

from pipeline.errors import ImgpipeError
from pipeline.plans import Plan
from pipeline.variants import Variant

PROFILES_SUBDIR = "profiles"
UNCHECKED = "its profile predates the features check (run imgpipe optimize again)"


class Identified(Protocol):
    """A model as profiles know it (a LoadedModel, or a ModelCard without torch)."""

    @property
    def name(self) -> str: ...

    @property
    def weights_digest(self) -> str: ...


@dataclass(frozen=True)
class Profile:
    """What `optimize` chose for one model and its weights."""

    variant: Variant
    calibration_images: Optional[Path]
    plan: Optional[Plan] = None  # None in profiles written before plans were measured
    embeddings: Optional[Variant] = None  # for embeddings; None: no variant passed
    embeddings_refused: str = UNCHECKED  # why `variant` is refused for embeddings


def profile_path(cache_dir: Path, model: Identified) -> Path:
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(model.name).name)
    return cache_dir / PROFILES_SUBDIR / f"{slug}-{model.weights_digest[:16]}.json"


def chosen(cache_dir: Path, model: Identified) -> Optional[Profile]:
    """The profile `optimize` wrote for this model and these weights, if any (and valid)."""
    try:
        fields = json.loads(profile_path(cache_dir, model).read_text(encoding="utf-8"))
        variant = Variant(str(fields["backend"]), str(fields.get("precision", "fp32")))
        variant.validate()
        embeddings = _embeddings(fields)
    except (OSError, ValueError, TypeError, KeyError, ImgpipeError):
        return None
    images = fields.get("calibration_images")
    return Profile(variant, Path(images) if isinstance(images, str) else None,
                   Plan.from_json(fields.get("plan")), *embeddings)


def _embeddings(fields: dict[str, Any]) -> tuple[Optional[Variant], str]:
    """The profile's variant for embeddings, and why the chosen one is refused for them."""
    if "embeddings" not in fields:
        return None, UNCHECKED
    named = fields["embeddings"]
    if not isinstance(named, dict):
        return None, str(fields.get("embeddings_refused", ""))
    variant = Variant(str(named["backend"]), str(named.get("precision", "fp32")))
    variant.validate()
    return variant, str(fields.get("embeddings_refused", ""))


def write_profile(cache_dir: Path, model: Identified, variant: Variant,
                  calibration_images: Optional[Path], validation: dict[str, Any],
                  measured: dict[str, Any], plan: Optional[Plan] = None,
                  embeddings: Optional[Variant] = None, embeddings_refused: str = "") -> None:
    """Record `variant` as the choice for `model`, atomically, with what it was judged
    on and by which rule (`validation`) and what was measured; `embeddings` is the
    choice for embeddings (None: none passed), `embeddings_refused` why `variant`
    is not it."""
    path = profile_path(cache_dir, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {
        "model": model.name, "weights_digest": model.weights_digest,
        "backend": variant.backend, "precision": variant.precision,
        "calibration_images": str(calibration_images) if calibration_images else None,
        "validation": validation, "chosen_at": time.time(), "measured": measured,
        "plan": asdict(plan) if plan is not None else None,
        "embeddings": None if embeddings is None else {
            "backend": embeddings.backend, "precision": embeddings.precision},
        "embeddings_refused": embeddings_refused}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
