"""The Explainer: a prepared copy of the model whose gradient is the LRP relevance."""

from __future__ import annotations

import copy
import difflib
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import composites as composites_mod
from .canonizers import disable_inplace
from .errors import InvalidInputError
from .graph import GraphSettings, LayerRecords, collecting, prepare, recording
from .metrics.conservation import conservation_error
from .rules import lrn as lrn_rules
from .rules.attention import MODES as ATTENTION_MODES
from .rules.base import Rule
from .rules.residual import resolve_mode
from .tracing import TraceFailure

OUTPUTS = ("logit", "probability")


@dataclass
class Explanation:
    """Result of one explainer call; every tensor is detached and on the model's device."""

    relevance: Tensor
    logits: Tensor
    target: Tensor
    initial: Tensor
    layer_relevance: dict[str, Tensor] | None = field(default=None, repr=False)
    #: the relevance tensor at the output of each module named in ``layer_maps=`` (the
    #: relevance its consumers pass back to it, shaped like that output)
    layer_maps: dict[str, Tensor] | None = field(default=None, repr=False)
    #: (N,) relevance absorbed by constant tensors concatenated into the input-dependent ones
    #: (ViT's class token, register/distillation tokens): it leaves the propagation there, like
    #: a bias's share, and is not in ``relevance``. Zeros when the model has none; None when a
    #: token could not be assigned to samples (a warning says which). Bias shares not included.
    absorbed: Tensor | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The module that computes ``model``'s function, under the wrappers users apply for speed
    or scale: ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``) and ``nn.DataParallel`` /
    ``DistributedDataParallel`` (``module``). Their own forward is compiled code or a scatter
    over devices that torch.fx cannot follow; the wrapped module is the same function."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        # an OptimizedModule exists only once dynamo was imported: no import here
        dynamo = sys.modules.get("torch._dynamo.eval_frame")
        if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, parallel):
            model = model.module
        else:
            return model


