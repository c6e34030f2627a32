"""The shared context of every stage: validated params, output layout, dataset and model loaders.

At the bottom of the flows: stages import it, it imports no stage. Prefect appears here only as
the run logger (``log``), which falls back to the standard logger outside a run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from flows import models
from flows.config import Params, ParamsError
from flows.data import ImageDataset
from flows.layout import Layout, resolve
from flows.methods import ENGINE_KEYS, Method, parse_method
from flows.runtime import resolve_device


@dataclass(frozen=True)
class Context:
    """Validated params plus the folder relative paths are resolved against."""

    params: Params
    base: Path
    layout: Layout
    params_path: Path


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge ``{"train.epochs": 1}`` or ``{"train": {"epochs": 1}}`` into the raw params dict.

    An explicit ``train.<key>`` override wins over ``train.per_model.<arch>.<key>`` (the key is
    dropped from every per-model entry). Unknown keys are left for :meth:`Params.from_dict`,
    which names them in its error.
    """
    merged = copy.deepcopy(raw) if raw else {}
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and "." not in key:
            pairs = [(key, k, v) for k, v in value.items()]
        else:
            parts = key.split(".")
            if len(parts) != 2:
                raise ParamsError(f"overrides: {key!r}: use 'section.key' (e.g. 'train.epochs')")
            pairs = [(parts[0], parts[1], value)]
        for section_name, name, v in pairs:
            section = merged.setdefault(section_name, {})
            if not isinstance(section, dict):
                raise ParamsError(f"overrides: {section_name}: section is not a mapping")
            section[name] = v
            if section_name == "train" and name != "per_model":
                for entry in (section.get("per_model") or {}).values():
                    if isinstance(entry, dict):
                        entry.pop(name, None)
    return merged


def load_context(
    params_path: str | Path = "params.yaml",
    overrides: Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
) -> Context:
    """Read params (plus overrides) and fix the output roots (``outputs/`` and ``metrics/``).

    With ``output_dir`` both live under it, so a variant run never touches DVC-tracked files.
    """
    path = Path(params_path).resolve()
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    params = Params.from_dict(apply_overrides(raw, overrides), source=str(path))
    base = path.parent
    if output_dir is None:
        layout = Layout((base / "outputs").resolve(), (base / "metrics").resolve())
    else:
        root = resolve(output_dir, base).resolve()
        layout = Layout(root, root / "metrics")
    return Context(params=params, base=base, layout=layout, params_path=path)


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-able settings: guards resumable state against changed params."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def methods(params: Params) -> list[Method]:
    """The compared methods: the composite first, then ``explain.compare`` in order."""
    return [Method(params.explain.composite), *map(parse_method, params.explain.compare)]


def engine_options(params: Params, method: Method) -> dict[str, Any]:
    """Options of ``method``: for composites the ``explain`` engine keys, then its own options."""
    if not method.composite:
        return dict(method.options)
    return {**{k: getattr(params.explain, k) for k in ENGINE_KEYS}, **method.options}


def data_root(ctx: Context) -> Path:
    return resolve(ctx.params.data.root, ctx.base)


def dataset(ctx: Context, split: str | None, subset: int | None = None) -> ImageDataset:
    """The project's ImageDataset for one split (validates every file on construction)."""
    d = ctx.params.data
    return ImageDataset(
        data_root(ctx), size=d.image_size, split=None if split == "all" else split, subset=subset,
        val_fraction=d.val_fraction, test_fraction=d.test_fraction,
    )


def require_data(ctx: Context) -> None:
    """DVC stages never create data behind data.dvc's back: they ask for the data stage."""
    root = data_root(ctx)
    if not root.exists():
        raise FileNotFoundError(
            f"{root}: dataset missing (params key 'data.root'); run "
            "`python -m flows.stages data && dvc add data` or `dvc pull`"
        )


def require_arch(ctx: Context, arch: str) -> None:
    """A stage runs only for a model listed in ``model.architectures``."""
    if arch not in ctx.params.model.architectures:
        raise ParamsError(
            f"{ctx.params_path}: model.architectures: {arch!r} is not listed "
            f"({ctx.params.model.architectures})"
        )


def load_trained(ctx: Context, arch: str, num_classes: int) -> torch.nn.Module:
    """The model the train stage wrote, rebuilt with real modules."""
    path = ctx.layout.model(arch)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trained model missing; run the train stage for {arch!r}")
    return models.load_trained(path, num_classes, arch)


def device(ctx: Context) -> torch.device:
    return resolve_device(ctx.params.runtime.device)


def log(message: str, *args: Any, level: int = logging.INFO) -> None:
    """Log to the Prefect run (shown in the terminal and the UI), or to ``logging`` outside one."""
    try:
        logger: Any = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger("flows")
    logger.log(level, message, *args)
