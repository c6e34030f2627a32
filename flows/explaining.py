"""Explain a whole dataset in batches and store the results as resumable, verifiable shards.

Layout of ``out_dir``: ``shard-00000.npz`` ... (compressed; dataset positions ``[k*shard_size,
(k+1)*shard_size)``) and ``index.json``, written last, listing every shard with its SHA-256, the
parameters and a content hash. Each shard also embeds the parameter hash, so an interrupted run
resumes by skipping shards that are complete and were made with the same model, data and options.

A shard is the unit of work: :func:`plan_explanation` fixes the shards and the hash,
:func:`explain_shard` explains one (idempotent: a complete shard is skipped), :func:`write_index`
closes the run. :func:`explain_dataset` runs them in one process; the Prefect flows run the
shards as tasks, possibly on Dask workers (``flows.shards``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from flows.data import collate
from flows.runtime import (
    auto_batch_size,
    loader_workers,
    resolve_batch_size,
    torch_backends,
    use_channels_last,
)
from flows.training import resolve_device

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
ARRAYS = ("relevance", "logits", "target", "label", "index", "initial", "conservation")
# Options consumed here; every other option is passed to the engine.
_LOCAL_OPTIONS = {"target": "label", "relevance_dtype": "float32", "channel_sum": False}


class ShardError(RuntimeError):
    """Explanation shards are missing, incomplete or corrupt (the file is named)."""


@dataclass
class ShardInfo:
    """One shard file: dataset positions [start, start + count) and its SHA-256."""

    file: str
    start: int
    count: int
    sha256: str


@dataclass
class ShardIndex:
    """What :func:`explain_dataset` wrote (or found complete and skipped)."""

    out_dir: Path
    shards: list[ShardInfo]
    num_items: int
    params: dict[str, Any]
    params_hash: str
    content_hash: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


Attributor = Callable[[torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]]


class NonFiniteInputError(ValueError):
    """Dataset items whose pixels are NaN/Inf (each item and its file is named)."""


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: shard ``k`` holds dataset positions ``[start, start + count)``."""

    k: int
    start: int
    count: int

    @property
    def file(self) -> str:
        return f"shard-{self.k:05d}.npz"


@dataclass(frozen=True)
class ExplainPlan:
    """Everything a worker needs to explain any shard of one method (small and picklable).

    ``params`` (hashed into ``params_hash``, embedded in every shard) identifies the results:
    model weights, dataset, method, options, shard size and engine version.
    """

    out_dir: Path
    method: str
    params: dict[str, Any]
    params_hash: str
    local: dict[str, Any]
    engine_options: dict[str, Any]
    shards: tuple[ShardSpec, ...]

    @property
    def num_items(self) -> int:
        return int(self.params["num_items"])


@dataclass(frozen=True)
class ShardOutcome:
    """A finished shard: written now or found complete (``written=False``).

    ``nonfinite``: dataset indices whose relevance or logits are NaN/Inf (stored, and reported).
    """

    info: ShardInfo
    written: bool
    nonfinite: tuple[int, ...] = ()


