"""Ground-truth localisation: relevance mass inside a mask and the pointing game."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lrp.errors import InvalidInputError
from lrp.postprocess import REDUCTIONS, reduce_channels


def _heat_and_mask(fn: str, heatmap: Tensor, mask: Tensor, reduce: str) -> tuple[Tensor, Tensor]:
    if not isinstance(heatmap, Tensor) or heatmap.dim() not in (3, 4):
        raise InvalidInputError(f"{fn}: heatmap must be (N, H, W) or (N, C, H, W)")
    if heatmap.dim() == 4:
        if reduce not in REDUCTIONS:
            raise InvalidInputError(f"{fn}: unknown reduce={reduce!r}; choose one of {REDUCTIONS}")
        heatmap = reduce_channels(heatmap, reduce)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(heatmap.shape):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise InvalidInputError(f"{fn}: mask must be (N, H, W) = {tuple(heatmap.shape)}, got {got}")
    if torch.isnan(heatmap).any():
        raise InvalidInputError(f"{fn}: heatmap contains NaN")
    return heatmap, mask.to(device=heatmap.device, dtype=torch.bool)


def relevance_mass(
    heatmap: Tensor, mask: Tensor, *, positive_only: bool = True, reduce: str = "sum"
) -> Tensor:
    """Fraction of relevance inside ``mask`` per image (Arras et al. 2022, mass accuracy).

    With ``positive_only`` (default) only positive relevance counts, so the value lies in [0, 1];
    otherwise signed sums are used. An image with no (positive) relevance gets 0.
    """
    heat, m = _heat_and_mask("relevance_mass", heatmap, mask, reduce)
    if positive_only:
        heat = heat.clamp(min=0)
    flat, mflat = heat.flatten(1).double(), m.flatten(1)
    inside = (flat * mflat).sum(1)
    total = flat.sum(1)
    return torch.where(total != 0, inside / torch.where(total != 0, total, 1.0), 0.0)


def pointing_game(
    heatmap: Tensor, mask: Tensor, *, tolerance: float = 0.0, reduce: str = "sum"
) -> Tensor:
    """Per image: is the heatmap's maximum within ``tolerance`` pixels of the mask? (Zhang et al.)

    The maximum is the first one in row-major order (``argmax``); the distance is Euclidean
    between pixel centres (Zhang et al. use 15 px at 224). Returns an (N,) bool tensor; an empty
    mask is never hit.
    """
    if tolerance < 0:
        raise InvalidInputError(f"pointing_game: tolerance must be >= 0, got {tolerance}")
    heat, m = _heat_and_mask("pointing_game", heatmap, mask, reduce)
    n, h, w = heat.shape
    idx = heat.flatten(1).argmax(1)
    py, px = (idx // w).double(), (idx % w).double()
    rows = torch.arange(h, device=heat.device, dtype=torch.float64)
    cols = torch.arange(w, device=heat.device, dtype=torch.float64)
    d2 = (rows.view(1, h, 1) - py.view(n, 1, 1)) ** 2 + (cols.view(1, 1, w) - px.view(n, 1, 1)) ** 2
    d2 = torch.where(m, d2, torch.full_like(d2, float("inf")))
    return d2.flatten(1).amin(1) <= tolerance**2


def boxes_to_masks(
    boxes: Sequence[Tensor] | Tensor,
    size: tuple[int, int],
    device: torch.device | str | None = None,
) -> Tensor:
    """Boxes (x0, y0, x1, y1) in pixel coordinates -> (N, H, W) bool masks (union per image).

    ``boxes`` is an (N, 4) tensor (one box per image) or a sequence of (B_i, 4) tensors. A pixel
    (row r, column c) is inside when its centre (c + 0.5, r + 0.5) lies in [x0, x1) x [y0, y1), so
    integer boxes cover columns x0..x1-1 and rows y0..y1-1.
    """
    h, w = size
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise InvalidInputError(
                f"boxes_to_masks: boxes must be (N, 4), got {tuple(boxes.shape)}"
            )
        boxes = [b.view(1, 4) for b in boxes]
    masks = []
    for i, b in enumerate(boxes):
        b = torch.as_tensor(b, dtype=torch.float64, device=device).reshape(-1, 4)
        if ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any():
            raise InvalidInputError(f"boxes_to_masks: image {i} has a box with x1 < x0 or y1 < y0")
        cy = torch.arange(h, dtype=torch.float64, device=b.device) + 0.5
        cx = torch.arange(w, dtype=torch.float64, device=b.device) + 0.5
        iny = (cy[None, :] >= b[:, 1:2]) & (cy[None, :] < b[:, 3:4])  # (B, H)
        inx = (cx[None, :] >= b[:, 0:1]) & (cx[None, :] < b[:, 2:3])  # (B, W)
        masks.append((iny[:, :, None] & inx[:, None, :]).any(0))
    if not masks:
        raise InvalidInputError("boxes_to_masks: no images given")
    return torch.stack(masks)
