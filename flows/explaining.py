"""Explain a whole dataset in batches and store the results as resumable, verifiable shards.

Layout of ``out_dir``: ``shard-00000.npz`` ... (compressed; dataset positions ``[k*shard_size,
(k+1)*shard_size)``) and ``index.json``, written last, listing every shard with its SHA-256, the
parameters and a content hash. Each shard also embeds the parameter hash, so an interrupted run
resumes by skipping shards that are complete and were made with the same model, data and options.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def explain_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    out_dir: Path,
    method: str = "epsilon-plus-flat",
    options: dict[str, Any],
    batch_size: int,
    device: str | torch.device,
    shard_size: int = 256,
    progress: bool = True,
    num_workers: int = 0,
    on_shard: Callable[[ShardInfo], None] | None = None,
) -> ShardIndex:
    """Explain every item of ``dataset`` with ``method`` and write shards plus ``index.json``.

    ``method`` is an engine composite name (``lrp.composites.names()``) or a non-LRP baseline
    (``lrp.baselines``). ``options``: ``target`` ("label": ground truth, default; or "predicted"),
    ``relevance_dtype`` ("float32" default, or "float16" to halve disk use), ``channel_sum`` (store
    (N,H,W)); the rest goes to ``lrp.Explainer`` (output, residual, lrn, epsilon, ...). For LRP the
    dataset's ``input_bounds()`` is passed as ``input_bounds`` unless given. ``on_shard`` is called
    after each shard is written (progress reporting; tests use it to simulate an interruption).
    The model is put in eval mode and moved to ``device`` (its training flag is restored).
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
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

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    n = len(dataset)
    params = {
        "format": FORMAT_VERSION,
        "method": method,
        "options": _jsonable({**local, **engine_options}),
        "model_sha256": model_hash(model),
        "dataset": _dataset_id(dataset),
        "num_items": n,
        "shard_size": shard_size,
        "engine_version": _engine_version(),
    }
    params_hash = _sha256_text(json.dumps(params, sort_keys=True))
    model.to(device)
    try:  # built before any file is touched, so bad options fail without side effects
        attribute = make_attributor(model, method, engine_options)
    except BaseException:
        model.train(was_training)
        raise
    index_path = out_dir / INDEX_FILE
    index_path.unlink(missing_ok=True)  # rewritten last; never describes a half-done run
    for stale in out_dir.glob("shard-[0-9]*.npz"):  # shards past the end (an earlier, larger run)
        if stale.stem[6:].isdigit() and int(stale.stem[6:]) * shard_size >= n:
            stale.unlink()
    for tmp in out_dir.glob(".shard-*.tmp-*.npz"):  # left by a killed process
        tmp.unlink(missing_ok=True)

    starts = list(range(0, n, shard_size))
    shards: list[ShardInfo] = []
    written: list[str] = []
    skipped: list[str] = []
    bar = tqdm(total=n, desc=f"explain {method}", unit="img", disable=not progress)
    try:
        for k, start in enumerate(starts):
            count = min(shard_size, n - start)
            path = out_dir / f"shard-{k:05d}.npz"
            if _shard_ok(path, params_hash, start, count):
                shards.append(ShardInfo(path.name, start, count, file_sha256(path)))
                skipped.append(path.name)
                bar.update(count)
                continue
            arrays = _explain_range(
                attribute, dataset, start, count, batch_size, device, num_workers, local, bar
            )
            meta = {"params_hash": params_hash, "start": start, "count": count, "shard": k}
            _atomic_savez(path, arrays, meta)
            info = ShardInfo(path.name, start, count, file_sha256(path))
            shards.append(info)
            written.append(path.name)
            if on_shard is not None:
                on_shard(info)
    finally:
        bar.close()
        model.train(was_training)

    content_hash = _sha256_text(params_hash + "".join(s.sha256 for s in shards))
    index = {
        "format": FORMAT_VERSION,
        "params": params,
        "params_hash": params_hash,
        "num_items": n,
        "arrays": list(ARRAYS),
        "shards": [asdict(s) for s in shards],
        "content_hash": content_hash,
    }
    _atomic_write_text(index_path, json.dumps(index, indent=1))
    return ShardIndex(out_dir, shards, n, params, params_hash, content_hash, written, skipped)


