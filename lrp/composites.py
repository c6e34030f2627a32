"""Composites: which rule each layer gets.

Names follow Kohlbrenner et al. 2020 and Zennit. "conv" means Conv1d/2d/3d, "dense" means Linear;
the first layer is the first Linear/Conv module in the model's registration order.
``otsuki2024`` is the published configuration of Otsuki et al. 2024 (see METHOD.md section 3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import InvalidInputError
from .ops import CONV_TRANSPOSE_TYPES
from .rules.base import Pass, Rule
from .rules.linear import (
    LRP0,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    ZBox,
    ZPlus,
    ZPlusOnes,
)
from .rules.pooling import Proportional

# transposed convolutions take the convolutions' rules (as in Zennit's Convolution type)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *CONV_TRANSPOSE_TYPES)
DENSE_TYPES = (nn.Linear,)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Composite:
    """A layer-to-rule map.

    ``rules`` maps a module path (exact string) or a module type to a rule; paths win over types,
    ``first`` (if set) applies to the first Linear/Conv layer unless its path is mapped explicitly.
    ``fold_batchnorm`` folds BatchNorm into the preceding layer; ``output`` is the composite's
    preferred initial relevance (``None``: the explainer's default). ``stem_pool`` (if set) is
    the rule of the stem's max-pool: the first max-pool, when no residual merge precedes it.
    ``options`` are the option values the composite was built with; the engine's default rules
    (pools, norms, biases of graph operations) take theirs from it. ``fixed_options`` are the
    values the composite itself imposes on those defaults (``lrp-0``: epsilon 0 everywhere;
    ``otsuki2024``: biases out of every denominator, as the paper drops the fc bias).
    """

    name: str
    rules: Mapping[str | type, Rule] = field(default_factory=dict)
    first: Rule | None = None
    fold_batchnorm: bool = True
    output: str | None = None
    stem_pool: Rule | None = None
    options: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIONS))
    fixed_options: dict[str, Any] = field(default_factory=dict)

    def rule_for(self, path: str, module: nn.Module, is_first: bool) -> Rule | None:
        if path in self.rules:
            return self.rules[path]
        if is_first and self.first is not None:
            return self.first
        for key, rule in self.rules.items():
            if not isinstance(key, str) and isinstance(module, key):
                return rule
        return None


def _linear_map(conv: Rule, dense: Rule) -> dict[str | type, Rule]:
    return {CONV_TYPES: conv, DENSE_TYPES: dense}  # type: ignore[dict-item]


def _bounds(options: dict[str, Any]) -> tuple[Any, Any]:
    bounds = options.get("input_bounds")
    if bounds is None:
        raise InvalidInputError(
            "composite 'epsilon-gamma-box' needs input_bounds=(low, high): the lowest and highest "
            "input values after normalisation (scalars or per-channel tensors)"
        )
    low, high = bounds
    return low, high


def _lrp0(o: dict[str, Any]) -> LRP0:
    return LRP0(o["zero_bias"], empty=o["empty"])


def _eps(o: dict[str, Any]) -> Epsilon:
    return Epsilon(o["epsilon"], zero_bias=o["zero_bias"], empty=o["empty"])


def _epsilon_plus(o: dict[str, Any]) -> Composite:
    zplus = ZPlus(
        o["stabilizer"], zero_bias=o["zero_bias"], empty=o["empty"],
        stabilizer_share=o["stabilizer_share"],
    )
    return Composite("epsilon-plus", _linear_map(zplus, _eps(o)))


def _flat(o: dict[str, Any]) -> Flat:
    return Flat(o["stabilizer"], stabilizer_share=o["stabilizer_share"])


def _epsilon_plus_flat(o: dict[str, Any]) -> Composite:
    c = _epsilon_plus(o)
    return Composite("epsilon-plus-flat", c.rules, first=_flat(o))


def _epsilon_gamma_box(o: dict[str, Any]) -> Composite:
    low, high = _bounds(o)
    return Composite(
        "epsilon-gamma-box",
        _linear_map(Gamma(o["gamma"], o["stabilizer"], zero_bias=o["zero_bias"]), _eps(o)),
        first=ZBox(low, high, o["stabilizer"]),
    )


def _epsilon_alpha2_beta1(o: dict[str, Any]) -> Composite:
    ab = AlphaBeta(2.0, 1.0, o["stabilizer"], empty=o["empty"],
                   stabilizer_share=o["stabilizer_share"], zero_bias=o["zero_bias"])
    return Composite("epsilon-alpha2-beta1", _linear_map(ab, _eps(o)))


def _epsilon_alpha2_beta1_flat(o: dict[str, Any]) -> Composite:
    c = _epsilon_alpha2_beta1(o)
    return Composite("epsilon-alpha2-beta1-flat", c.rules, first=_flat(o))


def _otsuki2024(o: dict[str, Any]) -> Composite:
    eps = o.get("otsuki_epsilon", 1e-5)
    share = o["stabilizer_share"]  # "flat" unless given: see COMPOSITE_DEFAULTS
    zplus = ZPlus(stabilizer=eps, zero_bias=True, empty=o["empty"], stabilizer_share=share)
    rules: dict[str | type, Rule] = {
        CONV_TYPES: zplus,  # type: ignore[dict-item]
        DENSE_TYPES: zplus,  # type: ignore[dict-item]
        BATCHNORM_TYPES: Pass(),  # type: ignore[dict-item]
        nn.ReLU: Pass(),
    }
    # the stem's max-pool propagates as a 2x2 average pool; windows summing to exactly 0 share
    # uniformly (empty="flat"), so no stabiliser is needed
    stem = Proportional(stabilizer=0.0, through=nn.AvgPool2d(2, 2, ceil_mode=True), empty="flat")
    return Composite(
        "otsuki2024",
        rules,
        first=ZPlusOnes(eps, stabilizer_share=share),
        fold_batchnorm=False,
        output="probability",
        stem_pool=stem,
        fixed_options={"zero_bias": True},  # LayerNorm/GroupNorm, stand-alone BN, constant adds
    )


def _epsilon_transformer(o: dict[str, Any]) -> Composite:
    """Transformers: epsilon on every Linear and the patch embedding; LayerNorm, attention (the
    explainer's ``attention=``), GELU, embeddings and merges get the engine's graph rules."""
    return Composite("epsilon-transformer", _linear_map(_eps(o), _eps(o)))


_FACTORIES: dict[str, Callable[[dict[str, Any]], Composite]] = {
    "lrp-0": lambda o: Composite(
        "lrp-0", _linear_map(_lrp0(o), _lrp0(o)), fixed_options={"epsilon": 0.0}
    ),
    "epsilon": lambda o: Composite("epsilon", _linear_map(_eps(o), _eps(o))),
    "epsilon-plus": _epsilon_plus,
    "epsilon-plus-flat": _epsilon_plus_flat,
    "epsilon-gamma-box": _epsilon_gamma_box,
    "epsilon-alpha2-beta1": _epsilon_alpha2_beta1,
    "epsilon-alpha2-beta1-flat": _epsilon_alpha2_beta1_flat,
    "otsuki2024": _otsuki2024,
    "epsilon-transformer": _epsilon_transformer,
}

DEFAULT_OPTIONS: dict[str, Any] = {
    "epsilon": 1e-6,
    "stabilizer": 1e-6,
    "gamma": 0.25,
    "zero_bias": False,
    "empty": "flat",
    "stabilizer_share": "absorb",
}
# Defaults a composite sets differently (a user's option still wins): otsuki2024 is the preset
# whose point is conservation; its published eps 1e-5 absorbs up to 2 % of the relevance at
# depthwise convolutions with few taps unless its share is spread (docs/ENGINE_API.md).
COMPOSITE_DEFAULTS: dict[str, dict[str, Any]] = {"otsuki2024": {"stabilizer_share": "flat"}}
OPTION_NAMES = frozenset({*DEFAULT_OPTIONS, "input_bounds", "otsuki_epsilon"})


def names() -> list[str]:
    """The available composite names."""
    return list(_FACTORIES)


def get(name: str, **options: Any) -> Composite:
    """Build a named composite.

    ``options``: epsilon (epsilon rule), stabilizer (other rules), gamma, input_bounds (z^B),
    zero_bias (leave biases out of epsilon/LRP-0/z+ denominators: biases absorb relevance, so
    only bias-free propagation is conservative), otsuki_epsilon (the otsuki2024 preset's 1e-5),
    empty ("flat": an output with no contribution to divide by shares its relevance uniformly
    over its receptive field; "drop": the plain rules, which lose it), stabilizer_share
    ("absorb": the plain rules, a stabiliser keeps its share eps / (z + eps) of each output's
    relevance; "flat": z+, alpha-beta's positive term, flat, w^2, z+ with ones and the pool rules
    spread that share uniformly instead, so z+ conserves exactly; default "flat" for otsuki2024,
    "absorb" elsewhere).
    """
    if name not in _FACTORIES:
        raise InvalidInputError(f"composite={name!r} is not one of {names()}")
    merged = _merged({**COMPOSITE_DEFAULTS.get(name, {}), **options})
    composite = _FACTORIES[name](merged)
    composite.options = {**merged, **composite.fixed_options}
    return composite


def _merged(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - OPTION_NAMES
    if unknown:
        raise InvalidInputError(
            f"unknown composite option(s) {sorted(unknown)}; valid: {sorted(OPTION_NAMES)}"
        )
    return {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None}}


def resolve(composite: str | Composite | Mapping[str | type, Rule], **options: Any) -> Composite:
    """Accept a name, a Composite, or a plain {path | type: rule} map."""
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, str):
        return get(composite, **options)
    if isinstance(composite, Mapping):
        return Composite("custom", dict(composite), options=_merged(options))
    raise InvalidInputError(
        f"composite must be a name, a lrp.Composite or a dict, got {type(composite).__name__}"
    )
