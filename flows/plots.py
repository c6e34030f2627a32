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


def curve_value(x: np.ndarray, y: np.ndarray, kind: str) -> float:
    """The logged number of a mean curve: AUC for insertion/deletion, AOPC for MoRF.

    Both are linear in the curve, so the value of the mean curve equals the mean of the per-image
    values the metrics file holds (``insertion``, ``deletion``, ``aopc_morf``).
    """
    y = np.asarray(y, dtype=np.float64)
    if kind == "aopc_morf":
        return float(np.mean(y[0] - y))
    return float(np.trapezoid(y, np.asarray(x, dtype=np.float64))) if len(y) > 1 else float("nan")


def curve_plot(
    x: np.ndarray,
    curves: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    title: str,
    metric: str,
    xlabel: str = "fraction of pixels",
    ylabel: str = "score",
) -> Path:
    """Mean curves (one line each); the legend gives ``metric`` under its logged name."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    _draw_curves(ax, x, curves, metric)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def method_curves(curves: Mapping[str, Mapping[str, list[float]]], path: str | Path, *,
                  title: str) -> Path:
    """Insertion, deletion and MoRF panels with one line per method (the DVC plot image)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, kind in zip(axes, ("insertion", "deletion", "aopc_morf"), strict=True):
        key = "aopc_morf_curve" if kind == "aopc_morf" else kind
        series = {m: np.asarray(c[key]) for m, c in curves.items() if key in c}
        if kind == "aopc_morf":
            x = np.arange(len(next(iter(series.values())))) if series else np.arange(0)
            ax.set_xlabel("regions perturbed (MoRF)")
            ax.set_ylabel("target logit")
        else:
            x = np.asarray(next(iter(curves.values()))["fraction"])
            ax.set_xlabel(f"fraction of pixels ({kind})")
            ax.set_ylabel("score")
        _draw_curves(ax, x, series, kind)
        ax.set_title(kind, fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _draw_curves(ax: plt.Axes, x: np.ndarray, curves: Mapping[str, np.ndarray],
                 metric: str) -> None:
    for label, y in curves.items():
        ax.plot(x, y, label=f"{label} ({metric} {curve_value(x, y, metric):.3f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def conservation_histogram(
    values: np.ndarray, path: str | Path, *, title: str, expected: str
) -> Path:
    """Histogram of |sum R_in - R_out| / |R_out| per image (log x: errors span decades).

    ``expected`` (what this composite should give, and why) is printed under the plot.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
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
    fig.text(0.5, 0.01, expected, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_bars(rows: Sequence[Mapping[str, object]], path: str | Path, *,
                 metrics: Sequence[str]) -> Path:
    """One panel per metric, one bar group per model, one bar per method (the parent run's figure)."""
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    labels = list(dict.fromkeys(str(r["method"]) for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    width = 0.8 / max(len(labels), 1)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for j, label in enumerate(labels):
            values = [next((float(r[metric]) for r in rows if r["model"] == m
                            and r["method"] == label and r.get(metric) is not None), np.nan)
                      for m in models]
            ax.bar(np.arange(len(models)) + j * width, values, width, label=label)
        ax.set_xticks(np.arange(len(models)) + width * (len(labels) - 1) / 2, models)
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
