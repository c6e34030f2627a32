"""The Explainer: a prepared copy of the model whose gradient is the LRP relevance."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import composites as composites_mod
from .canonizers import (
    BATCHNORM_TYPES,
    FOLD_ATTRIBUTE,
    LINEAR_TYPES,
    ResidualBlock,
    disable_inplace,
    fold_batchnorms,
    is_ordered_container,
    is_plain_sequential,
    materialize_folded_batchnorm,
    replace_residual_blocks,
    verify_container,
)
from .errors import InvalidInputError, UnsupportedLayerError
from .layers import LinearRuleLayer, ModuleRuleLayer
from .rules.base import ModuleRule, Pass, Rule
from .rules.linear import LinearRule
from .rules.pooling import Proportional
from .rules.residual import ResidualMerge, resolve_mode

# Modules whose ordinary gradient already is the LRP rule (relevance-as-gradient convention):
# max-pools are winner-take-all, the rest are reshapes or identities.
GRADIENT_TYPES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)
# Element-wise activations: relevance passes unchanged (METHOD.md section 1; Zennit does the same).
PASS_TYPES = (
    nn.ReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.PReLU,
    nn.SELU,
    nn.CELU,
    nn.RReLU,
)
POOL_TYPES = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
# Activations whose output is never negative, used to prove a layer's input is >= 0.
NONNEG_TYPES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, nn.Softmax)
SIGN_PRESERVING_TYPES = (*POOL_TYPES, *GRADIENT_TYPES, nn.LocalResponseNorm)

OUTPUTS = ("logit", "probability")


@dataclass
class Explanation:
    """Result of one explainer call; every tensor is detached and on the model's device."""

    relevance: Tensor
    logits: Tensor
    target: Tensor
    initial: Tensor
    layer_relevance: dict[str, Tensor] | None = field(default=None, repr=False)

    @property
    def conservation_error(self) -> Tensor:
        return conservation(self)


def conservation(explanation: Explanation) -> Tensor:
    """Per sample, ``|sum(relevance) - initial| / |initial|`` (0 where the initial relevance is 0)."""
    total = explanation.relevance.flatten(1).sum(1)
    initial = explanation.initial
    gap = (total - initial).abs()
    return torch.where(initial == 0, gap, gap / initial.abs())


