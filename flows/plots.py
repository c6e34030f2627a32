"""Figures for the report: heatmap grids, insertion/deletion curves, conservation histogram.

Heatmaps use a diverging colormap centred on zero with a symmetric range per image, so that red is
evidence for the class, blue against, and white means "no relevance" in every panel. Matplotlib runs
headless (Agg) so that the figures work in DVC stages, Prefect workers and CI alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

CMAP = "bwr"


def to_display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) normalised tensor data -> (H, W, 3) or (H, W) floats in [0, 1] for imshow."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = np.transpose(img, (1, 2, 0))
        if img.shape[2] == 1:
            img = img[..., 0]
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def heatmap_2d(relevance: np.ndarray) -> np.ndarray:
    """(C, H, W) relevance -> (H, W) by the channel sum (keeps sign and conservation)."""
    rel = np.asarray(relevance, dtype=np.float32)
    return rel.sum(axis=0) if rel.ndim == 3 else rel


def _symmetric(heat: np.ndarray) -> float:
    vmax = float(np.abs(heat).max())
    return vmax if vmax > 0 else 1.0


def heatmap_grid(
    images: Sequence[np.ndarray],
    relevances: Sequence[np.ndarray],
    titles: Sequence[str],
    path: str | Path,
    *,
    suptitle: str = "",
) -> Path:
    """One row per image: the input, its heatmap (bwr, centred on 0) and an overlay."""
    n = len(images)
    if n == 0 or n != len(relevances) or n != len(titles):
        raise ValueError(f"heatmap_grid: need matching non-empty lists, got {n} images")
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for row, (img, rel, title) in enumerate(zip(images, relevances, titles, strict=True)):
        disp = to_display(img)
        heat = heatmap_2d(rel)
        vmax = _symmetric(heat)
        gray = disp if disp.ndim == 2 else disp.mean(axis=2)
        cmap_gray = "gray"
        axes[row, 0].imshow(disp, cmap=cmap_gray if disp.ndim == 2 else None)
        axes[row, 0].set_title(title, fontsize=8)
        im = axes[row, 1].imshow(heat, cmap=CMAP, vmin=-vmax, vmax=vmax)
        axes[row, 1].set_title(f"relevance (|max| {vmax:.2g})", fontsize=8)
        fig.colorbar(im, ax=axes[row, 1], fraction=0.046, pad=0.04)
        axes[row, 2].imshow(gray, cmap=cmap_gray)
        axes[row, 2].imshow(heat, cmap=CMAP, vmin=-vmax, vmax=vmax, alpha=0.6)
        axes[row, 2].set_title("overlay", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def curve_plot(
    fractions: np.ndarray,
    curves: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    title: str,
    xlabel: str = "fraction of pixels",
    ylabel: str = "score",
) -> Path:
    """Mean curves (one line each) with the area under each curve in the legend."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = np.asarray(fractions, dtype=np.float64)
    for label, y in curves.items():
        y = np.asarray(y, dtype=np.float64)
        area = float(np.trapezoid(y, x)) if len(x) > 1 else float("nan")
        ax.plot(x, y, label=f"{label} (AUC {area:.3f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def conservation_histogram(values: np.ndarray, path: str | Path, *, title: str) -> Path:
    """Histogram of |sum R_in - R_out| / |R_out| per image (log x: errors span decades)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if v.size:
        positive = np.clip(v, 1e-12, None)
        lo, hi = np.log10(positive.min()), np.log10(positive.max())
        bins = np.logspace(lo, hi if hi > lo else lo + 1, 30)
        ax.hist(positive, bins=bins, color="tab:purple")
        ax.set_xscale("log")
        ax.axvline(float(np.median(positive)), color="k", ls="--", label="median")
        ax.legend(fontsize=7)
    ax.set_xlabel("relative conservation error")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
