"""Which variant runs the model, and its backend built: the engine's model load.

In order: a variant named by model.backend; else, on a host surely without a
GPU, an ONNX export from an earlier run opened without torch (the variant
`optimize` chose while its profile stands, else the CPU default's checked
export); else the model loads with torch and runs the variant of optimize's
profile, the CPU default (ONNX Runtime fp32, exported and checked against
eager on first use), or eager PyTorch. A profile's batch and thread plan is
taken for the settings left at their defaults, at setup only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from pipeline import plans, prebuilt
from pipeline.config import Settings
from pipeline.errors import ImgpipeError, ModelLoadError, first_line
from pipeline.plans import Plan
from pipeline.prebuilt import PrebuiltBackend
from pipeline.profiles import Profile, chosen
from pipeline.variants import Variant

if TYPE_CHECKING:
    from pipeline.backends import InferenceBackend
    from pipeline.models import LoadedModel
    from pipeline.prebuilt import ModelCard

log = logging.getLogger("imgpipe.engine")
# backend "auto" without an optimize profile, on the CPU: lossless and ~3x eager.
CPU_DEFAULT = Variant("onnxruntime")


@dataclass
class Loaded:
    """A model and the backend that runs it, with the variant and why it runs."""

    device: Any  # a torch.device, or "cpu" for an export opened without torch
    model: LoadedModel | ModelCard
    inference: InferenceBackend
    variant: Variant
    note: str
    needs_setup: bool = False  # a backend built with torch, its setup() still to run


def surely_cpu(settings: Settings) -> bool:
    """Whether the model runs on the CPU, known without torch (whose CUDA check
    is the only sure one) where no GPU can be present."""
    device = settings.model.device
    return device == "cpu" or (device == "auto" and not _may_have_gpu())


def with_plan(settings: Settings, profile: Optional[Profile],
              plan: Optional[Plan] = None) -> tuple[Settings, Optional[Plan]]:
    """The settings with the batch and thread plan `optimize` measured with its
    variant, for those left at their defaults (pipeline/plans.py), and the plan
    that runs (the user's settings win); unchanged without one."""
    if profile is None or profile.plan is None:
        return settings, plan
    settings = plans.applied(settings, profile.plan)
    return settings, Plan(settings.preprocess.workers, settings.model.threads,
                          settings.batching.max_batch_size)


class ModelLoader:
    """Loads the model for `settings`; `choice` is optimize's recorded ONNX Runtime
    choice (prebuilt.recall_choice), `plan` the plan already taken. load() may
    take a profile's plan: then `settings` and `plan` are the new ones."""

    def __init__(self, settings: Settings, choice: Optional[prebuilt.Checked],
                 plan: Optional[Plan]) -> None:
        self.settings, self.choice, self.plan = settings, choice, plan

    def load(self, at_setup: bool) -> Loaded:
        return self._prebuilt() or self._with_torch(at_setup)

    def _chosen_note(self) -> str:
        plan = f"; {self.plan.describe()}" if self.plan is not None else ""
        return f"chosen by imgpipe optimize{plan}"

    def _key(self) -> str:
        return prebuilt.key_for(self.settings, features=self.settings.model.output != "logits")

    def _prebuilt(self) -> Optional[Loaded]:
        """An ONNX export from an earlier run, opened without torch: the variant
        `optimize` chose while its profile stands, else the CPU default's checked
        export when no profile does (for embeddings, the default's export with
        features, checked for them). None where none applies."""
        model_cfg = self.settings.model
        if model_cfg.backend != "auto" or not surely_cpu(self.settings):
            return None
        store, key = model_cfg.artifacts_directory(), self._key()
        embeddings = model_cfg.output != "logits"
        checked = prebuilt.recall(store, key) if embeddings else \
            self.choice or prebuilt.recall(store, key)
        if not isinstance(checked, prebuilt.Checked) or checked.features != embeddings or (
                not checked.chosen_by_optimize
                and chosen(self.settings.cache.directory(), checked.card)):
            return None
        backend = PrebuiltBackend(checked, self.settings.batching.max_batch_size,
                                  self.settings.preprocess.spec().output_shape,
                                  model_cfg.threads)
        try:
            backend.setup()
        except ModelLoadError as exc:
            log.warning("%s: exporting the model again", exc)
            prebuilt.forget(store, key)
            prebuilt.forget(store, prebuilt.key_for(self.settings, optimized=True))
            return None
        note = self._chosen_note() if checked.chosen_by_optimize else \
            f"the CPU default, {checked.note()}"
        return Loaded("cpu", checked.card, backend, Variant.parse(checked.variant), note)

    def _with_torch(self, at_setup: bool) -> Loaded:
        from pipeline.backends import backend_for, resolve_device
        from pipeline.models import load_model

        cfg = self.settings.model
        device = resolve_device(cfg.device)
        model = load_model(cfg.name, cfg.weights, cfg.labels,
                           self.settings.preprocess.spec().crop_size)
        profile = chosen(self.settings.cache.directory(), model)
        calibration_images = cfg.calibration_images
        embeddings = cfg.embeddings_setting()
        if embeddings is not None:  # a model with no head to tap stops here, in one line
            from pipeline.models.features import FeatureTap

            FeatureTap(model, embeddings).close()
        note = ""
        if cfg.backend != "auto":
            variant, note = Variant(cfg.backend, cfg.precision), "set by model.backend"
        elif profile is not None:
            if at_setup:
                self.settings, self.plan = with_plan(self.settings, profile, self.plan)
            variant, note = ((profile.variant, self._chosen_note()) if embeddings is None
                             else self._chosen_for_embeddings(profile))
            calibration_images = profile.calibration_images
        elif device.type == "cpu":
            checked, note = self._checked_default(model, device, embeddings)
            if checked is not None:
                return Loaded(device, model, checked, CPU_DEFAULT, note)
            variant = Variant("torch")
        else:
            variant, note = Variant("torch"), "eager: no checked faster variant on a GPU yet"
        backend = backend_for(self.settings, model, device, variant, calibration_images,
                              embeddings=embeddings)
        return Loaded(device, model, backend, variant, note, needs_setup=True)

    def _chosen_for_embeddings(self, profile: Profile) -> tuple[Variant, str]:
        """The variant optimize accepted for embeddings too (its features checked
        against eager fp32's), and why; eager fp32 when it accepted none."""
        if profile.embeddings == profile.variant:
            return profile.variant, self._chosen_note()
        refused = f"{profile.variant} is refused for embeddings: {profile.embeddings_refused}"
        if profile.embeddings is not None:
            return profile.embeddings, f"chosen by imgpipe optimize for embeddings ({refused})"
        return Variant("torch"), f"eager fp32, for embeddings ({refused})"

    def _checked_default(self, model: LoadedModel, device: Any, embeddings: Optional[str]
                         ) -> tuple[Optional[InferenceBackend], str]:
        """ONNX Runtime fp32, exported and checked against eager on first use (for
        `embeddings`, with its features and their check), and its note; no backend
        (eager, with the reason recorded and said once) when it fails either."""
        from pipeline.backends.checked import checked_default

        store, key = self.settings.model.artifacts_directory(), self._key()
        earlier = prebuilt.recall(store, key)
        if isinstance(earlier, prebuilt.Refused):
            return None, f"eager: the ONNX export was refused ({earlier.refused})"
        try:
            backend, checked = checked_default(self.settings, model, device, embeddings)
        except (ImgpipeError, RuntimeError, OSError) as exc:
            why = first_line(exc)
            log.warning("ONNX Runtime is not used for %s: %s; running eager PyTorch",
                        model.name, why)
            prebuilt.refuse(store, key, why)
            return None, f"eager: the ONNX export was refused ({why})"
        prebuilt.remember(store, key, checked)
        return backend, f"the CPU default, {checked.note()}"


def _may_have_gpu() -> bool:
    """Whether an NVIDIA GPU may be present: CUDA needs its device nodes."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
