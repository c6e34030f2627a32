"""Typed pipeline parameters loaded from ``params.yaml``.

One source of truth for every stage: DVC tracks the file, the Prefect flows read it and MLflow logs
:meth:`Params.to_flat_dict`. Validation happens up front so that a typo fails in a second with the
key path named, not an hour later inside a stage.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import lrp
from flows import models
from flows.methods import ENGINE_KEYS, MethodError, parse_method
from lrp.explainer import OUTPUTS
from lrp.rules.residual import ALIASES as RESIDUAL_ALIASES
from lrp.rules.residual import MODES as RESIDUAL_MODES


class ParamsError(ValueError):
    """A params file is missing or unreadable, or has an unknown key or a bad value (path named)."""


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": list(values)}


# The engine's names, not copies: a mode the engine adds is accepted here at once.
_COMPOSITE = {"choices": "composites"}
_RESIDUAL = _choices(*RESIDUAL_MODES, *RESIDUAL_ALIASES)
# The default comparison: the paper's preset, its residual ablation and a CAM baseline.
DEFAULT_COMPARE = ("otsuki2024", "otsuki2024:residual=gradient", "grad-cam")


@dataclass
class DataParams:
    """Where the images are and, for the synthetic set, how to generate them."""

    root: str = "data/synthetic"
    synthetic: bool = True  # generate a synthetic dataset at `root` when it is missing
    classes: list[str] | None = None  # synthetic classes; None = all built-in shapes
    per_class: int = field(default=100, metadata={"min": 1})
    image_size: int = field(default=64, metadata={"min": 8})
    seed: int = 0
    val_fraction: float = field(default=0.15, metadata={"min": 0.0, "max": 0.9})
    test_fraction: float = field(default=0.15, metadata={"min": 0.0, "max": 0.9})


@dataclass
class ModelParams:
    """Which architectures to train and explain, and where their weights come from."""

    architectures: list[str] = field(
        default_factory=lambda: ["small_resnet", "lrn_cnn"], metadata={"choices": "architectures"}
    )
    weights: str | None = None  # torchvision weights name, e.g. "DEFAULT" (downloads: users only)
    checkpoint: str | None = None  # local state_dict or pickled model


@dataclass
class TrainParams:
    """SGD with early stopping on validation loss (Otsuki et al. use lr 1e-3 for fine-tuning)."""

    epochs: int = field(default=30, metadata={"min": 0})
    lr: float = field(default=0.02, metadata={"min": 0.0})
    weight_decay: float = field(default=1e-4, metadata={"min": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    batch_size: int = field(default=32, metadata={"min": 1})
    patience: int = field(default=8, metadata={"min": 1})
    seed: int = 0
    augment: bool = True
    # cosine decay suits training from scratch; use "constant" for the fine-tuning protocol
    schedule: str = field(default="cosine", metadata=_choices("constant", "cosine"))
    # per-architecture overrides of the keys above, e.g. {lrn_cnn: {lr: 0.01, epochs: 40}}
    per_model: dict = field(default_factory=dict)


@dataclass
class ExplainParams:
    """Engine options for the explanation stage."""

    composite: str = field(default="epsilon-plus-flat", metadata=_COMPOSITE)
    # further methods compared with the composite: composites with their own options
    # ("otsuki2024:residual=gradient") or baselines (lrp.baselines.BASELINES)
    compare: list[str] = field(default_factory=lambda: list(DEFAULT_COMPARE))
    output: str = field(default="logit", metadata=_choices(*OUTPUTS))
    residual: str = field(default="splitting", metadata=_RESIDUAL)
    lrn: str = "taylor"  # validated by the engine (lrp.Explainer's lrn=)
    epsilon: float = field(default=1e-6, metadata={"min": 0.0})
    gamma: float = field(default=0.25, metadata={"min": 0.0})
    target: str = field(default="label", metadata=_choices("label", "predicted"))
    # float32: the stabilising epsilon underflows in float16 (docs/PIPELINE.md); float16 halves disk
    relevance_dtype: str = field(default="float32", metadata=_choices("float32", "float16"))
    channel_sum: bool = False
    split: str = field(default="test", metadata=_choices("train", "val", "test", "all"))
    shard_size: int = field(default=256, metadata={"min": 1})


@dataclass
class EvaluateParams:
    """Insertion/deletion protocol (METHOD.md section 4); every choice is logged with the result."""

    steps: int = field(default=100, metadata={"min": 1})
    baseline: str = field(default="zero", metadata=_choices("zero", "blur", "mean"))
    score: str = field(default="softmax", metadata=_choices("softmax", "logit"))
    quantize_levels: list[int] = field(default_factory=lambda: [0, 8])  # 0 = no quantization
    max_images: int | None = field(default=None, metadata={"min": 1})


@dataclass
class MlflowParams:
    """Tracking location (absolute URIs are resolved by the tracking module)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "lrp-at-scale"
    artifact_location: str | None = None
    log_models: bool = True