def plan_explanation(
    model: nn.Module,
    dataset: Dataset,
    *,
    out_dir: Path,
    method: str,
    options: dict[str, Any],
    shard_size: int,
) -> ExplainPlan:
    """Check the options and fix the shards and the parameter hash; touches no file.

    ``options`` as in :func:`explain_dataset`. The hash covers the model's weights (so a worker
    that loads another model file is caught) and the dataset fingerprint.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    local = {k: options.get(k, v) for k, v in _LOCAL_OPTIONS.items()}
    if local["target"] not in ("label", "predicted"):
        raise ValueError(
            f"options['target'] must be 'label' or 'predicted', got {local['target']!r}"
        )
    if local["relevance_dtype"] not in ("float16", "float32"):
        raise ValueError(
            "options['relevance_dtype'] must be 'float16' or 'float32', "
            f"got {local['relevance_dtype']!r}"
        )
    engine_options = {k: v for k, v in options.items() if k not in _LOCAL_OPTIONS}
    is_lrp = method in _composite_names()
    if is_lrp and "input_bounds" not in engine_options and hasattr(dataset, "input_bounds"):
        engine_options["input_bounds"] = dataset.input_bounds()
    n = len(dataset)
    params = {
        "format": FORMAT_VERSION,
        "method": method,
        "options": _jsonable({**local, **engine_options}),
        "model_sha256": model_hash(model),
        "dataset": dataset_id(dataset),
        "num_items": n,
        "shard_size": shard_size,
        "engine_version": _engine_version(),
    }
    params_hash = _sha256_text(json.dumps(params, sort_keys=True))
    shards = tuple(
        ShardSpec(k, start, min(shard_size, n - start))
        for k, start in enumerate(range(0, n, shard_size))
    )
    return ExplainPlan(
        Path(out_dir), method, params, params_hash, local, engine_options, shards
    )


def prepare_out_dir(plan: ExplainPlan) -> None:
    """Before the shards run: drop the index (rewritten last), shards past the end, temp files.

    Call it once, before dispatching shards (it deletes other processes' temporary files).
    """
    out_dir = plan.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_FILE).unlink(missing_ok=True)  # never describes a half-done run
    shard_size = int(plan.params["shard_size"])
    for stale in out_dir.glob("shard-[0-9]*.npz"):  # shards past the end (an earlier, larger run)
        if stale.stem[6:].isdigit() and int(stale.stem[6:]) * shard_size >= plan.num_items:
            stale.unlink()
    for tmp in out_dir.glob(".shard-*.tmp-*.npz"):  # left by a killed process
        tmp.unlink(missing_ok=True)


def explain_shard(
    plan: ExplainPlan,
    spec: ShardSpec,
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int | str,
    device: str | torch.device,
    num_workers: int = 0,
    channels_last: bool | str = "auto",
    tf32: bool = True,
    attribute: Attributor | None = None,
    progress: Callable[[int], None] | None = None,
) -> ShardOutcome:
    """Explain one shard and write it atomically; skip it when it is already complete and valid.

    Idempotent, so a retried or repeated task costs one file check. The model is moved to
    ``device`` (and to NHWC when ``channels_last`` applies) and must be in eval mode; pass
    ``attribute`` (from :func:`make_attributor` with ``validate=False``) to reuse one across
    shards. ``batch_size="auto"`` searches the largest batch that fits on CUDA (cached per
    process). Raises :class:`NonFiniteInputError` naming the items whose image is NaN/Inf;
    NaN/Inf relevance of a finite image is stored, recorded in the shard and warned about.
    """
    path = plan.out_dir / spec.file
    done = _complete_shard_meta(path, plan.params_hash, spec.start, spec.count)
    if done is not None:
        info = ShardInfo(spec.file, spec.start, spec.count, file_sha256(path))
        return ShardOutcome(info, False, tuple(done.get("nonfinite", ())))
    device = resolve_device(device)
    fixed = resolve_batch_size(batch_size)
    with torch_backends(device, tf32=tf32):
        model.to(device)
        nhwc = use_channels_last(channels_last, model, device)
        if nhwc:
            model.to(memory_format=torch.channels_last)
        if attribute is None:
            attribute = make_attributor(model, plan.method, plan.engine_options, validate=False)
        size = fixed or _auto_batch_size(plan, spec, attribute, dataset, device, nhwc)
        arrays, bad_input, bad_output, paths = _explain_range(
            attribute, dataset, spec, size, device, num_workers, plan.local, nhwc, progress
        )
    if bad_input.any():
        raise NonFiniteInputError(_describe_bad_inputs(arrays["index"], bad_input, paths))
    nonfinite = tuple(int(i) for i in arrays["index"][bad_output])
    meta: dict[str, Any] = {
        "params_hash": plan.params_hash, "start": spec.start, "count": spec.count, "shard": spec.k
    }
    if nonfinite:  # only then: clean shards stay byte-identical to earlier versions
        meta["nonfinite"] = list(nonfinite)
    _atomic_savez(path, arrays, meta)
    if nonfinite:
        warnings.warn(
            f"{plan.method}: relevance or logits are NaN/Inf for dataset items "
            f"{list(nonfinite)} ({path.name}; stored as computed)",
            RuntimeWarning,
            stacklevel=2,
        )
    info = ShardInfo(spec.file, spec.start, spec.count, file_sha256(path))
    return ShardOutcome(info, True, nonfinite)


def write_index(plan: ExplainPlan, outcomes: list[ShardOutcome]) -> ShardIndex:
    """Write ``index.json`` once every shard of ``plan`` is finished; returns the index.

    The outcomes may come in any order (parallel workers); every planned shard must be there.
    """
    by_file = {o.info.file: o for o in outcomes}
    missing = [s.file for s in plan.shards if s.file not in by_file]
    if missing:
        raise ShardError(f"{plan.out_dir}: shards not finished: {missing}")
    ordered = [by_file[s.file] for s in plan.shards]
    for spec, outcome in zip(plan.shards, ordered, strict=True):
        if (outcome.info.start, outcome.info.count) != (spec.start, spec.count):
            raise ShardError(f"{plan.out_dir / spec.file}: covers other dataset positions")
        if not (plan.out_dir / spec.file).is_file():
            raise ShardError(f"{plan.out_dir / spec.file}: missing after it was written")
    shards = [o.info for o in ordered]
    content_hash = _sha256_text(plan.params_hash + "".join(s.sha256 for s in shards))
    index = {
        "format": FORMAT_VERSION,
        "params": plan.params,
        "params_hash": plan.params_hash,
        "num_items": plan.num_items,
        "arrays": list(ARRAYS),
        "shards": [asdict(s) for s in shards],
        "content_hash": content_hash,
    }
    nonfinite = sorted(i for o in ordered for i in o.nonfinite)
    if nonfinite:
        index["nonfinite"] = nonfinite
    _atomic_write_text(plan.out_dir / INDEX_FILE, json.dumps(index, indent=1))
    return ShardIndex(
        plan.out_dir, shards, plan.num_items, plan.params, plan.params_hash, content_hash,
        written=[o.info.file for o in ordered if o.written],
        skipped=[o.info.file for o in ordered if not o.written],
    )


def explain_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    out_dir: Path,
    method: str = "epsilon-plus-flat",
    options: dict[str, Any],
    batch_size: int | str,
    device: str | torch.device,
    shard_size: int = 256,
    progress: bool = True,
    num_workers: int = 0,
    on_shard: Callable[[ShardInfo], None] | None = None,
    channels_last: bool | str = "auto",
    tf32: bool = True,
) -> ShardIndex:
    """Explain every item of ``dataset`` with ``method`` and write shards plus ``index.json``.

    The single-process composition of :func:`plan_explanation`, :func:`explain_shard` (one after
    another) and :func:`write_index`; the Prefect flows run the same pieces as parallel tasks.
    ``method`` is an engine composite name (``lrp.composites.names()``) or a non-LRP baseline
    (``lrp.baselines``). ``options``: ``target`` ("label": ground truth, default; or "predicted"),
    ``relevance_dtype`` ("float32" default, or "float16" to halve disk use; computed in float32
    either way), ``channel_sum`` (store (N,H,W)); the rest goes to ``lrp.Explainer`` (output,
    residual, lrn, epsilon, ...). For LRP the dataset's ``input_bounds()`` is passed as
    ``input_bounds`` unless given. ``batch_size`` may be ``"auto"`` (searched on CUDA);
    ``channels_last`` and ``tf32`` as in ``params.runtime`` (:mod:`flows.runtime`).
    ``on_shard`` is called after each shard is written (progress reporting; tests use it to
    simulate an interruption). The model is put in eval mode and moved to ``device`` (its
    training flag and memory format are restored).
    """
    if batch_size != "auto" and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    if shard_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    plan = plan_explanation(
        model, dataset, out_dir=out_dir, method=method, options=options, shard_size=shard_size
    )
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    nhwc = False
    bar = None
    try:
        model.to(device)
        nhwc = use_channels_last(channels_last, model, device)
        if nhwc:
            model.to(memory_format=torch.channels_last)
        # built before any file is touched, so bad options fail without side effects
        attribute = make_attributor(model, method, plan.engine_options, validate=False)
        prepare_out_dir(plan)
        bar = tqdm(total=plan.num_items, desc=f"explain {method}", unit="img",
                   disable=not progress)
        outcomes = []
        for spec in plan.shards:
            outcome = explain_shard(
                plan, spec, model, dataset, batch_size=batch_size, device=device,
                num_workers=num_workers, channels_last=nhwc, tf32=tf32, attribute=attribute,
                progress=bar.update,
            )
            outcomes.append(outcome)
            if not outcome.written:
                bar.update(spec.count)
            elif on_shard is not None:
                on_shard(outcome.info)
    finally:
        if bar is not None:
            bar.close()
        if nhwc:
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    return write_index(plan, outcomes)


def read_index(out_dir: Path) -> dict[str, Any]:
    """The parsed ``index.json`` of an explanation folder (ShardError names what is wrong)."""
    index_path = Path(out_dir) / INDEX_FILE
    if not index_path.is_file():
        raise ShardError(
            f"{index_path}: missing; the explain stage did not finish (run it again to resume)"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["shards"] = [ShardInfo(**s) for s in index["shards"]]
        index["num_items"] = int(index["num_items"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{index_path}: unreadable index ({exc})") from exc
    return index


def read_shard(
    path: Path, *, sha256: str | None = None, names: tuple[str, ...] = ARRAYS,
    count: int | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of one shard file, after checking its SHA-256 (if given) and row counts."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in {INDEX_FILE} is missing")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ShardError(f"{path}: checksum mismatch (truncated or corrupt); re-run explain")
    out: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for name in names:
                array = data[name]
                if count is not None and len(array) != count:
                    raise ShardError(f"{path}: {name} has {len(array)} rows, expected {count}")
                out[name] = array
    except ShardError:
        raise
    except Exception as exc:
        raise ShardError(f"{path}: unreadable shard ({type(exc).__name__}: {exc})") from exc
    return out


def load_shards(out_dir: Path, names: tuple[str, ...] = ARRAYS) -> dict[str, np.ndarray]:
    """Concatenate the shards listed in ``index.json`` after checking their SHA-256 and sizes.

    ``names`` limits the arrays read (the evaluation merge needs no relevance).
    """
    out_dir = Path(out_dir)
    index = read_index(out_dir)
    shard_list: list[ShardInfo] = index["shards"]
    num_items = index["num_items"]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    expected_start = 0
    for info in shard_list:
        path = out_dir / info.file
        arrays = read_shard(path, sha256=info.sha256, names=names, count=info.count)
        if info.start != expected_start:
            raise ShardError(f"{path}: starts at {info.start}, expected {expected_start}")
        for name in names:
            parts[name].append(arrays[name])
        expected_start += info.count
    if expected_start != num_items:
        raise ShardError(
            f"{out_dir / INDEX_FILE}: shards hold {expected_start} items, expected {num_items}"
        )
    if not shard_list:
        raise ShardError(f"{out_dir / INDEX_FILE}: lists no shards")
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def make_attributor(
    model: nn.Module, method: str, engine_options: dict[str, Any], *, validate: bool = True
) -> Attributor:
    """A function ``(x, target or None) -> dict(relevance, logits, target, initial, conservation)``.

    Composite names go to ``lrp.Explainer``; other names to ``lrp.baselines.attribute`` (no
    conservation for those: initial and conservation are NaN). ``validate=False`` skips the
    engine's value checks, each of which waits for the device: the dataset loop checks in bulk.
    """
    import lrp

    if method in _composite_names():
        explainer = lrp.Explainer(model, composite=method, **engine_options)

        def run_lrp(x: torch.Tensor, target: torch.Tensor | None) -> dict[str, torch.Tensor]:
            e = explainer(x, target=target, validate=validate)
            return {
                "relevance": e.relevance,
                "logits": e.logits,
                "target": e.target,
                "initial": e.initial,
                "conservation": lrp.conservation(e),
            }

        return run_lrp

    try:
        from lrp import baselines
    except ImportError as exc:
        raise ValueError(
            f"unknown method {method!r}: not a composite {sorted(_composite_names())} and "
            "lrp.baselines is not available"
        ) from exc
    attribute = baselines.make_attributor(model, method, **engine_options)

    def run_baseline(x: torch.Tensor, target: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logits = model(x)
        chosen = logits.argmax(1) if target is None else target
        relevance = attribute(x, chosen)
        nan = torch.full((len(x),), float("nan"))
        return {
            "relevance": relevance,
            "logits": logits,
            "target": chosen,
            "initial": nan,
            "conservation": nan,
        }

    return run_baseline


def model_hash(model: nn.Module) -> str:
    """SHA-256 of the state_dict (names, dtypes, shapes, values): results depend on the weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _explain_range(
    attribute: Attributor,
    dataset: Dataset,
    spec: ShardSpec,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    local: dict[str, Any],
    channels_last: bool,
    progress: Callable[[int], None] | None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[str]]:
    """The hot loop: no per-sample Python work and no host-device sync per batch.

    On CUDA, batches come from pinned memory and are copied with ``non_blocking``; results go
    into preallocated pinned host buffers with ``non_blocking`` copies, and NaN/Inf flags are kept
    on the device; one synchronisation at the end of the shard makes all of it visible (other
    devices copy synchronously). Returns the arrays, the per-item flags (non-finite input,
    non-finite output) and the items' file paths.
    """
    cuda = device.type == "cuda"
    loader = DataLoader(
        Subset(dataset, range(spec.start, spec.start + spec.count)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=loader_workers(num_workers),
        collate_fn=collate,
        pin_memory=cuda,
    )
    store = torch.float16 if local["relevance_dtype"] == "float16" else torch.float32
    n = spec.count
    host: dict[str, torch.Tensor] = {}
    bad_input = torch.zeros(n, dtype=torch.bool, device=device)
    bad_output = torch.zeros(n, dtype=torch.bool, device=device)
    label = np.empty(n, dtype=np.int64)
    index = np.empty(n, dtype=np.int64)
    paths: list[str] = []
    pos = 0
    for batch in loader:
        b = len(batch["label"])
        x = batch["image"].to(device, non_blocking=cuda)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        target = batch["label"].to(device, non_blocking=cuda) if local["target"] == "label" else None
        result = attribute(x, target)
        relevance = result["relevance"].detach().float()  # computed in float32 (docs/PIPELINE.md)
        logits = result["logits"].detach().float()
        bad_input[pos : pos + b] = ~torch.isfinite(x).flatten(1).all(1)
        bad_output[pos : pos + b] = ~(
            torch.isfinite(relevance).flatten(1).all(1) & torch.isfinite(logits).all(1)
        )
        if local["channel_sum"]:
            relevance = relevance.sum(1)
        values = {
            "relevance": relevance.to(store).contiguous(),  # float16: a storage format only
            "logits": logits,
            "target": result["target"].detach().long(),
            "initial": result["initial"].detach().float(),
            "conservation": result["conservation"].detach().float(),
        }
        if not host:
            host = {
                name: torch.empty((n, *v.shape[1:]), dtype=v.dtype, pin_memory=cuda)
                for name, v in values.items()
            }
        for name, v in values.items():
            host[name][pos : pos + b].copy_(v, non_blocking=cuda)  # into pinned memory: async
        label[pos : pos + b] = batch["label"].numpy()
        index[pos : pos + b] = batch["index"].numpy()
        paths.extend(batch.get("path") or [""] * b)
        pos += b
        if progress is not None:
            progress(b)
    if pos != n:
        raise ShardError(f"dataset yielded {pos} items for {spec.file}, expected {n}")
    flags = torch.empty((2, n), dtype=torch.bool, pin_memory=cuda)
    flags[0].copy_(bad_input, non_blocking=cuda)
    flags[1].copy_(bad_output, non_blocking=cuda)
    if cuda:
        torch.cuda.synchronize(device)  # the one wait per shard: results are now on the host
    arrays = {name: t.numpy() for name, t in host.items()}
    arrays["label"] = label
    arrays["index"] = index
    flags_np = flags.numpy()
    return {name: arrays[name] for name in ARRAYS}, flags_np[0], flags_np[1], paths


def _auto_batch_size(
    plan: ExplainPlan,
    spec: ShardSpec,
    attribute: Attributor,
    dataset: Dataset,
    device: torch.device,
    channels_last: bool,
) -> int:
    """``batch_size: auto``: the largest batch of this model and image shape that fits (CUDA)."""
    sample = dataset[spec.start]["image"]
    key = (plan.params["model_sha256"], plan.method, json.dumps(plan.params["options"]),
           tuple(sample.shape), channels_last)
    limit = int(plan.params["shard_size"])  # a shard is one DataLoader pass: no bigger batches

    def run(size: int) -> None:
        x = sample.unsqueeze(0).expand(size, *sample.shape).to(device).contiguous()
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.zeros(size, dtype=torch.long, device=device)
        attribute(x, target if plan.local["target"] == "label" else None)

    return auto_batch_size(key, device, run, limit=limit)


def _describe_bad_inputs(index: np.ndarray, bad: np.ndarray, paths: list[str]) -> str:
    items = [
        f"item {int(index[i])}" + (f" ({paths[i]})" if i < len(paths) and paths[i] else "")
        for i in np.flatnonzero(bad)
    ]
    shown = ", ".join(items[:10]) + (f" and {len(items) - 10} more" if len(items) > 10 else "")
    return f"image contains NaN or Inf values: {shown}; fix or remove these files"


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    try:
        np.savez_compressed(tmp, _meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _complete_shard_meta(
    path: Path, params_hash: str, start: int, count: int
) -> dict[str, Any] | None:
    """The metadata of ``path`` if it is a readable shard of this run, else None.

    Reading every array checks its CRC, so a truncated or corrupt file is recomputed.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["_meta"]))
            if meta != {**meta, "params_hash": params_hash, "start": start, "count": count}:
                return None
            return meta if all(len(data[name]) == count for name in ARRAYS) else None
    except Exception:
        return None  # truncated or corrupt: recompute


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _composite_names() -> set[str]:
    try:
        from lrp import composites
    except ImportError:
        return set()
    return set(composites.names())


@functools.cache
def _engine_version() -> str:
    """The engine's version plus a hash of its source: shards made by other engine code are stale
    (the same rule DVC applies to the ``lrp`` dependency of the explain stage)."""
    try:
        import lrp
    except ImportError:
        return "unavailable"
    root = Path(lrp.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return f"{getattr(lrp, '__version__', 'unknown')}+{h.hexdigest()[:12]}"


def dataset_id(dataset: Dataset) -> str:
    """The dataset's fingerprint (files, labels, preprocessing) as hashed into the plan."""
    fingerprint = getattr(dataset, "fingerprint", None)
    if callable(fingerprint):
        return str(fingerprint())
    return f"{type(dataset).__name__}:{len(dataset)}"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _jsonable(value: Any) -> Any:
    """Options as JSON (tensors become nested lists) so that they hash and log reproducibly."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)
