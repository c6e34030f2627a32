"""Rules for Linear and ConvNd layers (Montavon et al. 2019, Kohlbrenner et al. 2020).

Every rule here is a modified gradient: the forward stores the denominators the rule needs (or
the layer's output itself where that is the denominator, see ``Epsilon``), the backward applies
the transposed operator once per contribution term. ``layer`` is a
:class:`lrp.layers.LinearRuleLayer` (its ``op``, ``linear``/``linear_transpose`` with the true
weights, ``input_nonnegative`` and ``cache``); ``p`` holds the modified weights that
:meth:`LinearRule.prepare` made from the BatchNorm-folded weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import Rule, check_share, stabilize

if TYPE_CHECKING:
    from ..layers import LinearRuleLayer
    from ..ops import LinearOp


def _pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


def _host(t: Tensor) -> bool:
    """Whether ``t``'s values can be read without waiting for an accelerator (the CPU): there a
    reduction that settles the common case, or a list of the few outputs that need a fallback,
    is cheaper than the general path; on an accelerator the general path runs without a sync.
    One switch, so that tests run the accelerator's path on the CPU."""
    return t.device.type == "cpu"


class LinearRule(Rule):
    """Base class: ``prepare`` modified weights, ``forward`` saves denominators (a returned
    tensor that *is* the output is kept without a copy), ``backward`` returns R_in."""

    def prepare(
        self, weight: Tensor, bias: Tensor | None, input_nonnegative: bool, private: bool = False
    ) -> dict[str, Tensor]:
        """Modified weights/biases from the folded ``weight``.

        ``private``: ``weight`` is a fresh copy the rule may overwrite (saves a weight-sized
        allocation per pass); otherwise it is the user's tensor and must stay untouched.
        """
        return {}

    def forward(
        self, layer: LinearRuleLayer, p: dict[str, Tensor], x: Tensor, z: Tensor
    ) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def backward(
        self,
        layer: LinearRuleLayer,
        p: dict[str, Tensor],
        x: Tensor,
        saved: list[Tensor],
        relevance: Tensor,
    ) -> Tensor:
        raise NotImplementedError


class Epsilon(LinearRule):
    """c_jk = x_j w_jk, denominator z_k + eps * sign(z_k) (bias included unless ``zero_bias``).

    ``empty="flat"`` (default): an output whose denominator is exactly 0 before stabilising (no
    input contributes; with ``zero_bias`` an output that is its bias alone, e.g. behind a dead
    ReLU window of a depthwise conv) cannot pass its relevance on under the plain rule, which
    drops it (``"drop"``, Zennit's behaviour). "flat" shares it uniformly over the output's
    receptive field, as ``AlphaBeta`` does for outputs with no positive contribution, so LRP-0
    with ``zero_bias`` stays conservative.
    """

    def __init__(self, epsilon: float = 1e-6, zero_bias: bool = False, empty: str = "flat") -> None:
        if epsilon < 0:
            raise ValueError(f"Epsilon: epsilon must be >= 0, got {epsilon}")
        if empty not in ("flat", "drop"):
            raise ValueError(f"Epsilon: empty={empty!r} is not one of ['flat', 'drop']")
        self.epsilon = float(epsilon)
        self.zero_bias = zero_bias
        self.empty = empty

    def kept_source(self, layer: LinearRuleLayer) -> str:
        """Where the backward gets the denominator of a layer whose denominator is its output.

        ``"den"``: the forward stores ``stab(z)`` (convolutions, whose output usually feeds a
        ReLU the engine runs in place; and ``zero_bias``, whose denominator is not the output).
        For Linear layers no copy is stored: ``"output"``: the output itself is kept, which in a
        transformer its consumer mostly keeps anyway (q, k and v by the attention);
        ``"recompute"``: an output wider than the input (a transformer MLP's expansion) is
        recomputed from the input, which the rule keeps anyway: one more matmul in the
        backward instead of out/in times the input's memory; unless the next layer keeps that
        output already (``output_kept``: it recomputes its input activation from it).
        """
        if layer.op.kind != "linear" or (self.zero_bias and layer.bias is not None):
            return "den"
        out_features, in_features = layer.weight.shape
        return "output" if out_features <= in_features or layer.output_kept else "recompute"

    def forward(self, layer, p, x, z):
        source = self.kept_source(layer)
        if source == "output":
            return (z,)
        if source == "recompute":
            return ()
        if self.zero_bias and layer.bias is not None:
            z = layer.linear(x)
        return (stabilize(z, self.epsilon),)

    def backward(self, layer, p, x, saved, relevance):
        source = self.kept_source(layer)
        nonzero = False
        if source == "den":
            (den,) = saved  # private to this layer and used once: divide into its storage
        else:  # a new tensor: the kept output stays untouched
            z = saved[0] if source == "output" else layer.op(x, layer.folded_weight(), layer.bias)
            # one count on the CPU settles the usual case (no zero: no empty output, and the
            # cheaper stabiliser); on an accelerator it would wait for the device
            nonzero = _host(z) and int(torch.count_nonzero(z)) == z.numel()
            den = stabilize(z, self.epsilon, nonzero=nonzero)
        flat = None
        if self.empty == "flat":
            if source == "den":  # stabilize() maps 0 to +eps (inf for eps = 0), and so a z
                # within eps * 2^-24 of 0, which rounds there (float32)
                empty = den == (self.epsilon if self.epsilon > 0 else float("inf"))
            else:
                empty = None if nonzero else z == 0
            flat = _flat_fallback(layer, empty, relevance, x)
        r = layer.linear_transpose(torch.div(relevance, den, out=den), x).mul_(x)
        return _add_flat(r, flat)