class Explainer:
    """Explain a classifier with LRP.

    The user's model is never modified: a private copy is made once (eval mode, frozen parameters,
    BatchNorm folded, residual merges made explicit, rule layers swapped in) and reused; it is
    rebuilt when the model's parameters or buffers are replaced, moved or changed in place
    (optimizer steps, ``load_state_dict``). Edits through ``tensor.data`` bypass PyTorch's version
    counters and are not seen: call :meth:`refresh` after them.

    The copy shares the user's weight tensors and applies folded BatchNorm scales per channel, so
    it holds no second set of weights. Modified weights a rule needs (W+, W-, ...) are made per
    pass from the current weights and dropped; ``cache_weights=True`` keeps them between calls
    (saves a few elementwise passes over the weights per call, costs one extra set in memory).
    """

    def __init__(
        self,
        model: nn.Module,
        composite: str | composites_mod.Composite | Mapping[str | type, Rule] = "epsilon-plus-flat",
        *,
        output: str | None = None,
        residual: str = "splitting",
        lrn: str | Rule = "taylor",
        lrn_epsilon: float | None = None,
        cache_weights: bool = False,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.composite = composites_mod.resolve(composite, **options)
        self.output = output or self.composite.output or "logit"
        if self.output not in OUTPUTS:
            raise InvalidInputError(f"output={self.output!r} is not one of {list(OUTPUTS)}")
        self.residual = resolve_mode(residual)
        self.lrn_rule = _lrn_rule(lrn, lrn_epsilon)
        self.cache_weights = bool(cache_weights)
        self.model = model
        self._fingerprint: tuple | None = None
        self._prepared: nn.Module | None = None
        self.rules: dict[str, Rule] = {}
        self.first_layer: str | None = None

    # ------------------------------------------------------------------ preparation
    def _model_fingerprint(self) -> tuple:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def prepared_model(self) -> nn.Module:
        """The prepared copy (rebuilt if the user's model changed since the last call)."""
        fingerprint = self._model_fingerprint()
        if self._prepared is None or fingerprint != self._fingerprint:
            self._prepared = self._prepare()
            self._fingerprint = fingerprint
        return self._prepared

    def refresh(self) -> None:
        """Rebuild the prepared copy on the next call (after edits autograd cannot see)."""
        self._prepared = None

    def _prepare(self) -> nn.Module:
        if self.model.training:
            warnings.warn(
                f"{type(self.model).__name__} is in training mode; LRP explains its eval-mode "
                "behaviour (dropout off, BatchNorm running statistics) on a private copy",
                stacklevel=3,
            )
        # the copy shares the user's parameter and buffer tensors (read-only here: folding and the
        # rules make new tensors), so preparing costs no second set of weights
        shared = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        model = copy.deepcopy(self.model, shared).eval()
        disable_inplace(model)
        replace_residual_blocks(model, self.residual)
        if self.composite.fold_batchnorm:
            fold_batchnorms(model, materialize=False)  # rule layers apply the BN scale
        self.rules = {}
        self.first_layer = next(
            (name for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)), None
        )
        if self.first_layer is None:
            raise UnsupportedLayerError(
                f"{type(self.model).__name__} has no Linear or Conv layer to explain"
            )
        if not any(True for _ in model.children()):
            model = self._wrap_leaf("", model)
        else:
            self._wrap_children(model, "")
        _mark_nonnegative_inputs(model, input_nonnegative=False)
        _mark_inplace_relus(model)
        return model

    def _wrap_children(self, parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if any(True for _ in child.children()) and not isinstance(child, ResidualMerge):
                if not (isinstance(child, ResidualBlock) or is_ordered_container(child)):
                    verify_container(path, child)
                self._wrap_children(child, path + ".")
            else:
                wrapped = self._wrap_leaf(path, child)
                if wrapped is not child:
                    setattr(parent, name, wrapped)

    def _wrap_leaf(self, path: str, module: nn.Module) -> nn.Module:
        rule = self.composite.rule_for(path, module, is_first=path == self.first_layer)
        if rule is None:
            rule = self._default_rule(path, module)
        fold = module.__dict__.get(FOLD_ATTRIBUTE)
        if fold is not None and not isinstance(rule, LinearRule):
            materialize_folded_batchnorm(module)  # the module runs its own forward
        if rule is None:
            return module
        self.rules[path] = rule
        if isinstance(rule, LinearRule):
            if not isinstance(module, LINEAR_TYPES):
                raise UnsupportedLayerError(
                    f"{rule!r} needs a Linear/Conv layer, but '{path}' is {type(module).__name__}"
                )
            scale, bias = fold if fold is not None else (None, None)
            return LinearRuleLayer(
                module, rule, path, scale=scale, bias=bias, cache_weights=self.cache_weights
            )
        if isinstance(rule, ModuleRule):
            return ModuleRuleLayer(module, rule, path)
        raise InvalidInputError(f"rule for '{path}' must be a lrp.rules rule, got {rule!r}")

    def _default_rule(self, path: str, module: nn.Module) -> Rule | None:
        if isinstance(module, (ResidualMerge, *GRADIENT_TYPES)):
            return None
        if isinstance(module, PASS_TYPES):
            return Pass()
        if isinstance(module, POOL_TYPES):
            return Proportional(composites_mod.DEFAULT_OPTIONS["stabilizer"])
        if isinstance(module, nn.LocalResponseNorm):
            return self.lrn_rule
        where = f"{type(module).__name__} at '{path or '<root>'}'"
        if isinstance(module, LINEAR_TYPES):
            raise UnsupportedLayerError(
                f"composite '{self.composite.name}' assigns no rule to {where}"
            )
        if isinstance(module, BATCHNORM_TYPES):
            raise UnsupportedLayerError(
                f"{where} does not follow a Linear/Conv layer it could be folded into; map it to a "
                "rule explicitly, e.g. composite={..., '" + path + "': lrp.rules.Pass()}"
            )
        if isinstance(module, nn.Softmax | nn.LogSoftmax):
            raise UnsupportedLayerError(
                f"{where}: explain the logits; remove the final softmax (use output='probability')"
            )
        raise UnsupportedLayerError(
            f"no LRP rule for {where}; supported: Linear/Conv, BatchNorm after them, pooling, "
            "element-wise activations, LocalResponseNorm, Flatten/Dropout, torchvision residual "
            "blocks. Map it to a rule explicitly via composite={path: rule}."
        )

    # ------------------------------------------------------------------ explaining
    @property
    def device(self) -> torch.device:
        t = next(self.model.parameters(), None)
        return t.device if t is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        t = next(self.model.parameters(), None)
        return t.dtype if t is not None else torch.get_default_dtype()

    def __call__(
        self,
        x: Tensor,
        target: int | Tensor | None = None,
        *,
        output_relevance: Tensor | None = None,
        record_layers: bool = False,
        validate: bool = True,
    ) -> Explanation:
        """Explain ``x`` for ``target`` (None: the predicted class).

        ``output_relevance`` (N, K) replaces the one-hot initial relevance. ``record_layers`` fills
        ``layer_relevance`` with the per-sample relevance sum at every module's output.
        ``validate=False`` skips the value checks (NaN/Inf in ``x``, logits and relevance, target
        range), each of which waits for the device: for dataset loops on a GPU that check the
        results in bulk (shapes and dtypes are still checked).
        """
        if torch.is_inference_mode_enabled():
            raise InvalidInputError(
                "LRP needs autograd: call the explainer outside torch.inference_mode()"
            )
        model = self.prepared_model()
        x = self._check_input(x, validate)
        records: dict[str, Tensor] = {}
        handles = _record_hooks(model, records) if record_layers else []
        try:
            with torch.enable_grad():
                x = x.requires_grad_(True)
                logits = model(x)
                _check_logits(logits, x.shape[0], validate)
                target_t = _resolve_target(target, logits, validate)
                initial_map = self._initial_relevance(logits.detach(), target_t, output_relevance)
                (relevance,) = torch.autograd.grad(logits, x, initial_map)
        finally:
            for h in handles:
                h.remove()
        bad = ~torch.isfinite(relevance).flatten(1).all(1) if validate else None
        if bad is not None and bad.any():
            warnings.warn(
                f"relevance is NaN/Inf for samples {bad.nonzero().flatten().tolist()}", stacklevel=2
            )
        return Explanation(
            relevance=relevance.detach(),
            logits=logits.detach(),
            target=target_t,
            initial=initial_map.sum(1),
            layer_relevance=records or None,
        )

    def _check_input(self, x: Tensor, validate: bool = True) -> Tensor:
        if not isinstance(x, Tensor):
            raise InvalidInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InvalidInputError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        first = self.model.get_submodule(self.first_layer) if self.first_layer else None
        expected = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}.get(type(first))
        if expected is not None and x.ndim != expected:
            raise InvalidInputError(
                f"x must have {expected} dimensions (N, C, ...) for a model starting with "
                f"{type(first).__name__}, got shape {tuple(x.shape)}"
            )
        if x.ndim < 2 or x.shape[0] == 0:
            raise InvalidInputError(
                f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}"
            )
        x = x.detach().to(device=self.device, dtype=self.dtype, non_blocking=True).clone()
        if validate and not torch.isfinite(x).all():
            raise InvalidInputError("x contains NaN or Inf values")
        return x

    def _initial_relevance(
        self, logits: Tensor, target: Tensor, output_relevance: Tensor | None
    ) -> Tensor:
        if output_relevance is not None:
            if output_relevance.shape != logits.shape:
                raise InvalidInputError(
                    f"output_relevance must have the logits' shape {tuple(logits.shape)}, "
                    f"got {tuple(output_relevance.shape)}"
                )
            return output_relevance.to(logits)
        if self.output == "probability":
            wide = torch.promote_types(logits.dtype, torch.float32)  # no fp16/bf16 softmax
            values = torch.softmax(logits.to(wide), dim=1).to(logits.dtype)
        else:
            values = logits
        initial = torch.zeros_like(logits)
        index = target.view(-1, 1)
        return initial.scatter_(1, index, values.gather(1, index))