def conservation(explanation: Explanation) -> Tensor:
    """Per sample, ``|sum(relevance) - initial| / |initial|`` (float64; see
    :func:`lrp.metrics.conservation_error`, the one definition the package uses)."""
    return conservation_error(explanation.relevance, explanation.initial)


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
        attention: str = "attnlrp",
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
        if attention not in ATTENTION_MODES:
            raise InvalidInputError(f"attention={attention!r} is not one of {list(ATTENTION_MODES)}")
        self.attention = attention
        self.cache_weights = bool(cache_weights)
        self.model = unwrap(model)
        self._fingerprint: tuple | None = None
        self._prepared: nn.Module | None = None
        # the input shape the prepared copy holds, for a model traced with its shapes known
        self._shape: tuple[int, ...] | None = None
        self.rules: dict[str, Rule] = {}
        self.first_layer: str | None = None
        self._first_module: nn.Module | None = None
        self._input_channels: int | None = None

    # ------------------------------------------------------------------ preparation
    def _model_fingerprint(self) -> tuple:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def prepared_model(self, x: Tensor | None = None) -> nn.Module:
        """The prepared copy (rebuilt if the user's model changed since the last call).

        A forward that torch.fx can only follow with the input's shapes known (Python control
        flow on sizes: timm's VGG head, MobileViT) is traced with ``x`` (the explainer passes
        its input) and the copy is rebuilt for each new input shape; without ``x`` such a model
        raises :class:`lrp.UnresolvedStructureError` until a copy exists.
        """
        fingerprint = self._model_fingerprint()
        new_shape = self._shape is not None and x is not None and tuple(x.shape) != self._shape
        if self._prepared is None or fingerprint != self._fingerprint or new_shape:
            self._prepared = self._prepare(x)
            self._fingerprint = fingerprint
        return self._prepared

    def refresh(self) -> None:
        """Rebuild the prepared copy on the next call (after edits autograd cannot see)."""
        self._prepared = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (and deep-copied) without the prepared copy, which is rebuilt on the next
        call: its graph calls the engine's own functions, which torch.fx's unpickling would
        re-trace, so an explainer that has run could not go to a worker process otherwise."""
        state = self.__dict__.copy()
        state.update(_prepared=None, _fingerprint=None, _first_module=None)
        return state

    def _prepare(self, x: Tensor | None = None) -> nn.Module:
        if self.model.training:
            warnings.warn(
                f"{type(self.model).__name__} is in training mode; LRP explains its eval-mode "
                "behaviour (dropout off, BatchNorm running statistics) on a private copy",
                stacklevel=3,
            )
        # the copy shares the user's parameter and buffer tensors (read-only here: folding and the
        # rules make new tensors), so preparing costs no second set of weights
        shared = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}

        def private_copy() -> nn.Module:
            model = copy.deepcopy(self.model, shared).eval()
            disable_inplace(model)
            return model

        settings = GraphSettings(
            self.composite, self.residual, self.lrn_rule, self.cache_weights, self.attention
        )
        prepared = None
        if self._shape is None:
            try:
                prepared = prepare(private_copy(), settings)
            except TraceFailure as err:
                if x is None:
                    raise TraceFailure(
                        f"{err} (Calling the explainer with an input traces the model with the "
                        "input's shapes known, which follows control flow on sizes.)"
                    ) from err
        if prepared is None:
            if x is None:  # after refresh(): the copy is traced with the next call's input
                raise TraceFailure(
                    f"{type(self.model).__name__}'s forward can only be traced with the input's "
                    "shapes known: call the explainer with an input"
                )
            example = x.detach().to(device=self.device, dtype=self.dtype or x.dtype).clone()
            prepared = prepare(private_copy(), settings, example)
            self._shape = tuple(x.shape)
        self.rules = prepared.rules
        self.first_layer = prepared.first_layer
        self._first_module = prepared.first_module
        self._input_channels = prepared.input_channels
        return prepared.module

    # ------------------------------------------------------------------ explaining
    @property
    def device(self) -> torch.device:
        t = next(self.model.parameters(), None)
        return t.device if t is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype | None:
        """The model's parameter dtype (None for a model without parameters: x keeps its own)."""
        t = next(self.model.parameters(), None)
        return t.dtype if t is not None else None

    def __call__(
        self,
        x: Tensor,
        target: int | Sequence[int] | Tensor | None = None,
        *,
        output_relevance: Tensor | None = None,
        record_layers: bool = False,
        layer_maps: Sequence[str] = (),
        validate: bool = True,
    ) -> Explanation:
        """Explain ``x`` for ``target`` (None: the predicted class; an int, N ints or a LongTensor).

        ``output_relevance`` (N, K) replaces the one-hot initial relevance. ``record_layers`` fills
        ``layer_relevance`` with the per-sample relevance sum at every module's output;
        ``layer_maps`` (module paths) fills ``layer_maps`` with the relevance tensor at each
        one's output (for heatmaps of inner layers; a module the relevance does not reach, such
        as a gate's branch, is left out with a warning).
        ``validate=False`` skips the value checks (NaN/Inf in ``x``, logits and relevance, target
        range), each of which waits for the device: for dataset loops on a GPU that check the
        results in bulk (shapes and dtypes are still checked).
        """
        if torch.is_inference_mode_enabled():
            raise InvalidInputError(
                "LRP needs autograd: call the explainer outside torch.inference_mode()"
            )
        if not isinstance(x, Tensor) or not x.is_floating_point():
            self._check_input(x, validate)  # raises
        keep = self._check_layer_paths(layer_maps)
        model = self.prepared_model(x)
        x = self._check_input(x, validate)
        records = LayerRecords({} if record_layers else None, keep)
        taps: list[tuple[Tensor, int, str]] = []
        with torch.enable_grad(), collecting(taps), (
            recording(records) if record_layers or keep else nullcontext()
        ):
            x = x.requires_grad_(True)
            try:
                logits = model(x)
            except AssertionError as err:  # the model's own input checks (e.g. a ViT's size)
                message = re.sub(r"Proxy\([^)]*\)", "another value", str(err))  # traced text
                raise InvalidInputError(
                    f"{type(self.model).__name__} rejects input of shape {tuple(x.shape)}: "
                    f"{message}"
                ) from err
            _check_logits(logits, x.shape[0], validate)
            target_t = _resolve_target(target, logits, validate)
            initial_map = self._initial_relevance(logits.detach(), target_t, output_relevance)
            relevance, *token_grads = torch.autograd.grad(
                logits, [x, *(t for t, _, _ in taps)], initial_map, allow_unused=True
            )
        absorbed = _absorbed(taps, token_grads, x.shape[0], relevance)
        unreached = [p for p in layer_maps if p not in records.maps]
        if unreached:
            warnings.warn(
                f"no relevance reached the output of {unreached} (a gate's branch, a constant, "
                "or a module inside a layer that has one rule): left out of layer_maps",
                stacklevel=2,
            )
        bad = ~torch.isfinite(relevance).flatten(1).all(1) if validate else None
        if bad is not None and bad.any():
            warnings.warn(
                f"relevance is NaN/Inf for samples {bad.nonzero().flatten().tolist()}", stacklevel=2
            )
        return Explanation(
            relevance=relevance.detach(),
            logits=logits.detach(),
            target=target_t,
            initial=initial_map.flatten(1).sum(1),
            layer_relevance=records.sums or None,
            layer_maps={p: records.maps[p] for p in layer_maps if p in records.maps} if keep else None,
            absorbed=absorbed,
        )

    def _check_layer_paths(self, paths: Sequence[str]) -> frozenset[str]:
        """``layer_maps``' paths, each a module of the model (else an error naming close ones)."""
        if isinstance(paths, str):
            raise InvalidInputError(f"layer_maps must be a list of module paths, got {paths!r}")
        known = {name for name, _ in self.model.named_modules() if name}
        for path in paths:
            if path not in known:
                close = difflib.get_close_matches(path, known, n=3)
                raise InvalidInputError(
                    f"layer_maps: the model has no module '{path}'"
                    + (f" (did you mean {close}?)" if close else "")
                )
        return frozenset(paths)

    def _check_input(self, x: Tensor, validate: bool = True) -> Tensor:
        if not isinstance(x, Tensor):
            raise InvalidInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InvalidInputError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        first = self._first_module
        # a (transposed) convolution's weight has the rank of its input: (out, in, *kernel)
        expected = None if first is None or isinstance(first, nn.Linear) else first.weight.ndim
        if expected is not None and x.ndim != expected:
            raise InvalidInputError(
                f"x must have {expected} dimensions (N, C, ...) for a model starting with "
                f"{type(first).__name__}, got shape {tuple(x.shape)}"
            )
        channels = self._input_channels
        if channels is not None and x.ndim == expected and x.shape[1] != channels:
            raise InvalidInputError(
                f"x has {x.shape[1]} channels but the model's first layer '{self.first_layer}' "
                f"({type(first).__name__}) takes {channels}: shape {tuple(x.shape)}"
            )
        if x.ndim < 2 or x.shape[0] == 0:
            raise InvalidInputError(
                f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}"
            )
        dtype = self.dtype or x.dtype
        x = x.detach().to(device=self.device, dtype=dtype, non_blocking=True).clone()
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
            if not torch.isfinite(output_relevance).all():
                raise InvalidInputError("output_relevance contains NaN or Inf values")
            return output_relevance.to(logits)
        if self.output == "probability":
            wide = torch.promote_types(logits.dtype, torch.float32)  # no fp16/bf16 softmax
            values = torch.softmax(logits.to(wide), dim=1).to(logits.dtype)
        else:
            values = logits
        initial = torch.zeros_like(logits)
        index = target.view(-1, *([1] * (logits.ndim - 1))).expand(-1, 1, *logits.shape[2:])
        return initial.scatter_(1, index, values.gather(1, index))


