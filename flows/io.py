"""Atomic file writes and JSON conversion: the one place every stage writes results through.

A stage killed mid-write must leave either the old file or the new one, never a truncated file that
a resumed run (or DVC) would take for a finished result.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto it when the block succeeds.

    The temporary name keeps the suffix (``np.savez`` appends ``.npz`` otherwise) and starts with a
    dot, so globs of finished files never see it. On failure it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` atomically, through a file object: given a path, torch names the archive's
    records after the file, and the temporary name (with the process id) would make every
    checkpoint of the same weights differ, and with it DVC's hash."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON atomically (tensors and arrays as lists)."""
    return write_text(path, json.dumps(jsonable(data), indent=2, sort_keys=True) + "\n")


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: tensors/arrays become lists, paths and others strings.

    Used for files and for hashes, so the same settings always give the same text.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "tolist"):  # torch.Tensor, np.ndarray, numpy scalars
        return jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return repr(value)
