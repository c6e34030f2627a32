"""Where each stage writes: one place so dvc.yaml, the stages and the report agree.

Relative paths in params.yaml are resolved against the folder of the params file, so a Prefect
worker started elsewhere reads and writes the same files as ``dvc repro`` in the repository.
Summary metrics live outside ``outputs/`` (in ``metrics/``, committed to git), so that DVC
experiment commits carry them and ``dvc exp show`` can compare experiments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Output paths under ``root`` (``outputs/`` for DVC) and metric files under ``metrics_root``."""

    root: Path
    metrics_root: Path

    def model(self, arch: str) -> Path:
        return self.root / "models" / f"{arch}.pt"

    def checkpoints(self, arch: str) -> Path:
        return self.root / "checkpoints" / arch

    def train_history(self, arch: str) -> Path:
        """Per-epoch losses and accuracies (the report plots them)."""
        return self.root / "train" / f"{arch}.json"

    def train_metrics(self, arch: str) -> Path:
        """Validation accuracy and the effective training settings (a DVC metric)."""
        return self.metrics_root / arch / "train.json"

    def relevance(self, arch: str, label: str | None = None) -> Path:
        base = self.root / "relevance" / arch
        return base if label is None else base / label

    def evaluation(self, arch: str) -> Path:
        return self.root / "eval" / arch

    def eval_shards(self, arch: str) -> Path:
        """Per-shard partial scores (resume state of the evaluate stage; not a DVC output)."""
        return self.root / "eval-shards" / arch

    def metrics(self, arch: str) -> Path:
        """The evaluate stage's summary (a DVC metric): ``composite.*`` and ``compare.<label>.*``."""
        return self.metrics_root / arch / "explain.json"

    def plots(self, arch: str) -> Path:
        """Static PNG plots registered with DVC (``dvc plots show`` works offline)."""
        return self.root / "plots" / arch

    def report(self) -> Path:
        return self.root / "report"

    def studies(self) -> Path:
        """Outputs of the study commands (``flows.studies``): never DVC-tracked."""
        return self.root / "studies"


def resolve(path: str | Path, base: str | Path) -> Path:
    """``path`` if absolute, else relative to ``base``."""
    p = Path(path)
    return p if p.is_absolute() else Path(base) / p
