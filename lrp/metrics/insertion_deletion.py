"""Insertion and deletion (Petsiuk et al. 2018, RISE) and ID = Ins - Del (Otsuki et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lrp.metrics._core import (
    check_images,
    make_baseline,
    model_device,
    perturbed_scores,
    prepare_heatmaps,
    resolve_classes,
    step_counts,
    step_positions,
)


@dataclass
class InsertionDeletionResult:
    """Per-image AUCs and curves; ``params`` logs every setting that changes the numbers."""

    insertion: Tensor  # (N,)
    deletion: Tensor  # (N,)
    id: Tensor  # (N,) insertion - deletion
    insertion_curve: Tensor  # (N, S+1)
    deletion_curve: Tensor  # (N, S+1)
    fractions: Tensor  # (S+1,) nominal fraction of pixels moved after each step
    target: Tensor  # (N,) class that was scored
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Mean insertion, deletion and ID over the batch (plain floats)."""
        return {
            "insertion": float(self.insertion.mean()),
            "deletion": float(self.deletion.mean()),
            "id": float(self.id.mean()),
            "n": int(self.insertion.numel()),
        }


def insertion_deletion(
    model: nn.Module,
    images: Tensor,
    heatmaps: Tensor,
    target: Tensor | int | None = None,
    *,
    pixels_per_step: int | None = None,
    steps: int = 100,
    baseline: str | Tensor = "zero",
    score: str = "softmax",
    score_class: str = "target",
    ties: str = "rank",
    reduce: str = "sum",
    batch_size: int = 256,
    seed: int = 0,
    noise_range: tuple[float, float] | None = None,
) -> InsertionDeletionResult:
    """Insertion and deletion curves and their trapezoid AUCs over the fraction of pixels.

    Pixels are ranked by the heatmap (descending; (N, C, H, W) maps are reduced with ``reduce``).
    Deletion starts from the image and replaces the top pixels (all channels) by the ``baseline``;
    insertion starts from the baseline and puts the top pixels back. After step i, k_i pixels have
    moved: ``min(i * pixels_per_step, H*W)`` when ``pixels_per_step`` is set (ceil(H*W / pps)
    steps, RISE's reference loop), else ``round(i * H*W / steps)``. ``ties="rank"`` moves exactly
    k_i pixels (ties broken by pixel index); ``"threshold"`` moves every pixel at or above the
    k_i-th value (tied pixels move together, as Otsuki et al.). The curve is evaluated at the
    nominal fractions k_i / (H*W).

    baseline: ``zero``, ``blur`` (11x11 Gaussian, sigma 5, as RISE), ``mean`` (per image and
    channel), ``uniform`` (one seeded noise pattern, scaled to ``noise_range`` or each image's
    range), or a tensor broadcastable to ``images``. score: ``softmax`` (fp32 or wider) or
    ``logit`` of the target class (``score_class="target"``, prediction when ``target`` is None) or
    of the class predicted on the unperturbed image (``"predicted"``).

    Forward-only, under ``torch.inference_mode``; all steps of all images share batches of
    ``batch_size`` on the model's device, and steps that give the same input (tied pixels with
    ``ties="threshold"``, the unperturbed image and the baseline at the two ends) are forwarded
    once. The model is used as given (put it in eval mode).
    """
    fn = "insertion_deletion"
    check_images(fn, images)
    device = model_device(model, images.device)
    images = images.to(device)
    heat = prepare_heatmaps(fn, heatmaps, images, reduce)
    n, _, h, w = images.shape
    counts = step_counts(h * w, steps, pixels_per_step, fn)
    with torch.inference_mode():
        classes, _, logits = resolve_classes(fn, model, images, target, score_class, batch_size)
        alt, baseline_name = make_baseline(fn, images, baseline, seed=seed, noise_range=noise_range)
        pos = step_positions(heat.reshape(n, h * w), ties, descending=True)
        curves = perturbed_scores(
            model,
            images,
            alt,
            pos,
            counts,
            classes,
            invert=(False, True),
            score=score,
            batch_size=batch_size,
            clean_logits=logits,
        )
    deletion_curve, insertion_curve = curves[0], curves[1]
    fractions = counts.to(device=device, dtype=torch.float64) / (h * w)
    ins = torch.trapezoid(insertion_curve, fractions, dim=1)
    dele = torch.trapezoid(deletion_curve, fractions, dim=1)
    params = {
        "metric": "insertion-deletion",
        "pixels_per_step": pixels_per_step,
        "steps": int(counts.numel() - 1),
        "baseline": baseline_name,
        "score": score,
        "score_class": score_class,
        "target_given": target is not None,
        "ties": ties,
        "reduce": reduce if heatmaps.dim() == 4 else "none",
        "seed": seed,
        "noise_range": list(noise_range) if noise_range is not None else None,
        "auc": "trapezoid over nominal pixel fraction in [0, 1]",
        "image_size": [h, w],
        "batch_size": batch_size,
    }
    return InsertionDeletionResult(
        insertion=ins,
        deletion=dele,
        id=ins - dele,
        insertion_curve=insertion_curve,
        deletion_curve=deletion_curve,
        fractions=fractions,
        target=classes,
        params=params,
    )
