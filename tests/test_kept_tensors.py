"""What the prepared copy keeps for the backward (docs/ENGINE_API.md, "Memory"): tensors that
can be recomputed from tensors another rule keeps anyway are not kept twice. Each case checks
that the tensor is gone from what autograd saves, and that relevance is what keeping it gives
(against the dense formula, or the same copy with the recomputation switched off)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import lrp
from lrp.layers import LinearRuleLayer
from lrp.rules.residual import ResidualMerge

F64 = torch.float64


def saved_storages(fn) -> set[int]:
    """Data pointers of every storage autograd saves while ``fn`` runs (custom Functions too)."""
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def stab(d: torch.Tensor, eps: float) -> torch.Tensor:
    return d + eps * torch.where(d >= 0, 1.0, -1.0).to(d)


class NormMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 5)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def _norm_mlp_reference(model: NormMlp, x: torch.Tensor, r_out: torch.Tensor, eps: float):
    """Epsilon rule on both Linears, the LayerNorm with sigma held constant (dense c[j, i])."""
    ln, fc1, fc2 = model.norm, model.fc1, model.fc2
    y = ln(x)
    h = fc1(y)
    a = h.relu()
    z = fc2(a)
    r_a = a * ((r_out / stab(z, eps)) @ fc2.weight)
    r_h = r_a  # ReLU: pass
    r_y = y * ((r_h / stab(h, eps)) @ fc1.weight)
    m = x.shape[1]
    sigma = torch.sqrt(x.var(1, unbiased=False, keepdim=True) + ln.eps)
    centring = torch.eye(m, dtype=F64) - 1.0 / m
    r_x = torch.empty_like(x)
    for n in range(x.shape[0]):
        c = x[n, :, None] * centring * (ln.weight / sigma[n])[None, :]  # c[j, i]
        r_x[n] = c @ (r_y[n] / stab(y[n], eps))
    return r_x


def test_linear_after_layernorm_keeps_the_norm_input() -> None:
    """LayerNorm -> Linear: the Linear keeps the LayerNorm's input (which the LayerNorm keeps)
    and recomputes the LayerNorm's output; the output is saved by nobody."""
    torch.manual_seed(0)
    model = NormMlp().double().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 6, dtype=F64)
    r_out = torch.randn(4, 3, dtype=F64)
    explainer = lrp.Explainer(model, {nn.Linear: lrp.rules.Epsilon(1e-3)}, epsilon=1e-3)
    prepared = explainer.prepared_model()
    fc1 = next(m for m in prepared.modules() if isinstance(m, LinearRuleLayer) and m.path == "fc1")
    assert fc1.source_fn is not None

    norm_out = []
    hook = prepared.get_submodule("norm").register_forward_hook(lambda m, i, o: norm_out.append(o))
    saved = saved_storages(lambda: explainer(x, output_relevance=r_out))
    hook.remove()
    assert norm_out and norm_out[0].untyped_storage().data_ptr() not in saved

    calls = []  # a user's hook on the LayerNorm fires once per call, not again in the backward
    norm = prepared.get_submodule("norm").module  # the copy's LayerNorm (hooks are copied)
    hook = norm.register_forward_hook(lambda m, i, o: calls.append(1))
    got = explainer(x, output_relevance=r_out).relevance
    hook.remove()
    assert len(calls) == 1
    expected = _norm_mlp_reference(model, x, r_out, 1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    fc1.source_fn = None  # the Linear keeps the LayerNorm's output again: the same relevance
    torch.testing.assert_close(explainer(x, output_relevance=r_out).relevance, got, rtol=0, atol=0)


class ScaledBlock(nn.Module):
    """A ConvNeXt-shaped block written by hand: the merge's output is the next conv's input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.norm = nn.LayerNorm(4)
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(8, 4)
        self.gamma = nn.Parameter(torch.full((4, 1, 1), 0.7))
        self.out = nn.Conv2d(4, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y = self.norm(self.dw(h).permute(0, 2, 3, 1))
        y = self.fc2(self.act(self.fc1(y))).permute(0, 3, 1, 2)
        s = self.gamma * y + h
        return self.head(self.out(s).relu().mean((2, 3)))


@pytest.mark.parametrize("residual", ["splitting", "proportional"])
def test_merge_keeps_its_output_and_derives_the_branch_term(residual: str) -> None:
    """The merge's output is kept by the conv after it, its identity skip by the block's first
    conv: the merge keeps those two instead of its branch term (one block-wide tensor less)
    and derives the branch term in the backward; relevance equals keeping the term, to
    rounding, and conserves."""
    torch.manual_seed(1)
    model = ScaledBlock().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    explainer = lrp.Explainer(model, "lrp-0", zero_bias=True, stabilizer=0, residual=residual)
    merge = next(m for m in explainer.prepared_model().modules() if isinstance(m, ResidualMerge))
    assert merge.derived == 0 and merge.identity == (False, True)

    derived_saved = saved_storages(lambda: explainer(x))
    e = explainer(x)
    merge.derived = None
    kept_saved = saved_storages(lambda: explainer(x))
    reference = explainer(x)
    # the output is the storage the conv after the merge saves: one storage less in all
    assert len(derived_saved) == len(kept_saved) - 1
    torch.testing.assert_close(e.relevance, reference.relevance, rtol=1e-12, atol=1e-14)
    logit = e.logits.gather(1, e.target[:, None])[:, 0]
    tol = 1e-10 if residual == "splitting" else 1e-4  # proportional: its 1e-6 stabiliser
    torch.testing.assert_close(e.relevance.sum((1, 2, 3)), logit, rtol=tol, atol=1e-12)


def test_merge_before_an_inplace_relu_keeps_its_terms() -> None:
    """A ResNet merge feeds a ReLU that keeps nothing: the terms are kept (nothing gained)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.conv(x) + x).mean((2, 3)))

    explainer = lrp.Explainer(Block().eval())
    merge = next(m for m in explainer.prepared_model().modules() if isinstance(m, ResidualMerge))
    assert merge.derived is None


def test_preparing_a_model_imports_no_compiler_stack() -> None:
    """Neither ``import lrp`` nor tracing imports timm or PyTorch's compiler stack (inductor,
    export, networkx): 30-35 MB each in every process that explains."""
    code = (
        "import sys, torchvision\n"
        "before = set(sys.modules)\n"
        "import lrp\n"
        "lrp.Explainer(torchvision.models.resnet18().eval()).prepared_model()\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(k for k in new if k.startswith(('timm', 'networkx', 'torch._inductor',\n"
        "                                             'torch._export', 'torch._functorch'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
