"""The evaluate stage: metrics of the stored explanations, one Prefect task per shard.

Heatmaps come from the shards the explain stage wrote, so changing a metric setting reruns only
this stage. Each ``evaluate-shard`` task scores one shard into a partial result (kept in
``outputs/eval-shards/``, so a rerun skips scored shards); the flow merges them in dataset order,
so the numbers do not depend on how many workers ran. Every setting that changes a number is
written next to the numbers (``metric_params.json``).

The summary (a DVC metric, ``metrics/<model>/explain.json``) names no method in its keys:
``composite.*`` is the method of ``explain.composite`` and ``compare.<label>.*`` each method of
``explain.compare``, so ``dvc exp show`` puts two composites tried in two experiments side by side.
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
from prefect import flow
from torch import nn
from tqdm.auto import tqdm

from flows import plots, workers
from flows.context import Context, device, load_context, log, methods, require_arch, require_data
from flows.io import jsonable, write_json, write_text
from flows.runtime import inference_model, metric_batch_size, torch_backends, worker_device
from flows.scaleout import Dispatch, dispatcher, run_shard_tasks
from flows.shards import ShardError, load_shards, read_index, read_shard
from lrp.metrics import insertion_deletion, perturbation_curve, pointing_game, relevance_mass
from lrp.postprocess import heat_quantization, reduce_channels

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
    """A method's label, or ``<label>/q8`` when heat-quantized to 8 levels."""
    return method if level == 0 else f"{method}/q{level}"


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
    optimize: bool | str = False,
) -> dict[str, Any]:
    """Score one contiguous run of a method's stored heatmaps (a shard, or all of them).

    ``arrays`` holds ``index``, ``target`` and ``relevance`` of exactly the images to score
    (``start`` is the position of the first one). ``optimize`` (``runtime.optimize_inference``):
    the metric forwards use :func:`flows.runtime.inference_model`'s copy of the model (CPU). Returns a JSON-able partial result: per-image
    score columns per quantization level, curve sums per chunk (kept apart so that
    :func:`merge_pieces` adds them in the order one process would), fractions and metric params.
    """
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
    scorer: nn.Module | None = None  # the model the metric forwards use
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
        if scorer is None:
            scorer, how = inference_model(optimize, model, device, images.to(device))
            log("%s metric forwards: %s", method, how)
        for level in levels:
            h = heat if level == 0 else heat_quantization(heat, level)
            res = insertion_deletion(
                scorer, images, h, target,
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
                    scorer, images, h, target, order="morf", region=settings.aopc_region,
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
        "metric_params": jsonable(metric_params),
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
    result: EvalResult, *, eval_dir: Path, metrics_file: Path, plots_dir: Path,
    composite: str, compare: Sequence[str], title: str,
) -> None:
    """Per-image CSV, curves and params under eval_dir; the DVC metric file; the DVC plot image.

    The summary (the DVC metrics file) is written last, so its presence means the stage finished.
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
    plots.method_curves(
        {label: result.curves[label] for label in (composite, *compare)},
        plots_dir / "curves.png", title=title,
    )
    write_json(metrics_file, dvc_metrics(result.summary, composite, compare))


def dvc_metrics(summary: dict[str, Any], composite: str, compare: Sequence[str]) -> dict[str, Any]:
    """``{composite: {...}, compare: {label: {...}}}``; quantized variants nest as ``q<levels>``.

    No key names the composite, so the same column holds it in every experiment.
    """
    def nested(label: str) -> dict[str, Any]:
        out = dict(summary[label])
        for name, values in summary.items():
            if name.startswith(f"{label}/"):
                out[name.removeprefix(f"{label}/")] = values
        return out

    return {"composite": nested(composite), "compare": {label: nested(label) for label in compare}}


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


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _rel_path(dataset: Any, index: int) -> str:
    samples = getattr(dataset, "samples", None)
    if samples is not None and len(samples[index]) > 2:
        return str(samples[index][2])
    return str(index)


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class EvalJob:
    """Score the first ``count`` of the ``rows`` images of one explanation shard."""

    method: str
    explained: Path
    sha256: str
    start: int
    rows: int
    count: int
    out: Path
    key: str


def eval_settings(ctx: Context, dev: torch.device) -> EvalSettings:
    """Metric settings of ``params.evaluate`` (batch size from ``runtime.batch_size``)."""
    e = ctx.params.evaluate
    return EvalSettings(
        steps=e.steps, baseline=e.baseline, score=e.score,
        quantize_levels=list(e.quantize_levels), max_images=e.max_images,
        batch_size=metric_batch_size(ctx.params.runtime.batch_size, dev),
    )


def evaluate_one_shard(
    ctx: Context, arch: str, settings: EvalSettings, model_sha256: str, dataset_id: str,
    job: EvalJob,
) -> bool:
    """Score one explanation shard into a partial result; False when it was already there."""
    if read_piece(job.out, job.key) is not None:
        return False
    r = ctx.params.runtime
    with workers.RUN_LOCK:
        model, ds, _, _ = workers.stage_inputs(
            ctx, arch, model_sha256=model_sha256, dataset_id=dataset_id
        )
        dev = worker_device(r.device)
        arrays = read_shard(
            job.explained, sha256=job.sha256, names=("index", "target", "relevance"),
            count=job.rows,
        )
        arrays = {k: v[: job.count] for k, v in arrays.items()}
        with torch_backends(dev, tf32=r.tf32):
            piece = evaluate_piece(
                model, ds, arrays, job.method, settings, device=dev, start=job.start,
                bar=not workers.in_dask_worker(), optimize=r.optimize_inference,
            )
    write_piece(job.out, job.key, piece)
    return True


evaluate_shard_task = workers.shard_task(
    "evaluate-shard", "evaluate-{arch}-{job.method}-{job.start}", evaluate_one_shard
)


def run_evaluate(ctx: Context, arch: str, dispatch: Dispatch) -> dict[str, Any]:
    """One partial result per explanation shard, merged into the stage's outputs.

    Partial results live in ``outputs/eval-shards/<arch>/`` keyed by the metric settings, the
    shard's SHA-256 and the model, so a rerun skips the shards already scored.
    """
    p = ctx.params
    _, ds, model_sha, ds_id = workers.stage_inputs(ctx, arch)
    settings = eval_settings(ctx, device(ctx))
    labels = [m.label for m in methods(p)]
    jobs: list[EvalJob] = []
    limits: dict[str, int] = {}
    part_root = ctx.layout.eval_shards(arch)
    for label in labels:
        out = ctx.layout.relevance(arch, label)
        index = read_index(out)
        n = index["num_items"]
        n = n if settings.max_images is None else min(n, settings.max_images)
        if n == 0:
            raise ValueError(f"no explained images for method {label!r}")
        limits[label] = n
        for s in index["shards"]:
            if s.start >= n:
                break
            count = min(s.count, n - s.start)
            key = piece_key(
                settings, method=label, shard_sha256=s.sha256, start=s.start, count=count,
                model_sha256=model_sha,
            )
            jobs.append(EvalJob(
                label, out / s.file, s.sha256, s.start, s.count, count,
                part_root / label / f"{Path(s.file).stem}.json", key,
            ))
    _remove_stale_pieces(part_root, {j.out for j in jobs})
    done = run_shard_tasks(
        dispatch, evaluate_shard_task,
        {"ctx": ctx, "arch": arch, "settings": settings, "model_sha256": model_sha,
         "dataset_id": ds_id},
        [{"job": j} for j in jobs], name=f"evaluate-shards-{arch}",
    )
    pieces: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for job in jobs:
        piece = read_piece(job.out, job.key)
        if piece is None:
            raise ShardError(f"{job.out}: partial result missing or stale after its task ran")
        pieces[job.method].append(piece)
    infos = {
        label: {k: v[: limits[label]] for k, v in load_shards(
            ctx.layout.relevance(arch, label), names=MERGE_ARRAYS).items()}
        for label in labels
    }
    result = merge_pieces(pieces, infos, ds, settings)
    write_outputs(
        result, eval_dir=ctx.layout.evaluation(arch), metrics_file=ctx.layout.metrics(arch),
        plots_dir=ctx.layout.plots(arch), composite=labels[0], compare=labels[1:],
        title=f"{arch}: mean curves over {limits[labels[0]]} images",
    )
    scored = sum(1 for d in done if d)
    log("%s evaluate: %d shards (%d reused)", arch, len(jobs), len(jobs) - scored)
    return {"summary": result.summary, "scored": scored, "reused": len(jobs) - scored}


def _remove_stale_pieces(root: Path, keep: set[Path]) -> None:
    """Partial results of shards or methods that are no longer part of the stage."""
    if not root.is_dir():
        return
    for path in root.rglob("*.json"):
        if path not in keep:
            path.unlink(missing_ok=True)
    for tmp in root.rglob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params_path: str = "params.yaml", model: str = "small_resnet") -> dict[str, Any]:
    """DVC stage ``evaluate@<model>``: one ``evaluate-shard`` task per explanation shard."""
    ctx = load_context(params_path)
    require_arch(ctx, model)
    require_data(ctx)
    with dispatcher(ctx.params.runtime) as dispatch:
        return run_evaluate(ctx, model, dispatch)
