"""Region perturbation MoRF / LeRF curves and AOPC (Samek et al. 2017; Binder et al. 2016)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrp.errors import InvalidInputError
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
class PerturbationResult:
    """Scores after each perturbation step and AOPC per image; ``params`` logs all settings."""

    curve: Tensor  # (N, steps+1), curve[:, 0] is the unperturbed score
    aopc: Tensor  # (N,) mean over k = 0..steps of curve[:, 0] - curve[:, k]
    target: Tensor  # (N,)
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return {"aopc": float(self.aopc.mean()), "n": int(self.aopc.numel())}


def region_sums(heat: Tensor, region: int) -> tuple[Tensor, Tensor]:
    """Sum an (N, H, W) map over a grid of ``region`` x ``region`` tiles (edge tiles smaller).

    Returns the (N, L) tile sums (row-major tiles) and the (H*W,) tile index of every pixel.
    """
    n, h, w = heat.shape
    th, tw = -(-h // region), -(-w // region)
    padded = F.pad(heat, (0, tw * region - w, 0, th * region - h))
    sums = padded.view(n, th, region, tw, region).sum(dim=(2, 4)).reshape(n, th * tw)
    rows = torch.arange(h, device=heat.device) // region
    cols = torch.arange(w, device=heat.device) // region
    tile_of_pixel = (rows[:, None] * tw + cols[None, :]).reshape(-1)
    return sums, tile_of_pixel


def perturbation_curve(
    model: nn.Module,
    images: Tensor,
    heatmaps: Tensor,
    target: Tensor | int | None = None,
    *,
    order: str = "morf",
    region: int = 9,
    steps: int = 100,
    perturbation: str | Tensor = "uniform",
    score: str = "logit",
    score_class: str = "target",
    ties: str = "rank",
    reduce: str = "sum",
    batch_size: int = 256,
    seed: int = 0,
    noise_range: tuple[float, float] | None = None,
) -> PerturbationResult:
    """Perturb non-overlapping ``region`` x ``region`` tiles in order of summed relevance.

    ``order="morf"``: most relevant first (a steep drop, i.e. a high AOPC, is good); ``"lerf"``:
    least relevant first (a flat curve is good). Step k has replaced the first k tiles (one tile per
    step) by ``perturbation`` (default ``uniform``: one seeded noise pattern scaled to each image's
    value range or to ``noise_range``; also ``zero``, ``blur``, ``mean`` or a tensor). ``steps`` is
    capped at the number of tiles (``params["steps"]`` says what ran).
    AOPC = 1/(steps+1) * sum_{k=0..steps} (f(x_0) - f(x_k)). Score defaults to the target logit as
    in Samek et al.; see :func:`lrp.metrics.insertion_deletion` for ``score``, ``score_class``,
    ``ties`` and ``reduce``. Forward-only, batched over all steps of all images.
    """
    fn = "perturbation_curve"
    if order not in ("morf", "lerf"):
        raise InvalidInputError(f"{fn}: unknown order={order!r}; choose 'morf' or 'lerf'")
    if not isinstance(region, int) or region < 1:
        raise InvalidInputError(f"{fn}: region must be a positive int, got {region!r}")
    check_images(fn, images)
    device = model_device(model, images.device)
    images = images.to(device)
    heat = prepare_heatmaps(fn, heatmaps, images, reduce)
    _, _, h, w = images.shape
    sums, tile_of_pixel = region_sums(heat, region)
    tiles = sums.shape[1]
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"{fn}: steps must be a positive int, got {steps!r}")
    used_steps = min(steps, tiles)
    counts = step_counts(tiles, None, 1, fn)[: used_steps + 1]
    with torch.inference_mode():
        classes, _, logits = resolve_classes(fn, model, images, target, score_class, batch_size)
        alt, pert_name = make_baseline(fn, images, perturbation, seed=seed, noise_range=noise_range)
        tile_pos = step_positions(sums, ties, descending=(order == "morf"))
        pos = tile_pos[:, tile_of_pixel]
        curve = perturbed_scores(
            model,
            images,
            alt,
            pos,
            counts,
            classes,
            invert=(False,),
            score=score,
            batch_size=batch_size,
            clean_logits=logits,
        )[0]
    aopc = (curve[:, :1] - curve).mean(dim=1)
    params = {
        "metric": "region-perturbation",
        "order": order,
        "region": region,
        "steps": used_steps,
        "steps_requested": steps,
        "tiles": tiles,
        "perturbation": pert_name,
        "score": score,
        "score_class": score_class,
        "target_given": target is not None,
        "ties": ties,
        "reduce": reduce if heatmaps.dim() == 4 else "none",
        "seed": seed,
        "noise_range": list(noise_range) if noise_range is not None else None,
        "image_size": [h, w],
        "batch_size": batch_size,
    }
    return PerturbationResult(curve=curve, aopc=aopc, target=classes, params=params)
