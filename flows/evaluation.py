"""The evaluate stage: metrics of stored explanations, no engine calls.

Heatmaps come from the shards the explain stage wrote, so changing a metric setting reruns only
this stage. Metrics run in chunks of images (forward-only, batched inside ``lrp.metrics``) and
every setting that changes a number is written next to the numbers (``metric_params.json``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
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
# Stored explanation arrays the merge needs (no relevance: it is only read by the pieces).
MERGE_ARRAYS = ("index", "label", "target", "logits", "conservation")
PIECE_FORMAT = 1


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
    ones. The single-process composition of :func:`evaluate_piece` (one piece per method) and
    :func:`merge_pieces`; the Prefect flows score one piece per explanation shard instead.
    """
    pieces: dict[str, list[dict[str, Any]]] = {}
    infos: dict[str, dict[str, np.ndarray]] = {}
    total = sum(_limit(len(s["index"]), settings) for s in shards.values())
    done = 0
    for method, arrays in shards.items():
        n = _limit(len(arrays["index"]), settings)
        if n == 0:
            raise ValueError(f"no explained images for method {method!r}")
        part = {k: arrays[k][:n] for k in ("index", "target", "relevance")}

        def report(text: str, frac: float, before: int = done, n: int = n) -> None:
            if progress is not None:
                progress(text, (before + frac * n) / max(total, 1))

        pieces[method] = [
            evaluate_piece(model, dataset, part, method, settings, device=device, progress=report)
        ]
        infos[method] = {k: arrays[k][:n] for k in MERGE_ARRAYS}
        done += n
    return merge_pieces(pieces, infos, dataset, settings)


def evaluate_piece(
    model: nn.Module,
    dataset: Any,
    arrays: dict[str, np.ndarray],
    method: str,
    settings: EvalSettings,
    *,
    device: torch.device,
    start: int = 0,
    progress: Callable[[str, float], None] | None = None,
    bar: bool = True,
) -> dict[str, Any]:
    """Score one contiguous run of a method's stored heatmaps (a shard, or all of them).

    ``arrays`` holds ``index``, ``target`` and ``relevance`` of exactly the images to score
    (``start`` is the position of the first one). Returns a JSON-able partial result: per-image
    score columns per quantization level, curve sums per chunk (kept apart so that
    :func:`merge_pieces` adds them in the order one process would), fractions and metric params.
    """
    from lrp.metrics import insertion_deletion, perturbation_curve, pointing_game, relevance_mass
    from lrp.postprocess import heat_quantization, reduce_channels

    model = model.to(device).eval()
    n = len(arrays["index"])
    levels = list(settings.quantize_levels)
    per_level: dict[int, dict[str, Any]] = {
        lvl: {"cols": {}, "insertion": [], "deletion": []} for lvl in levels
    }
    aopc_sums: list[torch.Tensor] = []
    fractions: torch.Tensor | None = None
    metric_params: dict[str, Any] = {}
    work = max(n * len(levels), 1)
    done = 0
    tq = tqdm(total=n * len(levels), desc=f"evaluate {method}", unit="img", disable=not bar)
    for lo in range(0, n, settings.chunk):
        hi = min(lo + settings.chunk, n)
        idx = arrays["index"][lo:hi]
        items = [dataset[int(i)] for i in idx]
        images = torch.stack([it["image"] for it in items])
        target = torch.as_tensor(arrays["target"][lo:hi], dtype=torch.long)
        relevance = torch.as_tensor(np.asarray(arrays["relevance"][lo:hi]), dtype=torch.float32)
        heat = relevance if relevance.dim() == 3 else reduce_channels(relevance, "sum")
        masks = [it["mask"] for it in items]
        has_masks = all(m.numel() > 0 for m in masks)
        for level in levels:
            h = heat if level == 0 else heat_quantization(heat, level)
            res = insertion_deletion(
                model, images, h, target,
                steps=settings.steps, baseline=settings.baseline, score=settings.score,
                batch_size=settings.batch_size,
            )
            metric_params[f"{variant_name(method, level)}/insertion_deletion"] = res.params
            fractions = res.fractions.cpu()
            entry = per_level[level]
            entry["insertion"].append(res.insertion_curve.sum(0).cpu())
            entry["deletion"].append(res.deletion_curve.sum(0).cpu())
            cols = entry["cols"]
            cols.setdefault("insertion", []).extend(res.insertion.cpu().tolist())
            cols.setdefault("deletion", []).extend(res.deletion.cpu().tolist())
            cols.setdefault("id", []).extend(res.id.cpu().tolist())
            if level == 0:
                pert = perturbation_curve(
                    model, images, h, target, order="morf", region=settings.aopc_region,
                    steps=settings.aopc_steps, batch_size=settings.batch_size,
                )
                metric_params[f"{method}/perturbation_curve"] = pert.params
                aopc_sums.append(pert.curve.sum(0).cpu())
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
            done += hi - lo
            tq.update(hi - lo)
            if progress is not None:
                progress(f"{method} q{level}: {start + hi}/{start + n} images", done / work)
    tq.close()
    return {
        "format": PIECE_FORMAT,
        "method": method,
        "start": start,
        "count": n,
        "levels": {
            str(lvl): {
                "cols": e["cols"],
                "insertion": _pack(e["insertion"]),
                "deletion": _pack(e["deletion"]),
            }
            for lvl, e in per_level.items()
        },
        "aopc_morf_curve": _pack(aopc_sums),
        "fractions": _pack([fractions] if fractions is not None else []),
        "metric_params": json.loads(json.dumps(metric_params, default=_jsonable)),
    }


