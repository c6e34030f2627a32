"""The shard store: explanation shards on disk, their index, and the hashes that identify them.

Layout of a method's folder: ``shard-00000.npz`` ... (compressed; dataset positions ``[k*shard_size,
(k+1)*shard_size)``) and ``index.json``, written last, listing every shard with its SHA-256, the
parameters and a content hash. Each shard embeds the parameter hash (model weights, dataset,
method, options, engine source), so an interrupted run resumes by skipping shards that are complete
and were made with the same inputs, and a reader can check every file it loads.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import lrp
from flows.io import atomic_path, write_text
from flows.methods import Method

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
ARRAYS = ("relevance", "logits", "target", "label", "index", "initial", "conservation")


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
    method: Method
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
    for tmp in out_dir.glob(".shard-*.tmp-*"):  # left by a killed process
        tmp.unlink(missing_ok=True)


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
    content_hash = sha256_text(plan.params_hash + "".join(s.sha256 for s in shards))
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
    write_text(plan.out_dir / INDEX_FILE, json.dumps(index, indent=1))
    return ShardIndex(
        plan.out_dir, shards, plan.num_items, plan.params, plan.params_hash, content_hash,
        written=[o.info.file for o in ordered if o.written],
        skipped=[o.info.file for o in ordered if not o.written],
    )


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


def save_shard(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write one shard atomically: its arrays plus ``_meta`` (params hash, positions, flags)."""
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, _meta=np.array(json.dumps(meta)), **arrays)


def complete_shard_meta(
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


def dataset_id(dataset: Dataset) -> str:
    """The dataset's fingerprint (files, labels, preprocessing) as hashed into the plan."""
    fingerprint = getattr(dataset, "fingerprint", None)
    if callable(fingerprint):
        return str(fingerprint())
    return f"{type(dataset).__name__}:{len(dataset)}"


@functools.cache
def engine_version() -> str:
    """The engine's version plus a hash of its source: shards made by other engine code are stale
    (the same rule DVC applies to the ``lrp`` dependency of the explain stage)."""
    root = Path(lrp.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return f"{getattr(lrp, '__version__', 'unknown')}+{h.hexdigest()[:12]}"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

