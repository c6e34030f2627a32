"""What the rules keep for the backward (issue 12: a ViT's LRP pass within 1.5x the gradient's memory).

The epsilon rule on a Linear layer keeps no stabilised copy of its output: it keeps the output
itself (and recomputes it if an in-place ReLU changed it since), or, for an output wider than
the input, nothing but the input. Ratio residual merges keep their terms, not the shares. Each
memory-saving path is checked against an explicit computation of the rule (no code shared with
lrp.rules), and the saved tensors are counted with ``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import Tensor, nn

import lrp
from lrp.layers import LinearRuleLayer
from lrp.rules.linear import Epsilon, Flat
from lrp.rules.residual import ResidualMerge

F64 = torch.float64
EPS = 0.3  # large, so that a wrong denominator shows


def _stab(z: Tensor) -> Tensor:
    return torch.where(z >= 0, z + EPS, z - EPS)


def _epsilon_mlp_reference(model: nn.Sequential, x: Tensor, r: Tensor) -> Tensor:
    """Epsilon rule layer by layer, element-wise activations passing relevance unchanged."""
    inputs = []
    h = x
    for m in model:
        inputs.append(h)
        h = m(h)
    for m, a in zip(reversed(model), reversed(inputs), strict=True):
        if isinstance(m, nn.Linear):
            z = a @ m.weight.T + m.bias
            r = a * ((r / _stab(z)) @ m.weight)
    return r


def _mlp(*layers: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*layers).to(F64).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.normal_()
    return model


def test_linear_output_changed_in_place_by_relu_is_recomputed() -> None:
    """Linear -> ReLU (run in place by the engine) -> Linear under the flat rule, which gives
    relevance to the ReLU's zero outputs too: the first layer's kept output was overwritten by
    the ReLU, so its backward must recompute the pre-activation to divide by."""
    model = _mlp(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4))
    e = lrp.Explainer(model, {nn.Linear: Epsilon(EPS), "2": Flat(stabilizer=0.0)})
    x = torch.randn(3, 7, dtype=F64)
    r = torch.randn(3, 4, dtype=F64)
    out = e(x, output_relevance=r)
    assert e.prepared_model().get_submodule("1").inplace  # the path under test is taken
    first = model[0]
    z = x @ first.weight.T + first.bias
    assert (z < 0).any()
    r_hidden = (r.sum(-1, keepdim=True) / 6).expand(3, 6)  # flat: uniform over the 6 inputs
    ref = x * ((r_hidden / _stab(z)) @ first.weight)
    torch.testing.assert_close(out.relevance, ref, rtol=1e-12, atol=0)


def test_wide_linear_output_is_recomputed_and_narrow_one_kept() -> None:
    model = _mlp(nn.Linear(5, 12), nn.GELU(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3))
    e = lrp.Explainer(model, "epsilon", epsilon=EPS)
    x = torch.randn(4, 5, dtype=F64)
    r = torch.randn(4, 3, dtype=F64)
    out = e(x, output_relevance=r)
    torch.testing.assert_close(
        out.relevance, _epsilon_mlp_reference(model, x, r), rtol=1e-12, atol=0
    )


def _saved_storages(fn) -> list[int]:
    ptrs: list[int] = []

    def pack(t: Tensor) -> Tensor:
        ptrs.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return ptrs


def test_epsilon_linear_saves_only_its_input() -> None:
    """No output-sized stabilised copy: the output is held without a copy, a wider one not at all."""
    for features in (4, 16):
        layer = LinearRuleLayer(nn.Linear(8, features).to(F64), Epsilon(EPS), "fc")
        x = torch.randn(2, 8, dtype=F64, requires_grad=True)
        assert _saved_storages(functools.partial(layer, x)) == [x.untyped_storage().data_ptr()]


def test_ratio_merge_saves_its_terms_not_new_shares() -> None:
    merge = ResidualMerge("splitting")
    a = torch.randn(2, 5, dtype=F64, requires_grad=True)
    b = torch.randn(2, 5, dtype=F64, requires_grad=True)
    ptrs = _saved_storages(lambda: merge(a, b))
    assert sorted(ptrs) == sorted(t.untyped_storage().data_ptr() for t in (a, b))
    r = torch.randn(2, 5, dtype=F64)
    ra, rb = torch.autograd.grad(merge(a, b), (a, b), r)
    share = a.abs() / (a.abs() + b.abs())
    torch.testing.assert_close(ra, r * share, rtol=1e-14, atol=0)
    torch.testing.assert_close(ra + rb, r, rtol=1e-14, atol=0)


ACTIVATIONS = [nn.ReLU(), nn.SiLU(), nn.Hardswish(), nn.Hardsigmoid(), nn.ReLU6(),
               nn.Hardtanh(-0.5, 0.7), nn.LeakyReLU(0.3), nn.ELU(0.6), nn.CELU(1.4), nn.SELU(),
               nn.Mish(), nn.Sigmoid(), nn.Tanh()]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: type(m).__name__)
def test_activation_run_in_place_gives_the_same_relevance(act: nn.Module) -> None:
    """A stock activation whose input only it reads runs in place (no new activation-sized
    tensor); it must compute the module's own function, parameters included: the relevance
    equals that of the same model with the activation as a subclass, which is not run in
    place."""
    from lrp.layers import INPLACE_ACTIVATIONS

    assert type(act) in INPLACE_ACTIVATIONS
    own = type("Own" + type(act).__name__, (type(act),), {})
    twin = copy.copy(act)
    twin.__class__ = own
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), act, nn.Conv2d(6, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5)).to(F64).eval()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    e = lrp.Explainer(model, "epsilon", epsilon=EPS)
    got = e(x)
    assert e.prepared_model().get_submodule("1").inplace
    model[1] = twin
    e_twin = lrp.Explainer(model, "epsilon", epsilon=EPS)
    expected = e_twin(x, target=got.target)
    torch.testing.assert_close(got.relevance, expected.relevance, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU()], ids=lambda m: type(m).__name__)
def test_a_hooked_activation_runs_as_itself(act: nn.Module) -> None:
    """A forward hook on an activation the engine would run in place fires once per
    explanation and sees the activation's input unchanged (the module is called as itself)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.Conv2d(4, 2, 3), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3)).to(F64).eval()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    expected = lrp.Explainer(model, "epsilon", epsilon=EPS)(x)
    seen = []
    model[1].register_forward_hook(lambda _m, i, o: seen.append((i[0].clone(), o.clone())))
    got = lrp.Explainer(model, "epsilon", epsilon=EPS)(x, target=expected.target)
    assert len(seen) == 1
    pre = model[0](x)
    torch.testing.assert_close(seen[0][0], pre, rtol=0, atol=0)
    torch.testing.assert_close(seen[0][1], act(pre), rtol=0, atol=0)
    torch.testing.assert_close(got.relevance, expected.relevance, rtol=1e-12, atol=0)
