"""What `imgpipe optimize` prints: the validation set, the rule, a row per variant
(accuracy, agreement, drift, speed, features' cosine), which variant gives
embeddings, and the plans measured (pipeline/optimize.py measures them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from pipeline.backends.validation import MIN_JUDGED_IMAGES
from pipeline.feature_guard import MIN_COSINE

if TYPE_CHECKING:
    from pipeline.optimize import Outcome


def table(outcome: Outcome) -> list[str]:
    """What `imgpipe optimize` prints: the set and the rule, then a row per variant."""
    ref = outcome.reference
    labelled = (f"labelled by {outcome.labelled_by}" if outcome.labelled_by
                else "unlabelled")
    left_out = f"; {outcome.left_out} files left out (no label, or not an image)" \
        if outcome.left_out else ""
    lines = [f"validation: {count(outcome.judged, 'image')} of {outcome.images}, "
             f"{labelled}{left_out}"]
    if ref.reference_top1 is not None and ref.reference_top5 is not None:
        lines.append(f"eager fp32 (the reference): top-1 {ref.reference_top1:.2%}, top-5 "
                     f"{ref.reference_top5:.2%}")
    lines.append(f"rule: {outcome.rule}; at least {MIN_JUDGED_IMAGES} images to decide")
    if outcome.calibration:
        lines.append(outcome.calibration)
    lines.append(f"{'variant':<19}{'images':>6} {'top-1':>7} {'top-5':>7} {'agree':>7} "
                 f"{'drift':>6} {'images/s':>9} {'b1 p50':>9} {'cos mean':>8} "
                 f"{'cos min':>8}  verdict")
    for c in outcome.candidates:
        verdict = "ok" if c.accepted else (c.why if c.why.startswith("undecided")
                                           else f"refused: {c.why}")
        if c.images or c.images_per_s:
            measured = (f"{c.images:>6} {_percent(c.top1):>7} {_percent(c.top5):>7} "
                        f"{_percent(c.top1_agreement if c.images else None):>7} "
                        f"{c.max_score_drift:>6.3f} {c.images_per_s:>9.1f} "
                        f"{c.batch1_p50_ms:>6.1f} ms {_cosine(c.feature_cosine_mean):>8} "
                        f"{_cosine(c.feature_cosine_min):>8}")
        else:
            measured = (f"{'-':>6} {'-':>7} {'-':>7} {'-':>7} {'-':>6} {'-':>9} {'-':>9} "
                        f"{'-':>8} {'-':>8}")
        lines.append(f"{c.variant:<19}{measured}  {verdict}")
    lines.extend(outcome.notes)
    lines.extend(_embeddings_lines(outcome))
    if outcome.plans and outcome.chosen is not None:
        lines.append(f"plans, end to end with {outcome.chosen} over {outcome.plan_images} "
                     f"images:")
        lines.extend(f"  {plan.describe():<58}{plan.images_per_s:>8.1f} images/s"
                     for plan in outcome.plans)
    if outcome.plan is not None:
        lines.append(f"plan: {outcome.plan.describe()} (used by score and serve for the "
                     f"settings left at their defaults)")
    return lines


def _embeddings_lines(outcome: Outcome) -> list[str]:
    """Which variants are refused for embeddings and why, and the one chosen for them."""
    judged = [c for c in outcome.candidates if c.feature_cosine_min is not None]
    if not judged:
        return []
    lines = [f"embeddings: {c.variant} refused ({c.embeddings_refused})"
             for c in outcome.candidates if c.accepted and c.embeddings_refused]
    lines.append(f"embeddings: {outcome.embeddings or 'eager fp32 (torch)'} (features' cosine "
                 f"to eager fp32's at least {MIN_COSINE}, mean and minimum)")
    return lines


def _cosine(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2%}"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
