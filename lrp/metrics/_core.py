"""Shared machinery of the perturbation metrics: input checks, pixel ordering, batched scoring.

Every perturbation metric is "replace the pixels whose step position is below k_i by an alternative
image, score the model". A pixel's *position* is the step count after which it is moved; the
perturbed input for step i is ``where(pos < k_i, alt, x)`` (or the reverse for insertion). All
(image, step) pairs of a call are enumerated and chunked into shared forward batches on the model's
device; nothing leaves the device per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lrp.errors import InvalidInputError
from lrp.postprocess import REDUCTIONS, reduce_channels

SCORES = ("softmax", "logit")
SCORE_CLASSES = ("target", "predicted")
TIES = ("rank", "threshold")


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer (``fallback`` for stateless models)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


def check_images(fn: str, images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InvalidInputError(f"{fn}: images must be a (N, C, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise InvalidInputError(f"{fn}: images must be floating point, got {images.dtype}")
    if images.shape[0] == 0:
        raise InvalidInputError(f"{fn}: images is an empty batch")


def prepare_heatmaps(fn: str, heatmaps: Tensor, images: Tensor, reduce: str) -> Tensor:
    """Check ``heatmaps`` against ``images`` and return an (N, H, W) map on the images' device.

    (N, H, W) maps are used as given; (N, C', H, W) maps are reduced over channels with ``reduce``.
    """
    if reduce not in REDUCTIONS:
        raise InvalidInputError(f"{fn}: unknown reduce={reduce!r}; choose one of {REDUCTIONS}")
    if not isinstance(heatmaps, Tensor) or heatmaps.dim() not in (3, 4):
        shape = tuple(heatmaps.shape) if isinstance(heatmaps, Tensor) else type(heatmaps).__name__
        raise InvalidInputError(f"{fn}: heatmaps must be (N, H, W) or (N, C, H, W), got {shape}")
    if heatmaps.dim() == 4:
        heatmaps = reduce_channels(heatmaps, reduce)
    n, _, h, w = images.shape
    if tuple(heatmaps.shape) != (n, h, w):
        raise InvalidInputError(
            f"{fn}: heatmaps shape {tuple(heatmaps.shape)} does not match images (N, H, W) = "
            f"{(n, h, w)}"
        )
    if not heatmaps.is_floating_point():
        heatmaps = heatmaps.float()
    if torch.isnan(heatmaps).any():
        bad = torch.isnan(heatmaps).flatten(1).any(1).nonzero().flatten().tolist()
        raise InvalidInputError(f"{fn}: heatmaps contain NaN (images {bad[:10]})")
    return heatmaps.to(images.device)


def resolve_classes(
    fn: str,
    model: nn.Module,
    images: Tensor,
    target: Tensor | int | None,
    score_class: str,
    batch_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return (class scored per image, predicted class on the unperturbed image, logits).

    The classes are (N,) long; the logits (N, classes) are the model's output on ``images`` (the
    unperturbed inputs of :func:`perturbed_scores`). ``score_class="target"`` scores ``target``
    (the prediction where ``target`` is None); ``"predicted"`` always scores the class predicted
    on the unperturbed image (as RISE does).
    """
    if score_class not in SCORE_CLASSES:
        raise InvalidInputError(
            f"{fn}: unknown score_class={score_class!r}; choose one of {SCORE_CLASSES}"
        )
    n = images.shape[0]
    logits = torch.cat([model(images[i : i + batch_size]) for i in range(0, n, batch_size)])
    if logits.dim() != 2 or logits.shape[0] != n:
        raise InvalidInputError(
            f"{fn}: model output must be (N, classes), got {tuple(logits.shape)}"
        )
    predicted = logits.argmax(dim=1)
    if score_class == "predicted" or target is None:
        return predicted, predicted, logits
    if isinstance(target, int):
        cls = torch.full((n,), target, dtype=torch.long, device=images.device)
    elif isinstance(target, Tensor) and target.dim() <= 1 and not target.is_floating_point():
        cls = target.to(device=images.device, dtype=torch.long).reshape(-1)
        if cls.numel() == 1:
            cls = cls.expand(n).clone()
    else:
        raise InvalidInputError(f"{fn}: target must be None, an int or a (N,) integer tensor")
    if cls.shape[0] != n:
        raise InvalidInputError(f"{fn}: target has {cls.shape[0]} entries for {n} images")
    k = logits.shape[1]
    if (cls < 0).any() or (cls >= k).any():
        raise InvalidInputError(f"{fn}: target out of range [0, {k}) : {cls.tolist()[:10]}")
    return cls, predicted, logits


def step_positions(values: Tensor, ties: str, descending: bool = True) -> Tensor:
    """Per element of ``values`` (N, P): how many elements are moved before it.

    ``rank``: its position in a stable sort (ties broken by index), so exactly k elements satisfy
    ``pos < k``. ``threshold``: the number of elements strictly better than it, so ``pos < k``
    selects every element at or above the k-th value and tied elements move together.
    """
    if ties not in TIES:
        raise InvalidInputError(f"unknown ties={ties!r}; choose one of {TIES}")
    sorted_vals, order = torch.sort(values, dim=1, descending=descending, stable=True)
    n, p = values.shape
    ranks = torch.arange(p, device=values.device).expand(n, p)
    if ties == "threshold":
        new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
        new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
        ranks = torch.where(new_group, ranks, torch.zeros_like(ranks)).cummax(dim=1).values
    pos = torch.empty_like(order)
    pos.scatter_(1, order, ranks)
    return pos


def step_counts(total: int, steps: int | None, per_step: int | None, fn: str) -> Tensor:
    """Counts k_0 = 0 < ... < k_S = total of moved units after each step.

    With ``per_step`` the counts are ``min(i * per_step, total)`` (S = ceil(total / per_step));
    otherwise ``round(i * total / steps)`` for i = 0..steps.
    """
    if per_step is not None:
        if not isinstance(per_step, int) or per_step < 1:
            raise InvalidInputError(
                f"{fn}: pixels_per_step must be a positive int, got {per_step!r}"
            )
        s = math.ceil(total / per_step)
        return torch.clamp(torch.arange(s + 1, dtype=torch.long) * per_step, max=total)
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"{fn}: steps must be a positive int, got {steps!r}")
    i = torch.arange(steps + 1, dtype=torch.float64)
    return torch.round(i * total / steps).to(torch.long)


