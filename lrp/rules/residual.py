"""Relevance at a residual merge ``h = h_1 + ... + h_n`` (Otsuki et al. 2024, ECCV).

``splitting`` (the paper's Ratio-Based Relevance Splitting, generalised to n terms as in
METHOD.md section 5) divides the relevance element-wise in proportion to |h_i|, so the parts sum
to the incoming relevance and conservation holds at every merge. The other modes exist for
comparison:

- ``half``: equal shares (50/50 for two terms; paper ablation ii);
- ``gradient``: relevance copied into every term, as generic autograd-based tools do (not
  conservative: every merge multiplies the relevance it passes on);
- ``ablation-i``: identity skips get 0, the other terms equal shares (projection blocks 50/50);
- ``ablation-iii``: identity skips get 0, the other terms by ratio;
- ``ablation-ii`` / ``ablation-iv`` are aliases of ``half`` / ``splitting``;
- ``proportional``: signed shares h_i / (sum_j h_j) (stabilised), what Zennit's ResNet canonizer
  and Captum's epsilon rule on an addition do; conservative up to the stabiliser, but shares can
  be negative or exceed 1 when the terms have opposite signs.

An *identity skip* is a term that reaches the merge unchanged from a tensor another term is
computed from (``out = branch(x) + x``); the graph pass marks them. The last term is the one that
receives whatever the others do not: where all |h_i| are 0 the ratio is undefined and everything
goes to it, so none is lost and no NaN appears. The graph pass puts an identity skip last.

Subtraction is a merge with a term coefficient -1: the shares use |c_i h_i| and relevance passes
the negation unchanged (a diagonal linear map), except in ``gradient`` mode (the plain gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import stabilize

MODES = ("splitting", "half", "gradient", "proportional", "ablation-i", "ablation-iii")
ALIASES = {"ratio": "splitting", "ablation-iv": "splitting", "ablation-ii": "half"}
PROPORTIONAL_STABILIZER = 1e-6


def resolve_mode(mode: str) -> str:
    """Canonical residual mode name, or a ValueError that lists the valid ones."""
    canonical = ALIASES.get(mode, mode)
    if canonical not in MODES:
        valid = sorted((*MODES, *ALIASES))
        raise ValueError(f"residual={mode!r} is not one of {valid}")
    return canonical


def _effective(mode: str, identity: Sequence[bool]) -> tuple[str, tuple[bool, ...]]:
    """The mode applied and which terms it gives nothing (identity skips under the ablations)."""
    zero = tuple(False for _ in identity)
    if mode in ("ablation-i", "ablation-iii"):
        zero = tuple(identity)
        if all(zero):  # nothing else to give it to: behave like the un-ablated mode
            zero = tuple(False for _ in identity)
        mode = "half" if mode == "ablation-i" else "splitting"
    return mode, zero


def merge_shares(
    terms: Sequence[Tensor],
    mode: str,
    identity: Sequence[bool],
    nonnegative: Sequence[bool] = (),
) -> list[Tensor | float | None] | None:
    """Fraction of the merge's relevance each term gets; None for the term that takes the rest.

    Returns None altogether for ``gradient`` (a copy for each term). ``terms`` are the signed
    summands c_i h_i. ``nonnegative[i]``: term i is known to be >= 0 (an identity skip after a
    ReLU), so |h_i| = h_i needs no pass.
    """
    if mode == "gradient":
        return None
    n = len(terms)
    if mode == "proportional":
        total = terms[0] + terms[1]
        for t in terms[2:]:
            total = total + t
        den = stabilize(total, PROPORTIONAL_STABILIZER)
        return [t / den for t in terms]
    mode, zero = _effective(mode, identity)
    live = [i for i in range(n) if not zero[i]]
    shares: list[Tensor | float | None] = [0.0] * n
    if mode == "half":
        for i in live:
            shares[i] = 1.0 / len(live)
        return shares
    shares[live[-1]] = None
    if len(live) == 1:
        return shares
    # ratio |h_i| / sum_j |h_j|; where the total is 0 the floor makes every share 0 and the last
    # live term takes the rest. A total below the floor (subnormal) still gives shares in [0, 1].
    nonneg = tuple(nonnegative) or (False,) * n
    mags = {i: terms[i] if nonneg[i] else terms[i].abs() for i in live}
    total = mags[live[0]] + mags[live[1]]
    for i in live[2:]:  # a term broadcast along some dims (x + context) widens the total
        widened = torch.broadcast_shapes(total.shape, mags[i].shape) != total.shape
        total = total + mags[i] if widened else total.add_(mags[i])
    total.clamp_min_(torch.finfo(total.dtype).tiny)
    for i in live[:-1]:
        # |h_i| is private unless the term itself was used: divide into its storage then (a
        # broadcast term's share has the merge's shape: a new tensor)
        private = not nonneg[i] and mags[i].shape == total.shape
        shares[i] = mags[i].div_(total) if private else mags[i] / total
    return shares


def _signed(terms: Sequence[Tensor], coefficients: Sequence[float]) -> list[Tensor]:
    return [t if c == 1 else t * c for t, c in zip(terms, coefficients, strict=True)]


def recompute_shares(merge: ResidualMerge) -> bool:
    """Whether the backward recomputes the value-dependent shares from the terms (kept) instead
    of keeping the shares: where the terms cost no more to keep than the shares.

    An identity skip is the input of its branch's first layer, which keeps it anyway (every rule
    keeps its input), so keeping the terms costs the other terms only. In a transformer those
    are kept too (the epsilon rule keeps a Linear's output), which makes the saving; a ResNet
    merge keeps one tensor either way, a projection merge its one share (not two terms).
    """
    mode, zero = _effective(merge.mode, merge.identity)
    live = zero.count(False)
    if mode == "proportional":
        shares = len(zero)
    elif mode == "splitting" and live > 1:
        shares = live - 1
    else:
        return False  # constant shares (or the gradient)
    return merge.identity.count(False) <= shares


_SAVED = "saved"  # stands for a share tensor in ctx.save_for_backward


class _MergeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, merge: ResidualMerge, *terms: Tensor) -> Tensor:
        signed = _signed(terms, merge.coefficients)
        out = signed[0]
        for t in signed[1:]:
            out = out + t
        ctx.merge = merge
        ctx.shapes = [t.shape for t in terms]
        ctx.recompute = recompute_shares(merge)
        ctx.derived = None
        if ctx.recompute:
            d = merge.derived
            if d is not None and all(t.shape == out.shape for t in terms):
                # keep the output (its reader keeps it anyway), not the branch term: that is
                # the output minus the others in the backward (shares within rounding)
                ctx.derived = d
                ctx.save_for_backward(out, *(t for i, t in enumerate(terms) if i != d))
            else:
                ctx.save_for_backward(*terms)
            return out
        shares = merge_shares(signed, merge.mode, merge.identity, merge.nonnegative)
        ctx.shares = (
            None if shares is None else [_SAVED if isinstance(s, Tensor) else s for s in shares]
        )
        ctx.save_for_backward(*[s for s in (shares or []) if isinstance(s, Tensor)])
        return out

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor | None, ...]:
        merge = ctx.merge
        if ctx.recompute:  # the same ops on the same terms as in a forward-time computation
            terms, nonnegative = list(ctx.saved_tensors), merge.nonnegative
            if ctx.derived is not None:
                terms, nonnegative = _derive(merge, ctx.derived, terms)
            signed = _signed(terms, merge.coefficients)
            shares = merge_shares(signed, merge.mode, merge.identity, nonnegative)
        elif ctx.shares is None:
            shares = None
        else:
            saved = iter(ctx.saved_tensors)
            shares = [next(saved) if s is _SAVED else s for s in ctx.shares]
        if shares is None:  # gradient: the plain chain rule
            grads = [relevance if c == 1 else relevance * c for c in merge.coefficients]
        else:
            grads = []
            rest = None
            for share in shares:
                if isinstance(share, Tensor):
                    grads.append(relevance * share)
                elif share is None:
                    grads.append(None)
                    rest = len(grads) - 1
                else:
                    grads.append(relevance * share if share else torch.zeros_like(relevance))
            if rest is not None:  # R minus the others' shares: the first subtraction makes it
                taken = [g for g in grads if g is not None]
                r = relevance.clone() if not taken else relevance - taken[0]
                for g in taken[1:]:
                    r.sub_(g)
                grads[rest] = r
        return (None, *[_unbroadcast(g, s) for g, s in zip(grads, ctx.shapes, strict=True)])


def _derive(
    merge: ResidualMerge, d: int, saved: list[Tensor]
) -> tuple[list[Tensor], tuple[bool, ...]]:
    """The terms with term ``d`` recomputed as (out - sum_{i != d} c_i h_i) / c_d from the saved
    output and other terms. Its |h_d| is then taken (a term >= 0 can come back as -0.0 or a
    rounding below 0): the shares stay in [0, 1] and sum to 1."""
    out, *others = saved
    rest = out.clone()
    for t, c in zip(others, (c for i, c in enumerate(merge.coefficients) if i != d), strict=True):
        rest.add_(t, alpha=-c)
    if merge.coefficients[d] != 1:
        rest.div_(merge.coefficients[d])
    others.insert(d, rest)
    nonnegative = tuple(n and i != d for i, n in enumerate(merge.nonnegative))
    return others, nonnegative


def _unbroadcast(g: Tensor, shape: torch.Size) -> Tensor:
    """Sum relevance over the dims a term was broadcast along (the gradient of the broadcast)."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    g = g.sum(dim=tuple(range(extra))) if extra else g
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


class ResidualMerge(nn.Module):
    """``sum_i c_i h_i`` whose backward splits relevance by ``mode`` (see module docstring).

    ``ResidualMerge(mode, projection)(h_m, h_s)`` is the two-term ResNet merge: ``h_s`` is an
    identity skip unless ``projection``. The graph pass builds n-term merges with ``identity``
    (per term: an identity skip) and ``coefficients`` (+1, or -1 for a subtraction).
    """

    def __init__(
        self,
        mode: str = "splitting",
        projection: bool = False,
        *,
        identity: Sequence[bool] | None = None,
        coefficients: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.mode = resolve_mode(mode)
        self.identity = tuple(identity) if identity is not None else (False, not projection)
        self.coefficients = tuple(coefficients) if coefficients else (1.0,) * len(self.identity)
        if len(self.coefficients) != len(self.identity) or len(self.identity) < 2:
            raise ValueError("ResidualMerge needs two or more terms with one coefficient each")
        # set by the graph pass where a term provably is >= 0 (an identity skip after a ReLU)
        self.nonnegative = (False,) * len(self.identity)
        # set by the graph pass where the output is kept anyway by the layer that reads it and
        # every other term is an identity skip (kept by its branch's first layer): the index of
        # the term the backward derives from the output instead of keeping it (ConvNeXt's
        # layer-scale output), or None
        self.derived: int | None = None

    @property
    def projection(self) -> bool:
        """Whether no term is an identity skip (a projection shortcut)."""
        return not any(self.identity)

    @property
    def skip_nonnegative(self) -> bool:
        """Whether the last term (the skip) is known to be >= 0."""
        return self.nonnegative[-1]

    @skip_nonnegative.setter
    def skip_nonnegative(self, value: bool) -> None:
        self.nonnegative = (*self.nonnegative[:-1], bool(value))

    def forward(self, *terms: Tensor) -> Tensor:
        if len(terms) != len(self.identity):
            raise ValueError(f"ResidualMerge expects {len(self.identity)} terms, got {len(terms)}")
        if not any(t.requires_grad for t in terms):
            out = terms[0] * self.coefficients[0]
            for t, c in zip(terms[1:], self.coefficients[1:], strict=True):
                out = out + t * c
            return out
        return _MergeFunction.apply(self, *terms)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, terms={len(self.identity)}, identity={self.identity}"