_AUTO = {"also": ["auto"]}  # the value "auto" besides the field's type


@dataclass
class RuntimeParams:
    """Execution settings that do not change results beyond float tolerance (except `subset`).

    Only ``subset`` and ``batch_size`` (metric batches) are DVC stage params; the rest (device,
    workers, TF32, memory format, the optimized inference copy, task runner, cluster) decide where
    and how fast, not what.
    """

    device: str = "cpu"  # cpu | cuda | cuda:N | mps | auto
    batch_size: int | str = field(default=64, metadata={"min": 1, **_AUTO})  # int | auto
    num_workers: int = field(default=0, metadata={"min": 0})
    subset: int | None = field(default=None, metadata={"min": 1})
    channels_last: bool | str = field(default="auto", metadata=_AUTO)  # auto: CUDA convnets
    tf32: bool = True  # TF32 matmuls/convolutions on CUDA (relevance stays float32)
    optimize_inference: bool | str = field(default="auto", metadata=_AUTO)  # auto: CPU metrics
    task_runner: str = field(default="local", metadata=_choices("local", "dask"))
    dask_address: str | None = None  # existing scheduler, e.g. tcp://host:8786; None: local
    dask_workers: int = field(default=2, metadata={"min": 1})  # size of the local cluster
    dask_gpu_per_task: bool | str = field(default="auto", metadata=_AUTO)  # Dask resource GPU=1


@dataclass
class Params:
    """All pipeline parameters; build with :func:`load_params` or :meth:`from_dict`."""

    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    explain: ExplainParams = field(default_factory=ExplainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "params") -> Params:
        """Validate a nested mapping (missing keys take defaults); raise :class:`ParamsError`."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ParamsError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ParamsError(
                f"{source}: unknown section {unknown[0]!r}; expected one of {sorted(sections)}"
            )
        built = {}
        for name, f in sections.items():
            section_cls = f.default_factory  # type: ignore[misc]
            built[name] = _build_section(section_cls, raw.get(name), f"{source}: {name}")
        params = cls(**built)
        _check_cross_fields(params, source)
        return params

    def train_for(self, architecture: str) -> TrainParams:
        """The training settings of one architecture: ``train`` with its ``per_model`` entry."""
        base = {k: v for k, v in dataclasses.asdict(self.train).items() if k != "per_model"}
        override = self.train.per_model.get(architecture) or {}
        return _build_section(TrainParams, {**base, **override}, f"train.per_model.{architecture}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, str | int | float | bool | None]:
        """``{"train.lr": 0.02, "model.architectures": "small_resnet,lrn_cnn"}`` for logging."""
        flat: dict[str, str | int | float | bool | None] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                if isinstance(value, list):
                    value = ",".join(str(v) for v in value)
                elif isinstance(value, dict):
                    value = json.dumps(value, sort_keys=True)
                flat[f"{section}.{key}"] = value
        return flat


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; errors name the file and the key path."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: invalid YAML: {exc}") from exc
    return Params.from_dict(raw, source=str(path))


def _build_section(section_cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return section_cls()
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{where}.{unknown[0]}: unknown key; expected one of {sorted(fields)}")
    hints = typing.get_type_hints(section_cls)
    values = {}
    for key, value in raw.items():
        f = fields[key]
        values[key] = _check_value(value, hints[key], dict(f.metadata), f"{where}.{key}")
    return section_cls(**values)


def _check_value(value: Any, hint: Any, meta: dict[str, Any], where: str) -> Any:
    optional, base = _unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ParamsError(f"{where}: must not be null")
    also = meta.get("also", [])
    if isinstance(value, str) and value in also:
        return value
    try:
        value = _coerce(value, base, where)
    except ParamsError as exc:
        if also:
            raise ParamsError(f"{exc} (or one of {also})") from None
        raise
    choices = meta.get("choices")
    if choices == "architectures":
        for i, name in enumerate(value):
            try:
                models.check_name(name)
            except models.ModelError as exc:
                raise ParamsError(f"{where}[{i}]: {exc}") from None
        choices = None
    if choices == "composites":
        choices = lrp.composites.names()
    if choices is not None and value not in choices:
        raise ParamsError(f"{where}: {value!r} is not one of {choices}")
    if "min" in meta and value < meta["min"]:
        raise ParamsError(f"{where}: {value!r} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ParamsError(f"{where}: {value!r} is above the maximum {meta['max']}")
    return value


def _unwrap_optional(hint: Any) -> tuple[bool, Any]:
    """(accepts None, the type checked): ``int | None`` -> (True, int); ``int | str`` -> (False,
    int), the ``str`` alternative being the field's ``also`` values."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        all_args = typing.get_args(hint)
        args = [a for a in all_args if a is not type(None)]
        return len(args) < len(all_args), args[0]
    return False, hint