def _lrn_rule(lrn: str | Rule, epsilon: float | None) -> Rule:
    if isinstance(lrn, Rule):
        return lrn
    from .rules import lrn as lrn_rules

    if lrn == "taylor":
        return lrn_rules.LRNTaylor() if epsilon is None else lrn_rules.LRNTaylor(epsilon=epsilon)
    if lrn == "identity":
        return lrn_rules.LRNIdentity()
    raise InvalidInputError(f"lrn={lrn!r} is not one of ['taylor', 'identity'] or a lrp.rules rule")


def _check_logits(logits: Tensor, n: int, validate: bool = True) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise InvalidInputError(
            f"model output must be logits of shape (N, num_classes), got {shape}"
        )
    if validate and not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits).all(1)).nonzero().flatten().tolist()
        raise InvalidInputError(f"model output (logits) contains NaN/Inf for samples {bad}")


def _resolve_target(target: int | Tensor | None, logits: Tensor, validate: bool = True) -> Tensor:
    n, k = logits.shape
    if target is None:
        return logits.argmax(1)
    if isinstance(target, bool) or not isinstance(target, int | Tensor):
        raise InvalidInputError(
            f"target must be None, an int or a LongTensor, got {type(target).__name__}"
        )
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point() or t.is_complex():
        raise InvalidInputError(f"target must hold integer class indices, got dtype {t.dtype}")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise InvalidInputError(
            f"target must be a scalar or have shape ({n},), got {tuple(t.shape)}"
        )
    if validate and ((t < 0) | (t >= k)).any():
        raise InvalidInputError(f"target {t.tolist()} out of range for {k} classes")
    return t.contiguous()