class LRP0(Epsilon):
    """The basic rule (Bach et al. 2015): gradient x input on ReLU networks."""

    def __init__(self, zero_bias: bool = False, empty: str = "flat") -> None:
        super().__init__(epsilon=0.0, zero_bias=zero_bias, empty=empty)

    def __repr__(self) -> str:
        return f"LRP0(zero_bias={self.zero_bias}, empty={self.empty!r})"


class Gamma(LinearRule):
    """Favours positive contributions by ``gamma``; sign-aware as in Zennit 0.5.

    For z_k > 0 the contributions are x+ (w + g w+) [bias b + g b+] and x- (w + g w-); for z_k < 0
    they are x+ (w + g w-) [bias b + g b-] and x- (w + g w+); outputs exactly 0 get no relevance.
    On non-negative inputs (after a ReLU) this is c_jk = x_j (w_jk + gamma w_jk^+) for z_k > 0.
    ``zero_bias``: the bias leaves the denominators (the sign of z_k, which picks the term,
    is still the output's, bias included).
    """

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6, zero_bias: bool = False
                 ) -> None:
        if gamma < 0:
            raise ValueError(f"Gamma: gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.stabilizer = float(stabilizer)
        self.zero_bias = zero_bias

    def prepare(self, weight, bias, input_nonnegative, private=False):
        g = self.gamma
        out = {"wp": weight + g * weight.clamp(min=0), "wn": weight + g * weight.clamp(max=0)}
        if bias is not None and not self.zero_bias:
            out["bp"] = bias + g * bias.clamp(min=0)
            out["bn"] = bias + g * bias.clamp(max=0)
        return out

    def forward(self, layer, p, x, z):
        op = layer.op
        if layer.input_nonnegative:
            den_pos = op(x, p["wp"], p.get("bp"))
            den_neg = op(x, p["wn"], p.get("bn"))
            saved = (x,)
        else:
            xp, xn = x.clamp(min=0), x.clamp(max=0)
            den_pos = op(xp, p["wp"], p.get("bp")) + op(xn, p["wn"])
            den_neg = op(xp, p["wn"], p.get("bn")) + op(xn, p["wp"])
            saved = (xp, xn)
        s_pos = (z > 0).to(z.dtype) / stabilize(den_pos, self.stabilizer)
        s_neg = (z < 0).to(z.dtype) / stabilize(den_neg, self.stabilizer)
        return (*saved, s_pos, s_neg)

    def backward(self, layer, p, x, saved, relevance):
        op = layer.op
        if layer.input_nonnegative:
            _, s_pos, s_neg = saved
            g_pos, g_neg = relevance * s_pos, relevance * s_neg
            return x * (op.transpose(g_pos, p["wp"], x) + op.transpose(g_neg, p["wn"], x))
        xp, xn, s_pos, s_neg = saved
        g_pos, g_neg = relevance * s_pos, relevance * s_neg
        return xp * (op.transpose(g_pos, p["wp"], x) + op.transpose(g_neg, p["wn"], x)) + xn * (
            op.transpose(g_pos, p["wn"], x) + op.transpose(g_neg, p["wp"], x)
        )


@dataclass(frozen=True)
class _Scatter:
    """Values to add at flat indices of the input relevance (a sparse flat share)."""

    index: Tensor
    values: Tensor


def _add_flat(r: Tensor, flat: Tensor | _Scatter | None) -> Tensor:
    """``r`` plus a flat share from :func:`_flat_fallback` (in place)."""
    if flat is None:
        return r
    if isinstance(flat, Tensor):
        return r.add_(flat)
    r = r.contiguous()
    r.view(-1).index_add_(0, flat.index, flat.values)
    return r


def _flat_fallback(
    layer: LinearRuleLayer,
    empty: Tensor | None,
    relevance: Tensor,
    x: Tensor,
    scale: float = 1.0,
) -> Tensor | _Scatter | None:
    """The flat share of the outputs marked ``empty`` (None when there are none), for
    :func:`_add_flat`.

    ``empty``: a mask of the outputs, or on the CPU their flat indices; None: the caller proved
    with a cheaper test that no output is empty. On the CPU an empty output whose relevance is
    exactly 0 has nothing to share and is left out first: behind a ReLU that is the usual case
    (with the bias in the rule an empty output's value is <= 0, so the layer above gives it no
    relevance), and the spread is then skipped. Where the rest are few
    (:data:`SPARSE_FLAT_MAX_PAIRS`), each one's share is added to its own receptive field
    (:func:`_sparse_flat`); otherwise, and always on an accelerator (listing them would wait
    for the device), the dense spread (a channel sum and a depthwise box filter over every
    output) runs.
    """
    if empty is None:
        return None
    if _host(empty):
        where = empty if empty.dtype != torch.bool else empty.flatten().nonzero().squeeze(1)
        values = relevance.flatten()[where]
        some = values != 0
        where, values = where[some], values[some]
        if where.numel() == 0:
            return None
        if _sparse_fits(layer, where.numel(), x):
            return _sparse_flat(layer, where, values * scale, tuple(relevance.shape), x)
        if empty.dtype != torch.bool:  # a mask (the outputs left out share 0 through it too)
            mask = torch.zeros(relevance.numel(), dtype=torch.bool, device=empty.device)
            empty = mask.index_fill_(0, where, True).view(relevance.shape)
    g = torch.where(empty, relevance * scale if scale != 1.0 else relevance, 0.0)
    return _flat_transpose(layer, g, x)


#: the sparse flat share is used up to this many (input, share) pairs per input element; beyond
#: it the dense spread is faster (measured on MobileNetV3/EfficientNet depthwise layers: even at
#: 0.13 pairs per input the sparse share took 4.4 ms against the dense spread's 25 ms, and the
#: two met at about 0.18)
SPARSE_FLAT_MAX_PAIRS = 0.12


def _sparse_fits(layer: LinearRuleLayer, count: int, x: Tensor) -> bool:
    """Whether ``count`` empty outputs of a convolution are few enough for :func:`_sparse_flat`
    (a Linear layer's dense spread is one row sum)."""
    if layer.op.kind != "conv":
        return False
    pairs = count * math.prod(layer.weight.shape[2:]) * (x.shape[1] // layer.op.groups)
    return pairs <= SPARSE_FLAT_MAX_PAIRS * x.numel()


def _sparse_flat(
    layer: LinearRuleLayer, where: Tensor, values: Tensor, out_shape: tuple[int, ...], x: Tensor
) -> _Scatter:
    """:func:`_flat_transpose` of ``values`` at the outputs at flat indices ``where`` (of an
    output of ``out_shape``) only, as (input index, share) pairs.

    One spatial dimension at a time, with Python numbers for the geometry: int64 arithmetic
    broadcast over a trailing dimension of 2 was most of this function's time. A tap in the
    padding adds 0 at a clamped (real) position, so nothing is selected by a mask (whose
    ``nonzero`` cost more than the rest)."""
    op = layer.op
    kernel = tuple(layer.weight.shape[2:])
    c_in, sizes = x.shape[1], tuple(x.shape[2:])
    per_group = c_in // op.groups
    device = x.device
    coords = torch.unravel_index(where, out_shape)
    amounts = op.pre_amounts(sizes)  # pre-padding before each spatial dim: zeros, no inputs
    taps = torch.cartesian_prod(*(torch.arange(k, device=device) for k in kernel))
    taps = taps.view(-1, op.dims)
    valid = torch.ones((), dtype=torch.bool, device=device)
    spatial = torch.zeros((), dtype=torch.long, device=device)
    for d in range(op.dims):
        before = amounts[2 * (op.dims - 1 - d)] if amounts else 0
        pos = (coords[2 + d] * op.stride[d] - op.padding[d] - before)[:, None] + (
            taps[:, d] * op.dilation[d])[None]  # (E, taps)
        valid = valid & (pos >= 0) & (pos < sizes[d])
        spatial = spatial + pos.clamp_(0, sizes[d] - 1) * math.prod(sizes[d + 1:])
    count = valid.sum(1).mul_(per_group).clamp_(min=1)
    shares = (values / count)[:, None] * valid  # (E, taps)
    channels = (coords[1] // (out_shape[1] // op.groups))[:, None] * per_group + torch.arange(
        per_group, device=device)  # (E, per_group)
    index = ((coords[0][:, None] * c_in + channels) * math.prod(sizes))[:, None, :] + (
        spatial[:, :, None])
    return _Scatter(index.flatten(), shares[:, :, None].expand_as(index).flatten())


def _flat_transpose(layer: LinearRuleLayer, g: Tensor, x: Tensor) -> Tensor:
    """Flat rule's backward for ``g`` at the output: each output's value is shared uniformly
    over the inputs connected to it (its receptive field, zero padding excluded, within its group).

    The ones weight of the flat rule is separable, so this costs a sum over each group's output
    channels and one transposed depthwise box filter, not a full transposed convolution.
    """
    op = layer.op
    if op.kind == "linear":
        j = x.shape[-1]
        return (g.sum(-1, keepdim=True) / j).expand(x.shape)
    if op.kind == "conv_transpose":  # rare in classifiers: the transpose with a ones weight
        ones = torch.ones_like(layer.weight, dtype=x.dtype, device=x.device)
        key = ("flat-counts", tuple(x.shape[1:]), x.device, x.dtype)
        counts = layer.cache.get(key)
        if counts is None:  # inputs per output, once per input shape
            counts = layer.cache[key] = op(x.new_ones((1, *x.shape[1:])), ones).clamp_(min=1)
        return op.transpose(g / counts, ones, x)
    groups = op.groups
    c_in = x.shape[1]
    kernel = tuple(layer.weight.shape[2:])
    key = ("flat-counts", tuple(x.shape[2:]), x.device, x.dtype)
    counts = layer.cache.get(key)
    box = torch.ones((1, 1, *kernel), device=x.device, dtype=x.dtype)
    if counts is None:  # inputs per output position, once per input shape
        ones = torch.ones((1, 1, *x.shape[2:]), device=x.device, dtype=x.dtype)
        taps = op.conv(ones, box, groups=1)
        counts = layer.cache[key] = (taps * (c_in // groups)).clamp_(min=1)
    n = g.shape[0]
    per_group = g / counts
    if g.shape[1] != groups:  # each group's outputs share one spread: their sum (N, G, *out)
        per_group = per_group.view(n, groups, -1, *g.shape[2:]).sum(2)
    spread = op.transpose(
        per_group, box.expand(groups, 1, *kernel), x.new_empty(()).expand(n, groups, *x.shape[2:]),
        groups=groups)
    return spread.unsqueeze(2).expand(n, groups, c_in // groups, *x.shape[2:]).reshape(x.shape)


def _paired(layer: LinearRuleLayer) -> bool:
    """Whether the terms of positive and negative inputs run as one convolution over
    :func:`_sign_pair` (an ungrouped convolution on signed inputs): one call with twice the
    input channels instead of two calls and a sum of their outputs. Grouped convolutions keep
    two calls: with two input channels per group the CPU's kernels were 2-25x slower than
    depthwise ones."""
    return not layer.input_nonnegative and layer.op.kind == "conv" and layer.op.groups == 1


def _sign_pair(x: Tensor) -> Tensor:
    """[x+, x-] along dim 1: the input of a convolution with weight [W_a, W_b], or for a
    weight, [W+, W-] along its input channels."""
    c = x.shape[1]
    pair = x.new_empty((x.shape[0], 2 * c, *x.shape[2:]))
    torch.clamp(x, min=0, out=pair[:, :c])
    torch.clamp(x, max=0, out=pair[:, c:])
    return pair


def _transpose_pair(op: LinearOp, g: Tensor, pair: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(T(g, w_a), T(g, w_b)) from one transposed convolution with the weight
    ``pair`` = [w_a, w_b] along the input channels (views into one tensor)."""
    c = x.shape[1]
    both = op.transpose(g, pair, x.new_empty(()).expand(x.shape[0], 2 * c, *x.shape[2:]))
    return both[:, :c], both[:, c:]


def _signed_product(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x+ a + x- b (a new tensor; ``a``'s storage is reused as scratch)."""
    r = torch.relu(x).mul_(a)
    return r.addcmul_(b, torch.clamp(x, max=0, out=a))


class AlphaBeta(LinearRule):
    """alpha * positive share - beta * negative share of each output's relevance (alpha - beta = 1).

    Positive contributions: x+ w+ (with bias b+) and x- w-; negative: x+ w- (with b-) and x- w+.

    ``empty="flat"`` (default): an output whose positive contributions are all exactly zero
    (den_pos = 0 before stabilising; every x_j w_jk^+ = 0, common in small groups of grouped
    convolutions) has no input to give its alpha * R_k to; the plain rule drops it (``"drop"``,
    Zennit's behaviour). "flat" spreads it uniformly over the output's receptive field instead,
    the flat rule (Lapuschkin et al. 2019) at that output only, as ``Proportional(empty="flat")``
    does for all-zero pool windows. Uniform, not |w| or w+ shares: the ones weight is separable,
    so the fallback costs a channel sum and a depthwise box filter instead of a second transposed
    convolution, with no host sync (a ``torch.where`` on the saved denominator). With alpha = 1
    (z+) this keeps the rule conservative; the beta share of an output with no negative
    contributions is still dropped, as in the plain rule.

    ``stabilizer_share="flat"``: the stabiliser's share of the positive term, alpha * R_k * eps /
    (sum_j (x_j w_jk)^+ + eps), is spread flat over the output's receptive field instead of being
    absorbed (``"absorb"``, the plain rule, Zennit's and Otsuki et al.'s code). It is what z+
    loses at outputs whose positive part is small against eps (depthwise convolutions with few
    taps); an empty output's share is its whole relevance, so ``empty`` is then moot. z+ becomes
    exactly conservative whatever eps, and values move by at most that share per output.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 1.0,
        stabilizer: float = 1e-6,
        empty: str = "flat",
        stabilizer_share: str = "absorb",
        zero_bias: bool = False,
    ) -> None:
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
            raise ValueError(
                f"AlphaBeta: need alpha, beta >= 0 and alpha - beta = 1, got {alpha}, {beta}"
            )
        if empty not in ("flat", "drop"):
            raise ValueError(f"AlphaBeta: empty={empty!r} is not one of ['flat', 'drop']")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.stabilizer = float(stabilizer)
        self.use_bias = not zero_bias
        self.empty = empty
        self.stabilizer_share = check_share("AlphaBeta", stabilizer_share)

    def prepare(self, weight, bias, input_nonnegative, private=False):
        out = {}
        if not input_nonnegative and weight.ndim > 2:
            # a convolution on signed inputs: [W+, W-] along the input channels, the weight of
            # the paired convolution (``_paired``); W+ and W- are views into it (no third copy)
            c = weight.shape[1]
            out["wpn"] = pair = _sign_pair(weight)
            out["wp"], out["wn"] = pair[:, :c], pair[:, c:]
            if self.beta:
                out["wnp"] = torch.cat([out["wn"], out["wp"]], 1)
        else:
            if self.beta or not input_nonnegative:  # z+ on inputs >= 0 never needs W-
                out["wn"] = weight.clamp(max=0)
            out["wp"] = weight.clamp_(min=0) if private else weight.clamp(min=0)
        if bias is not None and self.use_bias:
            out["bp"] = _pos(bias)
            if self.beta:
                out["bn"] = _neg(bias)
        return out

    def _den(self, layer, xp, w_a, b, nonnegative):
        """op(x+, w_a) + b; a sum known to be >= 0 gets the stabiliser on its bias already (the
        x- term is added by ``forward``, ``_stabilized`` finishes it)."""
        op = layer.op
        if nonnegative and self.stabilizer > 0:
            # the sign is known: the stabiliser rides on the bias of the convolution (no pass)
            if b is None:
                b = w_a.new_full((op.out_channels(w_a),), self.stabilizer)
            else:
                b = b + self.stabilizer
        return op(xp, w_a, b)

    def _stabilized(self, den: Tensor, nonnegative: bool) -> Tensor:
        if nonnegative:
            return den if self.stabilizer > 0 else stabilize(den, 0.0)
        return stabilize(den, self.stabilizer)

    def _empty_mask(
        self, layer: LinearRuleLayer, p: dict[str, Tensor], den: Tensor
    ) -> Tensor | None:
        """Where every positive contribution is 0: a mask, or for a convolution on the CPU where
        they are few the flat indices of those outputs (None when there are none).

        ``_den`` adds the stabiliser to a sum of non-negative terms (on the bias, where it
        rides on the convolution: adding exact zeros to it leaves it exact), and
        ``stabilize(., 0)`` turns an exact 0 into inf; so an empty output's denominator equals
        the stabiliser (inf when it is 0), and a channel with b+ > 0 is never empty. On the CPU
        one reduction (the minimum, maximum for inf) settles the usual case of no empty output;
        otherwise a convolution's are found plane by plane: one minimum per sample and channel,
        then a comparison inside the planes that hold the value only, since empty outputs are
        rare (a few thousand of millions) and a full mask costs more than the rest of the
        fallback.
        """
        value = float("inf") if self.stabilizer == 0 else self.stabilizer
        inf = value == float("inf")
        if _host(den) and bool(den.amax() < value if inf else den.amin() > value):
            return None  # the usual case on the CPU: one reduction shows there is none
        bp = p.get("bp")
        # in den's dtype from the start (a float32 1e-6 cast to float64 is not 1e-6)
        t = torch.full((den.shape[-1] if layer.op.kind == "linear" else den.shape[1],), value,
                       dtype=den.dtype, device=den.device)
        if bp is not None:
            t.masked_fill_(bp != 0, float("nan"))
        if layer.op.kind == "linear":
            return den == t
        if not _host(den):
            return den == t.view(-1, *([1] * (den.ndim - 2)))
        planes = den.flatten(2)
        extreme = planes.amax(2) if inf else planes.amin(2)
        n, c = (extreme == t).nonzero(as_tuple=True)
        if n.numel() > extreme.numel() // 4:  # empty outputs everywhere: one mask
            return den == t.view(-1, *([1] * (den.ndim - 2)))
        i, j = (planes[n, c] == t[c, None]).nonzero(as_tuple=True)
        return (n[i] * den.shape[1] + c[i]) * planes.shape[2] + j

    def forward(self, layer, p, x, z):
        dens = self._dens(layer, p, x)
        return (self._stabilized(dens[0], True), *(self._stabilized(d, False) for d in dens[1:]))

    def _dens(self, layer: LinearRuleLayer, p: dict[str, Tensor], x: Tensor) -> list[Tensor]:
        """The positive and (if beta) negative denominators, before :meth:`_stabilized`.

        Positive contributions (x+ w+, x- w-, b+) sum to >= 0, negative ones (x+ w-, x- w+, b-)
        to <= 0. x+ is a temporary: only the denominators are saved (the layer saves x), so a
        layer on signed inputs keeps one input-sized tensor alive, as its gradient does.
        """
        wp, wn = p["wp"], p.get("wn")
        if _paired(layer) and layer.op.out_channels(wp) >= x.shape[1]:
            # both signs in one convolution: saves the output-sized sum, which costs more than
            # the doubled input when the layer widens (MBConv expansions, 1.5-2x faster)
            xs = _sign_pair(x)
            dens = [self._den(layer, xs, p["wpn"], p.get("bp"), True)]
            if self.beta:
                dens.append(self._den(layer, xs, p["wnp"], p.get("bn"), False))
            return dens
        xp = x if layer.input_nonnegative else torch.relu(x)
        dens = [self._den(layer, xp, wp, p.get("bp"), True)]
        if self.beta:
            dens.append(self._den(layer, xp, wn, p.get("bn"), False))
        if not layer.input_nonnegative:
            # x+ - x = -x-, in place; op(-x-, w) = -op(x-, w) exactly (negation is exact)
            t = xp.sub_(x)
            dens[0].sub_(layer.op(t, wn))
            if self.beta:
                dens[1].sub_(layer.op(t, wp))
        return dens

    def backward(self, layer, p, x, saved, relevance):
        op = layer.op
        flat = None
        spread = self.stabilizer_share == "flat" and self.stabilizer > 0
        if self.empty == "flat" and not spread:  # before the denominator's storage is reused
            empty = self._empty_mask(layer, p, saved[0])
            flat = _flat_fallback(layer, empty, relevance, x, self.alpha)
        # the denominators are private to this layer and used once: divide into their storage
        g_pos = torch.div(relevance, saved[0], out=saved[0])
        if self.alpha != 1.0:
            g_pos.mul_(self.alpha)
        if spread:  # eps * alpha R / den per output: all of it where nothing contributes
            flat = _flat_transpose(layer, g_pos * self.stabilizer, x)
        g_neg = relevance * (self.beta / saved[1]) if self.beta else None
        if layer.input_nonnegative:
            r = op.transpose(g_pos, p["wp"], x).mul_(x)
            if g_neg is not None:
                r = r - x * op.transpose(g_neg, p["wn"], x)
            return _add_flat(r, flat)
        if _paired(layer):  # x+ T(g, w+) + x- T(g, w-): both transposes in one
            r = _signed_product(x, *_transpose_pair(op, g_pos, p["wpn"], x))
            if g_neg is not None:
                r.sub_(_signed_product(x, *_transpose_pair(op, g_neg, p["wnp"], x)))
            return _add_flat(r, flat)
        # x+ a + x- b, with x- b = -((-x-) b) and -x- = x+ - x made in place: one new tensor and
        # in-place passes (a boolean select is 3x slower on the CPU); the same values as
        # x * (a where x > 0, else b), the other term being an exact 0
        xp = torch.relu(x)
        r = op.transpose(g_pos, p["wp"], x).mul_(xp)
        if g_neg is not None:
            r_neg = op.transpose(g_neg, p["wn"], x).mul_(xp)
        t = xp.sub_(x)
        r.addcmul_(op.transpose(g_pos, p["wn"], x), t, value=-1.0)
        if g_neg is not None:
            r = r.sub_(r_neg.addcmul_(op.transpose(g_neg, p["wp"], x), t, value=-1.0))
        return _add_flat(r, flat)


class ZPlus(AlphaBeta):
    """z+ rule = alpha1-beta0: only positive contributions (x+ w+, x- w-) are kept."""

    def __init__(
        self,
        stabilizer: float = 1e-6,
        zero_bias: bool = False,
        empty: str = "flat",
        stabilizer_share: str = "absorb",
    ) -> None:
        super().__init__(
            alpha=1.0, beta=0.0, stabilizer=stabilizer, empty=empty,
            stabilizer_share=stabilizer_share, zero_bias=zero_bias,
        )

    def __repr__(self) -> str:
        return (
            f"ZPlus(stabilizer={self.stabilizer}, zero_bias={not self.use_bias}, "
            f"empty={self.empty!r}, stabilizer_share={self.stabilizer_share!r})"
        )


class ZBox(LinearRule):
    """z^B rule for a bounded input layer: c_jk = x_j w_jk - l_j w_jk^+ - h_j w_jk^- (no bias).

    ``low``/``high``: scalars, per-channel vectors (C,) or tensors broadcastable to one sample.
    """

    def __init__(self, low: float | Tensor, high: float | Tensor, stabilizer: float = 1e-6) -> None:
        self.low = torch.as_tensor(low, dtype=torch.float64)
        self.high = torch.as_tensor(high, dtype=torch.float64)
        if torch.any(self.low > self.high):
            raise ValueError("ZBox: input_bounds low must be <= high")
        self.stabilizer = float(stabilizer)
        self._moved: dict[tuple, Tensor] = {}  # bounds per (which, device, dtype): one copy each

    def __repr__(self) -> str:
        return f"ZBox(low={self.low!r}, high={self.high!r}, stabilizer={self.stabilizer})"

    def prepare(self, weight, bias, input_nonnegative, private=False):
        return {"wp": weight.clamp(min=0), "wn": weight.clamp(max=0)}

    def _bound(self, bound: Tensor, x: Tensor) -> Tensor:
        key = (id(bound), x.device, x.dtype)
        b = self._moved.get(key)
        if b is None:  # a host-to-device copy once, not on every call
            b = self._moved[key] = bound.to(device=x.device, dtype=x.dtype)
        if b.ndim == 1 and x.ndim > 2 and b.numel() == x.shape[1]:
            b = b.view(1, -1, *([1] * (x.ndim - 2)))
        try:
            return b.expand_as(x)
        except RuntimeError as err:
            raise ValueError(
                f"ZBox: input_bounds of shape {tuple(bound.shape)} do not broadcast to input {tuple(x.shape)}"
            ) from err

    def forward(self, layer, p, x, z):
        op = layer.op
        low, high = self._bound(self.low, x), self._bound(self.high, x)
        den = layer.linear(x) - op(low, p["wp"]) - op(high, p["wn"])
        return (stabilize(den, self.stabilizer),)

    def backward(self, layer, p, x, saved, relevance):
        op = layer.op
        s = relevance / saved[0]
        low, high = self._bound(self.low, x), self._bound(self.high, x)
        return (
            x * layer.linear_transpose(s, x)
            - low * op.transpose(s, p["wp"], x)
            - high * op.transpose(s, p["wn"], x)
        )


class _InputFree(LinearRule):
    """Rules that replace the input by ones: c_jk = w'_jk for a transformed weight w'.

    The denominator does not depend on the input values, so it is computed for one sample, cached
    per input shape, and broadcast over the batch. ``stabilizer_share="flat"``: the stabiliser's
    share R_k eps / (sum_j w'_jk + eps) is spread flat instead of absorbed (as in ``AlphaBeta``;
    an output channel whose w' are all 0, e.g. all-negative weights under z+ with ones, then
    passes its relevance on flat instead of losing it).
    """

    def __init__(self, stabilizer: float = 1e-6, stabilizer_share: str = "absorb") -> None:
        self.stabilizer = float(stabilizer)
        self.stabilizer_share = check_share(type(self).__name__, stabilizer_share)

    def transform(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def prepare(self, weight, bias, input_nonnegative, private=False):
        return {"w": self.transform(weight)}

    def forward(self, layer, p, x, z):
        key = (tuple(x.shape[1:]), x.device, x.dtype)
        den = layer.cache.get(key)
        if den is None:
            ones = torch.ones((1, *x.shape[1:]), device=x.device, dtype=x.dtype)
            den = stabilize(layer.op(ones, p["w"], p.get("b")), self.stabilizer)
            layer.cache[key] = den
        return (den,)

    def backward(self, layer, p, x, saved, relevance):
        g = relevance / saved[0]
        r = layer.op.transpose(g, p["w"], x)
        if self.stabilizer_share == "flat" and self.stabilizer > 0:
            r = r.add_(_flat_transpose(layer, g * self.stabilizer, x))
        return r


class Flat(_InputFree):
    """Flat rule (Lapuschkin et al. 2019): relevance spread uniformly over the receptive field."""

    def transform(self, weight):
        return torch.ones_like(weight)


class WSquare(_InputFree):
    """w^2 rule (Montavon et al. 2017): shares proportional to squared weights.

    ``zero_bias=True`` (default): the bias is ignored, as in the rule's definition.
    ``zero_bias=False``: b^2 joins the denominator and absorbs its share, as Zennit's
    ``WSquare()`` does by default (the square applied to every parameter).
    """

    def __init__(
        self, stabilizer: float = 1e-6, stabilizer_share: str = "absorb", zero_bias: bool = True
    ) -> None:
        super().__init__(stabilizer, stabilizer_share)
        self.zero_bias = zero_bias

    def transform(self, weight):
        return weight * weight

    def prepare(self, weight, bias, input_nonnegative, private=False):
        out = {"w": self.transform(weight)}
        if bias is not None and not self.zero_bias:
            out["b"] = bias * bias
        return out


class ZPlusOnes(_InputFree):
    """z+ with the input replaced by ones (Otsuki et al. 2024 stem): shares proportional to w+."""

    def __init__(self, stabilizer: float = 1e-5, stabilizer_share: str = "absorb") -> None:
        super().__init__(stabilizer, stabilizer_share)

    def transform(self, weight):
        return weight.clamp(min=0)
