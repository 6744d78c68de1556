"""The profile store: which inference variant `optimize` chose per model and weights,
and the batch and thread plan it measured fastest with it (pipeline/plans.py).

Read at every start when `model.backend = "auto"`, written by `optimize`.
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


def profile_path(cache_dir: Path, model: Identified) -> Path:
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(model.name).name)
    return cache_dir / PROFILES_SUBDIR / f"{slug}-{model.weights_digest[:16]}.json"


def chosen(cache_dir: Path, model: Identified) -> Optional[Profile]:
    """The profile `optimize` wrote for this model and these weights, if any (and valid)."""
    try:
        fields = json.loads(profile_path(cache_dir, model).read_text(encoding="utf-8"))
        variant = Variant(str(fields["backend"]), str(fields.get("precision", "fp32")))
        variant.validate()
    except (OSError, ValueError, TypeError, KeyError, ImgpipeError):
        return None
    images = fields.get("calibration_images")
    return Profile(variant, Path(images) if isinstance(images, str) else None,
                   Plan.from_json(fields.get("plan")))


def write_profile(cache_dir: Path, model: Identified, variant: Variant,
                  calibration_images: Optional[Path], validation: dict[str, Any],
                  measured: dict[str, Any], plan: Optional[Plan] = None) -> None:
    """Record `variant` as the choice for `model`, atomically, with what it was judged
    on and by which rule (`validation`) and what was measured."""
    path = profile_path(cache_dir, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {
        "model": model.name, "weights_digest": model.weights_digest,
        "backend": variant.backend, "precision": variant.precision,
        "calibration_images": str(calibration_images) if calibration_images else None,
        "validation": validation, "chosen_at": time.time(), "measured": measured,
        "plan": asdict(plan) if plan is not None else None}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