def _record_hooks(model: nn.Module, records: dict[str, Tensor]) -> list[Any]:
    def make(path: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.requires_grad:
                out.register_hook(lambda g: records.__setitem__(path, g.detach().flatten(1).sum(1)))

        return hook

    handles = []
    for name, module in model.named_modules():
        # skip the modules inside rule layers: rules may call them again during the backward pass
        if name and not name.endswith(".module") and not isinstance(module, ResidualMerge):
            handles.append(module.register_forward_hook(make(name)))
    return handles


def _mark_nonnegative_inputs(module: nn.Module, input_nonnegative: bool) -> bool:
    """Propagate 'provably >= 0' through structures whose data flow is known; return the output's."""
    if isinstance(module, LinearRuleLayer):
        module.input_nonnegative = input_nonnegative
        return False
    if isinstance(module, ModuleRuleLayer):
        module = module.module
    if isinstance(module, NONNEG_TYPES):
        return True
    if isinstance(module, SIGN_PRESERVING_TYPES):
        return input_nonnegative
    if isinstance(module, ResidualBlock):
        for i in range(1, module.depth + 1):
            _mark_nonnegative_inputs(
                getattr(module, f"conv{i}"), input_nonnegative if i == 1 else True
            )
        if module.downsample is not None:
            _mark_nonnegative_inputs(module.downsample, input_nonnegative)
        module.merge.skip_nonnegative = input_nonnegative and module.downsample is None
        return True
    if is_ordered_container(module):
        state = input_nonnegative
        for child in module.children():
            state = _mark_nonnegative_inputs(child, state)
        return state
    for child in module.modules():
        if isinstance(child, LinearRuleLayer):
            child.input_nonnegative = False
    return False


def _is_private_output(module: nn.Module) -> bool:
    """Whether the module's output tensor is new and kept by no autograd node of the engine."""
    if isinstance(module, LinearRuleLayer | ResidualMerge):
        return True  # their Functions save inputs and ratios, never their outputs
    return isinstance(module, ModuleRuleLayer) and type(module.rule) is Pass


def _mark_inplace_relus(model: nn.Module) -> None:
    """Let Pass-ReLUs overwrite their input where only they read it, saving one activation copy.

    In a plain Sequential a child's output reaches only the next child; in a ResidualBlock every
    ReLU reads a (folded) conv, a pass-through BatchNorm or the merge. Anything else stays
    out of place.
    """
    def is_relu(m: nn.Module) -> bool:
        return isinstance(m, ModuleRuleLayer) and type(m.rule) is Pass and type(m.module) is nn.ReLU

    for module in model.modules():
        if isinstance(module, ResidualBlock) and is_relu(module.relu):
            producers = [getattr(module, f"bn{i}") for i in range(1, module.depth + 1)]
            convs = [getattr(module, f"conv{i}") for i in range(1, module.depth + 1)]
            if all(
                _is_private_output(b) or (isinstance(b, nn.Identity) and _is_private_output(c))
                for b, c in zip(producers, convs, strict=True)
            ):
                module.relu.inplace = True
        elif is_plain_sequential(module):
            children = list(module.children())
            for prev, child in itertools.pairwise(children):
                if is_relu(child) and _is_private_output(prev):
                    child.inplace = True
