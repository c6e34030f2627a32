"""The evaluate stage: metrics of stored explanations, no engine calls.

Heatmaps come from the shards the explain stage wrote, so changing a metric setting reruns only
this stage. Metrics run in chunks of images (forward-only, batched inside ``lrp.metrics``) and
every setting that changes a number is written next to the numbers (``metric_params.json``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from flows.layout import write_json, write_text

SCORE_COLUMNS = (
    "insertion", "deletion", "id", "aopc_morf", "relevance_mass", "pointing_game",
)


@dataclass
class EvalSettings:
    """Metric settings taken from ``params.evaluate`` (plus the batch size from runtime)."""

    steps: int = 100
    baseline: str = "zero"
    score: str = "softmax"
    quantize_levels: Sequence[int] = (0,)
    max_images: int | None = None
    batch_size: int = 64
    chunk: int = 32  # images per metric call (memory bound: chunk * (steps+1) perturbed inputs)
    aopc_region: int = 8
    aopc_steps: int = 100


@dataclass
class EvalResult:
    """Summary (dvc metrics), per-image rows, mean curves and every metric's params."""

    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    curves: dict[str, dict[str, list[float]]]
    metric_params: dict[str, Any] = field(default_factory=dict)


def variant_name(method: str, level: int) -> str:
    """``epsilon-plus-flat`` or ``epsilon-plus-flat/q8`` (heat-quantized to 8 levels)."""
    return method if level == 0 else f"{method}/q{level}"