@torch.inference_mode()
def perturbed_scores(
    model: nn.Module,
    images: Tensor,
    alternative: Tensor,
    positions: Tensor,
    counts: Tensor,
    classes: Tensor,
    *,
    invert: tuple[bool, ...],
    score: str,
    batch_size: int,
    clean_logits: Tensor | None = None,
) -> Tensor:
    """Scores of every (track, image, step): input ``where((pos < k) != invert, alt, x)``.

    ``positions`` is (N, H*W) (per pixel, broadcast over channels); ``counts`` (S+1,). Returns
    (T, N, S+1) with T = len(invert).

    Only distinct inputs are run. The masks of one image are nested (``pos < k`` grows with k), so
    two of its steps give the same input exactly when they move the same number of pixels ``m``:
    steps whose count falls inside a group of tied positions (``ties="threshold"``; heat-quantized
    maps have at most levels + 1 distinct inputs per curve), repeated counts, and the two ends,
    where every track meets the unperturbed image (no pixel from ``alt``) or ``alt`` itself (all
    pixels from it). The distinct inputs, ordered by image, are cut into forward batches of
    ``batch_size`` and their scores scattered back; the result equals running every job, up to the
    float roundoff of another batch composition. ``clean_logits`` (N, classes): the model's output
    on ``images`` (e.g. from :func:`resolve_classes`); given, the unperturbed inputs cost no
    forward.
    """
    if score not in SCORES:
        raise InvalidInputError(f"unknown score={score!r}; choose one of {SCORES}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
    device = images.device
    n, _, h, w = images.shape
    p = h * w
    s1 = counts.numel()
    t = len(invert)
    counts = counts.to(device)
    inv = torch.tensor(invert, dtype=torch.bool, device=device)
    # pixels moved after each step, per image: m[n, s] = #{pos[n] < counts[s]}
    sorted_pos = positions.sort(dim=1).values.contiguous()
    moved = torch.searchsorted(sorted_pos, counts.expand(n, s1).contiguous())
    # pixels taken from ``alt`` per (track, image, step); 0 = the image, p = ``alt``
    from_alt = torch.where(inv.view(t, 1, 1), p - moved, moved)
    # one key per distinct input: (image, which side moved, m); both ends are track-independent
    side = inv.view(t, 1, 1).expand(t, n, s1).long()
    ends = (from_alt == 0) | (from_alt == p)
    side = torch.where(ends, torch.zeros_like(side), side)
    m_key = torch.where(ends, from_alt, moved)
    img = torch.arange(n, device=device).view(1, n, 1).expand(t, n, s1)
    key = ((img * 2 + side) * (p + 1) + m_key).reshape(-1)
    out = torch.empty(t * n * s1, dtype=torch.float64, device=device)
    clean = (from_alt == 0).reshape(-1)
    if clean_logits is not None:
        if tuple(clean_logits.shape[:1]) != (n,) or clean_logits.dim() != 2:
            raise InvalidInputError(
                f"clean_logits must be (N, classes) with N = {n}, got {tuple(clean_logits.shape)}"
            )
        img_flat = img.reshape(-1)[clean]
        out[clean] = _scores(clean_logits.to(device)[img_flat], classes[img_flat], score)
        run = ~clean
    else:
        run = torch.ones_like(clean)
    jobs = run.nonzero().flatten()
    uniq, inverse = torch.unique(key[jobs], sorted=True, return_inverse=True)
    # a representative job per distinct input: its own (image, count, side) rebuild the input
    first = torch.full((uniq.numel(),), jobs.numel(), dtype=torch.long, device=device)
    first.scatter_reduce_(0, inverse, torch.arange(jobs.numel(), device=device), "amin")
    rep = jobs[first]
    rep_track, rest = rep // (n * s1), rep % (n * s1)
    rep_img, rep_step = rest // s1, rest % s1
    rep_k, rep_inv = counts[rep_step], inv[rep_track]
    uniq_scores = torch.empty(uniq.numel(), dtype=torch.float64, device=device)
    for start in range(0, uniq.numel(), batch_size):
        sl = slice(start, start + batch_size)
        im = rep_img[sl]
        mask = (positions[im] < rep_k[sl, None]) != rep_inv[sl, None]
        batch = torch.where(mask.view(-1, 1, h, w), alternative[im], images[im])
        uniq_scores[sl] = _scores(model(batch), classes[im], score)
    out[jobs] = uniq_scores[inverse]
    return out.view(t, n, s1)


def _scores(logits: Tensor, classes: Tensor, score: str) -> Tensor:
    """The ``score`` of ``classes`` per row of ``logits``, as float64 (softmax in fp32 or wider)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if score == "softmax":
        logits = logits.softmax(dim=1)
    return logits.gather(1, classes[:, None]).squeeze(1).double()


def gaussian_blur(images: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """Per-channel Gaussian blur with a sampled, normalised ``size`` x ``size`` kernel.

    As RISE: zero padding of ``size // 2`` keeps the spatial size.
    """
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    k2 = torch.outer(g, g)
    k2 = (k2 / k2.sum()).to(dtype=images.dtype, device=images.device)
    c = images.shape[1]
    weight = k2.expand(c, 1, size, size).contiguous()
    return torch.nn.functional.conv2d(images, weight, padding=size // 2, groups=c)


def uniform_like(images: Tensor, seed: int, value_range: tuple[float, float] | None) -> Tensor:
    """Uniform noise shaped like ``images``: one seeded (C, H, W) pattern shared by all images.

    Sharing the pattern makes a batch give the same numbers as each image alone. ``value_range``
    None scales the pattern to each image's own [min, max].
    """
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(images.shape[1:], generator=gen, dtype=torch.float64)
    u = u.to(device=images.device, dtype=images.dtype).expand_as(images)
    if value_range is None:
        flat = images.flatten(1)
        lo = flat.amin(1).view(-1, 1, 1, 1)
        hi = flat.amax(1).view(-1, 1, 1, 1)
    else:
        lo, hi = (float(v) for v in value_range)
        if not hi >= lo:
            raise InvalidInputError(
                f"noise_range must be (low, high) with low <= high, got {value_range}"
            )
    return lo + (hi - lo) * u


def make_baseline(
    fn: str,
    images: Tensor,
    baseline: str | Tensor,
    *,
    seed: int,
    noise_range: tuple[float, float] | None,
) -> tuple[Tensor, str]:
    """The replacement image for every sample, and its name for the log."""
    if isinstance(baseline, Tensor):
        b = baseline.to(device=images.device, dtype=images.dtype)
        if b.dim() == 3:
            b = b.unsqueeze(0)
        try:
            b = b.expand_as(images)
        except RuntimeError:
            raise InvalidInputError(
                f"{fn}: baseline tensor {tuple(baseline.shape)} does not broadcast to images "
                f"{tuple(images.shape)}"
            ) from None
        return b, "tensor"
    if baseline == "zero":
        return torch.zeros_like(images), baseline
    if baseline == "blur":
        return gaussian_blur(images), baseline
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images), baseline
    if baseline == "uniform":
        return uniform_like(images, seed, noise_range), baseline
    raise InvalidInputError(
        f"{fn}: unknown baseline={baseline!r}; choose 'zero', 'blur', 'mean', 'uniform' or a tensor"
    )
