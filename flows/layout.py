"""Where each stage writes: one place so dvc.yaml, the stages and the report agree.

Relative paths in params.yaml are resolved against the folder of the params file, so a Prefect
worker started elsewhere reads and writes the same files as ``dvc repro`` in the repository.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layout:
    """Output paths under ``root`` (``outputs/`` for DVC)."""

    root: Path

    def model(self, arch: str) -> Path:
        return self.root / "models" / f"{arch}.pt"

    def checkpoints(self, arch: str) -> Path:
        return self.root / "checkpoints" / arch

    def train_metrics(self, arch: str) -> Path:
        return self.root / "train" / f"{arch}.json"

    def relevance(self, arch: str, method: str | None = None) -> Path:
        base = self.root / "relevance" / arch
        return base if method is None else base / method

    def evaluation(self, arch: str) -> Path:
        return self.root / "eval" / arch

    def eval_shards(self, arch: str) -> Path:
        """Per-shard partial scores (resume state of the evaluate stage; not a DVC output)."""
        return self.root / "eval-shards" / arch

    def metrics(self, arch: str) -> Path:
        return self.root / "metrics" / f"{arch}.json"

    def plots(self, arch: str) -> Path:
        return self.root / "plots" / arch

    def report(self) -> Path:
        return self.root / "report"


def resolve(path: str | Path, base: str | Path) -> Path:
    """``path`` if absolute, else relative to ``base``."""
    p = Path(path)
    return p if p.is_absolute() else Path(base) / p


def write_json(path: Path, data: Any) -> Path:
    """Write atomically: a stage killed mid-write leaves no truncated metrics file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> Path:
    """Atomic text write (CSV tables)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