def evaluate_shards(
    model: nn.Module,
    dataset: Any,
    shards: dict[str, dict[str, np.ndarray]],
    settings: EvalSettings,
    *,
    device: torch.device,
    progress: Callable[[str, float], None] | None = None,
) -> EvalResult:
    """Score every method's stored heatmaps with insertion/deletion, AOPC and localisation.

    ``shards`` maps a method name to :func:`flows.explaining.load_shards` output. Images and masks
    are read from ``dataset`` by the stored index, so the scored images are exactly the explained
    ones.
    """
    from lrp.metrics import insertion_deletion, perturbation_curve, pointing_game, relevance_mass
    from lrp.postprocess import heat_quantization, reduce_channels

    model = model.to(device).eval()
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[float]]] = {}
    summary: dict[str, Any] = {}
    metric_params: dict[str, Any] = {}
    total_work = sum(
        min(len(s["index"]), settings.max_images or len(s["index"])) for s in shards.values()
    ) * len(settings.quantize_levels)
    done = 0
    bar = tqdm(total=total_work, desc="evaluate", unit="img")
    for method, arrays in shards.items():
        n = len(arrays["index"])
        if settings.max_images is not None:
            n = min(n, settings.max_images)
        if n == 0:
            raise ValueError(f"no explained images for method {method!r}")
        ins_curve_sum: dict[int, torch.Tensor] = {}
        del_curve_sum: dict[int, torch.Tensor] = {}
        aopc_curve_sum: torch.Tensor | None = None
        fractions = None
        per_image: dict[int, dict[str, list]] = {lvl: {} for lvl in settings.quantize_levels}
        for start in range(0, n, settings.chunk):
            stop = min(start + settings.chunk, n)
            idx = arrays["index"][start:stop]
            items = [dataset[int(i)] for i in idx]
            images = torch.stack([it["image"] for it in items])
            target = torch.as_tensor(arrays["target"][start:stop], dtype=torch.long)
            relevance = torch.as_tensor(
                np.asarray(arrays["relevance"][start:stop]), dtype=torch.float32
            )
            heat = relevance if relevance.dim() == 3 else reduce_channels(relevance, "sum")
            masks = [it["mask"] for it in items]
            has_masks = all(m.numel() > 0 for m in masks)
            for level in settings.quantize_levels:
                h = heat if level == 0 else heat_quantization(heat, level)
                res = insertion_deletion(
                    model, images, h, target,
                    steps=settings.steps, baseline=settings.baseline, score=settings.score,
                    batch_size=settings.batch_size,
                )
                metric_params[f"{variant_name(method, level)}/insertion_deletion"] = res.params
                fractions = res.fractions.cpu()
                ins = res.insertion_curve.sum(0).cpu()
                dels = res.deletion_curve.sum(0).cpu()
                ins_curve_sum[level] = ins_curve_sum.get(level, 0) + ins
                del_curve_sum[level] = del_curve_sum.get(level, 0) + dels
                cols = per_image[level]
                cols.setdefault("insertion", []).extend(res.insertion.cpu().tolist())
                cols.setdefault("deletion", []).extend(res.deletion.cpu().tolist())
                cols.setdefault("id", []).extend(res.id.cpu().tolist())
                if level == 0:
                    pert = perturbation_curve(
                        model, images, h, target, order="morf", region=settings.aopc_region,
                        steps=settings.aopc_steps, batch_size=settings.batch_size,
                    )
                    metric_params[f"{method}/perturbation_curve"] = pert.params
                    c = pert.curve.sum(0).cpu()
                    aopc_curve_sum = c if aopc_curve_sum is None else aopc_curve_sum + c
                    cols.setdefault("aopc_morf", []).extend(pert.aopc.cpu().tolist())
                    if has_masks:
                        m = torch.stack(masks)
                        cols.setdefault("relevance_mass", []).extend(
                            relevance_mass(h, m).cpu().tolist()
                        )
                        cols.setdefault("pointing_game", []).extend(
                            pointing_game(h, m).cpu().float().tolist()
                        )
                        metric_params[f"{method}/localisation"] = {
                            "relevance_mass": {"positive_only": True, "reduce": "sum"},
                            "pointing_game": {"tolerance": 0.0, "reduce": "sum"},
                            "mask": "object mask from the dataset",
                        }
                done += stop - start
                bar.update(stop - start)
                if progress is not None:
                    progress(f"{method} q{level}: {stop}/{n} images", done / max(total_work, 1))
        for level in settings.quantize_levels:
            name = variant_name(method, level)
            cols = per_image[level]
            curves[name] = {
                "fraction": fractions.tolist(),
                "insertion": (ins_curve_sum[level] / n).tolist(),
                "deletion": (del_curve_sum[level] / n).tolist(),
            }
            if level == 0 and aopc_curve_sum is not None:
                curves[name]["aopc_morf_curve"] = (aopc_curve_sum / n).tolist()
            summary[name] = {k: _mean(v) for k, v in cols.items()}
            summary[name]["n_images"] = n
            for i in range(n):
                row = {
                    "method": method,
                    "quantize_levels": level,
                    "index": int(arrays["index"][i]),
                    "path": _rel_path(dataset, int(arrays["index"][i])),
                    "label": int(arrays["label"][i]),
                    "target": int(arrays["target"][i]),
                    "predicted": int(np.argmax(arrays["logits"][i])),
                    "conservation": float(arrays["conservation"][i]),
                }
                for key in SCORE_COLUMNS:
                    values = cols.get(key)
                    row[key] = values[i] if values is not None else ""
                rows.append(row)
        cons = np.asarray(arrays["conservation"][:n], dtype=np.float64)
        summary[method]["conservation_median"] = float(np.median(cons))
        summary[method]["conservation_max"] = float(np.max(cons))
        logits = np.asarray(arrays["logits"][:n])
        labels = np.asarray(arrays["label"][:n])
        summary[method]["accuracy"] = float((logits.argmax(1) == labels).mean())
    bar.close()
    return EvalResult(summary=summary, rows=rows, curves=curves, metric_params=metric_params)


def write_outputs(
    result: EvalResult, *, eval_dir: Path, metrics_file: Path, plots_dir: Path, primary: str
) -> None:
    """Per-image CSV, curves and params under eval_dir; summary JSON; DVC plot CSVs.

    The summary (the dvc metrics file) is written last, so its presence means the stage finished.
    """
    buf = io.StringIO()
    fields = [
        "method", "quantize_levels", "index", "path", "label", "target", "predicted",
        "conservation", *SCORE_COLUMNS,
    ]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    write_text(eval_dir / "scores.csv", buf.getvalue())
    write_json(eval_dir / "curves.json", result.curves)
    write_json(eval_dir / "metric_params.json", result.metric_params)
    main = result.curves[primary]
    for kind in ("insertion", "deletion"):
        lines = ["fraction,score"] + [
            f"{f:.6g},{s:.6g}" for f, s in zip(main["fraction"], main[kind], strict=True)
        ]
        write_text(plots_dir / f"{kind}.csv", "\n".join(lines) + "\n")
    write_json(metrics_file, result.summary)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _rel_path(dataset: Any, index: int) -> str:
    samples = getattr(dataset, "samples", None)
    if samples is not None and len(samples[index]) > 2:
        return str(samples[index][2])
    return str(index)