def _coerce(value: Any, base: Any, where: str) -> Any:
    origin = typing.get_origin(base)
    if origin is list:
        (item_type,) = typing.get_args(base)
        if not isinstance(value, list):
            raise ParamsError(f"{where}: must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if base is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: must be a mapping, got {value!r}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: must be an integer, got {value!r}")
        return value
    if base is float:
        # PyYAML reads "1e-3" (no dot) as a string; accept it rather than surprise the user.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{where}: must be a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: must be a string, got {value!r}")
        return value
    raise ParamsError(f"{where}: unsupported type {base!r}")  # pragma: no cover


def _check_cross_fields(params: Params, source: str) -> None:
    d = params.data
    if d.val_fraction + d.test_fraction >= 1.0:
        raise ParamsError(
            f"{source}: data.val_fraction + data.test_fraction must be < 1, got "
            f"{d.val_fraction} + {d.test_fraction}"
        )
    if not params.model.architectures:
        raise ParamsError(f"{source}: model.architectures: must name at least one model")
    for arch, override in params.train.per_model.items():
        where = f"{source}: train.per_model.{arch}"
        if arch not in params.model.architectures:
            raise ParamsError(f"{where}: {arch!r} is not in model.architectures")
        if not isinstance(override, dict) or "per_model" in override:
            raise ParamsError(f"{where}: must be a mapping of train keys")
        params.train_for(arch)  # validates keys and values, naming them
    _check_methods(params, source)
    for i, level in enumerate(params.evaluate.quantize_levels):
        if level < 0 or level == 1:
            raise ParamsError(
                f"{source}: evaluate.quantize_levels[{i}]: {level} must be 0 (off) or >= 2"
            )


def _check_methods(params: Params, source: str) -> None:
    """The engine validates the explain options (no copied lists); errors name the key."""
    e = params.explain
    defaults = {k: getattr(e, k) for k in ENGINE_KEYS}
    _check_engine(e.composite, defaults, f"{source}: explain")
    labels = {e.composite}
    for i, spec in enumerate(e.compare):
        where = f"{source}: explain.compare[{i}]"
        try:
            method = parse_method(spec)
        except MethodError as exc:
            raise ParamsError(f"{where}: {exc}") from None
        if method.composite:
            _check_engine(method.name, {**defaults, **method.options}, where)
        if method.label in labels:
            raise ParamsError(f"{where}: {spec!r} is listed twice")
        labels.add(method.label)


def _check_engine(composite: str, options: dict[str, Any], where: str) -> None:
    try:
        lrp.Explainer(torch.nn.Identity(), composite=composite, **options)
    except (lrp.LRPError, ValueError, TypeError) as exc:
        raise ParamsError(f"{where}: {exc}") from None