def merge_pieces(
    pieces: dict[str, list[dict[str, Any]]],
    infos: dict[str, dict[str, np.ndarray]],
    dataset: Any,
    settings: EvalSettings,
) -> EvalResult:
    """Combine partial results into the stage's outputs (summary, rows, curves, metric params).

    ``pieces[method]`` are :func:`evaluate_piece` results covering positions ``[0, n)`` of the
    method's explanations, and ``infos[method]`` the stored ``index``, ``label``, ``target``,
    ``logits`` and ``conservation`` of those ``n`` images. Curve sums are added chunk by chunk in
    dataset order, so the result does not depend on how many workers produced the pieces.
    """
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[float]]] = {}
    summary: dict[str, Any] = {}
    metric_params: dict[str, Any] = {}
    for method, parts in pieces.items():
        parts = sorted(parts, key=lambda p: p["start"])
        info = infos[method]
        n = len(info["index"])
        expected = 0
        for p in parts:
            if p["method"] != method or p["start"] != expected:
                raise ValueError(
                    f"{method}: partial results do not cover images [0, {n}) in order "
                    f"(got one starting at {p['start']}, expected {expected})"
                )
            expected += p["count"]
        if expected != n or n == 0:
            raise ValueError(f"{method}: partial results cover {expected} images, expected {n}")
        for p in parts:
            metric_params.update(p["metric_params"])
        fractions = _unpack(parts[-1]["fractions"])[-1]
        for level in settings.quantize_levels:
            name = variant_name(method, level)
            entries = [p["levels"][str(level)] for p in parts]
            cols: dict[str, list] = {}
            for e in entries:
                for key, values in e["cols"].items():
                    cols.setdefault(key, []).extend(values)
            cols = {k: cols[k] for k in SCORE_COLUMNS if k in cols}  # the column order
            ins_sum = _running_sum(c for e in entries for c in _unpack(e["insertion"]))
            del_sum = _running_sum(c for e in entries for c in _unpack(e["deletion"]))
            curves[name] = {
                "fraction": fractions.tolist(),
                "insertion": (ins_sum / n).tolist(),
                "deletion": (del_sum / n).tolist(),
            }
            if level == 0:
                aopc = [c for p in parts for c in _unpack(p["aopc_morf_curve"])]
                if aopc:
                    curves[name]["aopc_morf_curve"] = (_running_sum(aopc) / n).tolist()
            summary[name] = {k: _mean(v) for k, v in cols.items()}
            summary[name]["n_images"] = n
            for i in range(n):
                row = {
                    "method": method,
                    "quantize_levels": level,
                    "index": int(info["index"][i]),
                    "path": _rel_path(dataset, int(info["index"][i])),
                    "label": int(info["label"][i]),
                    "target": int(info["target"][i]),
                    "predicted": int(np.argmax(info["logits"][i])),
                    "conservation": float(info["conservation"][i]),
                }
                for key in SCORE_COLUMNS:
                    values = cols.get(key)
                    row[key] = values[i] if values is not None and i < len(values) else ""
                rows.append(row)
        cons = np.asarray(info["conservation"][:n], dtype=np.float64)
        summary[method]["conservation_median"] = float(np.median(cons))
        summary[method]["conservation_max"] = float(np.max(cons))
        logits = np.asarray(info["logits"][:n])
        labels = np.asarray(info["label"][:n])
        summary[method]["accuracy"] = float((logits.argmax(1) == labels).mean())
    return EvalResult(summary=summary, rows=rows, curves=curves, metric_params=metric_params)


def piece_key(
    settings: EvalSettings, *, method: str, shard_sha256: str, start: int, count: int,
    model_sha256: str,
) -> str:
    """What a partial result depends on: metric settings, the explanation shard, the model."""
    values = {
        "format": PIECE_FORMAT,
        "settings": {**asdict(settings), "quantize_levels": list(settings.quantize_levels)},
        "method": method,
        "shard_sha256": shard_sha256,
        "start": start,
        "count": count,
        "model_sha256": model_sha256,
    }
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def write_piece(path: Path, key: str, piece: dict[str, Any]) -> None:
    """Store a partial result atomically, tagged with its :func:`piece_key`."""
    write_json(path, {"key": key, "piece": piece})


def read_piece(path: Path, key: str) -> dict[str, Any] | None:
    """The partial result at ``path`` if it is complete and has ``key``; else None (recompute)."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    piece = stored.get("piece")
    return piece if isinstance(piece, dict) and piece.get("format") == PIECE_FORMAT else None


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


def _limit(count: int, settings: EvalSettings) -> int:
    return count if settings.max_images is None else min(count, settings.max_images)


def _pack(tensors: list[torch.Tensor]) -> dict[str, Any]:
    """Tensors of one dtype as JSON (Python floats round-trip float32/float64 exactly)."""
    dtype = str(tensors[0].dtype).removeprefix("torch.") if tensors else "float32"
    return {"dtype": dtype, "values": [t.tolist() for t in tensors]}


def _unpack(packed: dict[str, Any]) -> list[torch.Tensor]:
    dtype = getattr(torch, packed["dtype"])
    return [torch.tensor(v, dtype=dtype) for v in packed["values"]]


def _running_sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    total: Any = 0
    for t in tensors:
        total = total + t
    if isinstance(total, int):
        raise ValueError("no curve sums to merge")
    return total


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _rel_path(dataset: Any, index: int) -> str:
    samples = getattr(dataset, "samples", None)
    if samples is not None and len(samples[index]) > 2:
        return str(samples[index][2])
    return str(index)