def load_shards(out_dir: Path) -> dict[str, np.ndarray]:
    """Concatenate the shards listed in ``index.json`` after checking their SHA-256 and sizes."""
    out_dir = Path(out_dir)
    index_path = out_dir / INDEX_FILE
    if not index_path.is_file():
        raise ShardError(
            f"{index_path}: missing; the explain stage did not finish (run it again to resume)"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shard_list = [ShardInfo(**s) for s in index["shards"]]
        num_items = int(index["num_items"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{index_path}: unreadable index ({exc})") from exc
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
    expected_start = 0
    for info in shard_list:
        path = out_dir / info.file
        if not path.is_file():
            raise ShardError(f"{path}: shard listed in {INDEX_FILE} is missing")
        if file_sha256(path) != info.sha256:
            raise ShardError(f"{path}: checksum mismatch (truncated or corrupt); re-run explain")
        if info.start != expected_start:
            raise ShardError(f"{path}: starts at {info.start}, expected {expected_start}")
        try:
            with np.load(path, allow_pickle=False) as data:
                for name in ARRAYS:
                    array = data[name]
                    if len(array) != info.count:
                        raise ShardError(
                            f"{path}: {name} has {len(array)} rows, expected {info.count}"
                        )
                    parts[name].append(array)
        except ShardError:
            raise
        except Exception as exc:
            raise ShardError(f"{path}: unreadable shard ({type(exc).__name__}: {exc})") from exc
        expected_start += info.count
    if expected_start != num_items:
        raise ShardError(f"{index_path}: shards hold {expected_start} items, expected {num_items}")
    if not shard_list:
        raise ShardError(f"{index_path}: lists no shards")
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def make_attributor(model: nn.Module, method: str, engine_options: dict[str, Any]) -> Attributor:
    """A function ``(x, target or None) -> dict(relevance, logits, target, initial, conservation)``.

    Composite names go to ``lrp.Explainer``; other names to ``lrp.baselines.attribute`` (no
    conservation for those: initial and conservation are NaN).
    """
    import lrp

    if method in _composite_names():
        explainer = lrp.Explainer(model, composite=method, **engine_options)

        def run_lrp(x: torch.Tensor, target: torch.Tensor | None) -> dict[str, torch.Tensor]:
            e = explainer(x, target=target)
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
    start: int,
    count: int,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    local: dict[str, Any],
    bar: tqdm,
) -> dict[str, np.ndarray]:
    loader = DataLoader(
        Subset(dataset, range(start, start + count)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
    )
    rel_dtype = np.float16 if local["relevance_dtype"] == "float16" else np.float32
    out: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
    for batch in loader:
        x = batch["image"].to(device)
        label = batch["label"]
        target = label.to(device) if local["target"] == "label" else None
        result = attribute(x, target)
        relevance = result["relevance"].detach().float()
        if local["channel_sum"]:
            relevance = relevance.sum(1)
        out["relevance"].append(relevance.cpu().numpy().astype(rel_dtype))
        out["logits"].append(result["logits"].detach().float().cpu().numpy())
        out["target"].append(result["target"].detach().cpu().numpy().astype(np.int64))
        out["label"].append(label.numpy().astype(np.int64))
        out["index"].append(batch["index"].numpy().astype(np.int64))
        out["initial"].append(result["initial"].detach().float().cpu().numpy())
        out["conservation"].append(result["conservation"].detach().float().cpu().numpy())
        bar.update(len(label))
    return {name: np.concatenate(chunks) for name, chunks in out.items()}


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    try:
        np.savez_compressed(tmp, _meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shard_ok(path: Path, params_hash: str, start: int, count: int) -> bool:
    """True if ``path`` is a readable shard of this run (reading every array checks its CRC)."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["_meta"]))
            if meta != {**meta, "params_hash": params_hash, "start": start, "count": count}:
                return False
            return all(len(data[name]) == count for name in ARRAYS)
    except Exception:
        return False  # truncated or corrupt: recompute


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


def _engine_version() -> str:
    try:
        import lrp
    except ImportError:
        return "unavailable"
    return str(getattr(lrp, "__version__", "unknown"))


def _dataset_id(dataset: Dataset) -> str:
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