def _absorbed(
    taps: list[tuple[Tensor, int, str]], grads: list[Tensor | None], n: int, relevance: Tensor
) -> Tensor | None:
    """Per-sample sum of the relevance that reached the constant tokens (see ``absorbed``)."""
    total = relevance.new_zeros(relevance.shape[0], dtype=relevance.dtype)
    for (leaf, batch, path), g in zip(taps, grads, strict=True):
        if g is None:  # nothing reached it (e.g. a branch the rules cut off)
            continue
        if g.ndim <= batch or g.shape[batch] != n:
            warnings.warn(
                f"the constant concatenated at '{path}' has shape {tuple(leaf.shape)}, with no "
                f"batch dim of size {n}; its absorbed relevance is not per sample "
                "(Explanation.absorbed is None)",
                stacklevel=3,
            )
            return None
        total = total + g.detach().movedim(batch, 0).reshape(n, -1).sum(1).to(total.dtype)
    return total


def _lrn_rule(lrn: str | Rule, epsilon: float | None) -> Rule:
    if isinstance(lrn, Rule):
        return lrn
    if lrn == "taylor":
        return lrn_rules.LRNTaylor() if epsilon is None else lrn_rules.LRNTaylor(epsilon=epsilon)
    if lrn == "identity":
        return lrn_rules.LRNIdentity()
    raise InvalidInputError(f"lrn={lrn!r} is not one of {list(lrn_rules.MODES)} or a lrp.rules rule")


def _check_logits(logits: Tensor, n: int, validate: bool = True) -> None:
    if not isinstance(logits, Tensor) or logits.ndim < 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise InvalidInputError(
            f"model output must be logits of shape (N, num_classes) or (N, num_classes, ...), "
            f"got {shape}"
        )
    if validate and not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits).flatten(1).all(1)).nonzero().flatten().tolist()
        raise InvalidInputError(f"model output (logits) contains NaN/Inf for samples {bad}")


def _resolve_target(
    target: int | Sequence[int] | Tensor | None, logits: Tensor, validate: bool = True
) -> Tensor:
    n, k = logits.shape[:2]
    if target is None:  # (N, K, ...): the class whose output sums highest
        return (logits.flatten(2).sum(2) if logits.ndim > 2 else logits).argmax(1)
    if isinstance(target, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in target
    ):
        target = torch.tensor(target, dtype=torch.long)
    if isinstance(target, bool) or not isinstance(target, int | Tensor):
        raise InvalidInputError(
            "target must be None, an int, a list of ints or a LongTensor, got "
            f"{type(target).__name__}"
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
