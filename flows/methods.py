"""Which attribution methods a run compares, and one call shape for all of them.

The one place that decides whether a name is an LRP composite (``lrp.composites.names()``) or a
baseline (``lrp.baselines.BASELINES``, ``ATTENTION_BASELINES``), parses method specs such as ``otsuki2024:residual=gradient``
and adapts both kinds to ``(x, target) -> dict(relevance, logits, target, initial, conservation)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lrp
from lrp import baselines

Attributor = Callable[[torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]]

# Engine options a composite takes from params.explain (a spec's own options override them).
ENGINE_KEYS = ("output", "residual", "lrn", "epsilon", "gamma")


class MethodError(ValueError):
    """A method name or spec the engine does not offer (the valid names are listed)."""


def composite_names() -> list[str]:
    return list(lrp.composites.names())


def baseline_names() -> list[str]:
    return [*baselines.BASELINES, *baselines.ATTENTION_BASELINES]


def is_composite(name: str) -> bool:
    """True for an engine composite, False for a baseline; MethodError for anything else."""
    if name in composite_names():
        return True
    if name in baseline_names():
        return False
    raise MethodError(
        f"unknown method {name!r}: composites {composite_names()}, baselines {baseline_names()}"
    )


@dataclass(frozen=True)
class Method:
    """One compared method: ``name`` plus its own options; ``label`` names its files and metrics."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def composite(self) -> bool:
        return is_composite(self.name)

    @property
    def label(self) -> str:
        """``otsuki2024`` or ``otsuki2024_residual-gradient``: safe in paths, DVC and MLflow names."""
        extra = "".join(f"_{k}-{v}" for k, v in sorted(self.options.items()))
        return self.name + extra

    @property
    def spec(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name}:{opts}" if opts else self.name


def parse_method(spec: str) -> Method:
    """``"name"`` or ``"name:key=value,key=value"`` (values read as int, float, bool or str)."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise MethodError(f"method spec {spec!r}: option {item!r} is not key=value")
        options[key.strip()] = _parse_value(value.strip())
    method = Method(name.strip(), options)
    method.composite  # noqa: B018 - raises MethodError for an unknown name
    return method


def _parse_value(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def make_attributor(
    model: nn.Module, method: Method, engine_options: dict[str, Any], *, validate: bool = True
) -> Attributor:
    """The method as ``(x, target or None) -> dict(relevance, logits, target, initial, conservation)``.

    Composites run ``lrp.Explainer`` with ``engine_options`` (conservation from
    ``lrp.conservation``); baselines run ``lrp.baselines`` with the spec's options and have no
    conservation (NaN). ``validate=False`` skips the engine's per-call value checks, each of which
    waits for the device: the dataset loop checks in bulk.
    """
    if method.composite:
        explainer = lrp.Explainer(model, composite=method.name, **engine_options)

        def run_lrp(x: torch.Tensor, target: torch.Tensor | None) -> dict[str, torch.Tensor]:
            e = explainer(x, target=target, validate=validate)
            return {
                "relevance": e.relevance, "logits": e.logits, "target": e.target,
                "initial": e.initial, "conservation": lrp.conservation(e),
            }

        return run_lrp
    attribute = baselines.make_attributor(model, method.name, **engine_options)

    def run_baseline(x: torch.Tensor, target: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logits = model(x)
        chosen = logits.argmax(1) if target is None else target
        nan = torch.full((len(x),), float("nan"))
        return {
            "relevance": attribute(x, chosen), "logits": logits, "target": chosen,
            "initial": nan, "conservation": nan,
        }

    return run_baseline
