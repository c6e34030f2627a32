"""Legacy relevance references: what the engine at commit 5417643 (class-identity structure
recognition, before the torch.fx rewrite of issue 11) computes for VGG, ResNet and ResNeXt.

Issue 11 requires the rewritten engine to reproduce these to 1e-10 (float64) for every composite
and residual mode. The models and inputs are rebuilt from the seeds below (nothing but relevance,
logits and a parameter checksum is stored), so ``tests/test_legacy_regression.py`` imports
``build_model``/``make_input``/``CASES`` from here.

Regenerate (only with the legacy engine checked out; the file is a record of *that* engine), from
the repository root, so that ``lrp`` is this checkout's and not an editable install's:

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.make_legacy_references
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import lrp
from lrp.rules.residual import MODES

DATA = Path(__file__).with_name("data") / "legacy_relevance.pt"
DTYPE = torch.float64
NUM_CLASSES = 10
INPUT_BOUNDS = (-3.0, 3.0)  # epsilon-gamma-box; inputs are clamped into them


def _random_batchnorm_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (scales and shifts), so folding matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 0.2 - 0.1)
    return model


def _reduced_resnext() -> nn.Module:
    """ResNeXt-32x4d's grouped bottleneck, one block per stage (resnext50_32x4d is [3, 4, 6, 3])."""
    return ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4, num_classes=NUM_CLASSES)


@dataclass(frozen=True)
class Case:
    """One model: how to build it, its seeds and input shape, the targets explained."""

    build: Callable[[], nn.Module]
    model_seed: int
    bn_seed: int
    input_seed: int
    shape: tuple[int, ...]
    target: tuple[int, ...]
    residual_modes: tuple[str, ...]


CASES: dict[str, Case] = {
    # 32 px is the smallest input VGG's five max-pools allow; two samples, two targets
    "vgg11_bn": Case(
        lambda: torchvision.models.vgg11_bn(weights=None, num_classes=NUM_CLASSES),
        0, 1, 2, (2, 3, 32, 32), (1, 7), ("splitting",),
    ),
    # 24 px keeps every stage's map > 1 px up to layer4 (12, 6, 6, 3, 2, 1) and the file small
    "resnet18": Case(
        lambda: torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES),
        0, 1, 2, (1, 3, 24, 24), (3,), MODES,
    ),
    "resnext_1111_32x4d": Case(_reduced_resnext, 0, 1, 2, (1, 3, 24, 24), (5,), MODES),
}  # fmt: skip


def build_model(name: str) -> nn.Module:
    """The case's model in float64 eval mode, rebuilt from its seeds."""
    case = CASES[name]
    torch.manual_seed(case.model_seed)
    model = case.build().to(DTYPE)
    return _random_batchnorm_statistics(model, case.bn_seed).eval()


def make_input(name: str) -> torch.Tensor:
    case = CASES[name]
    g = torch.Generator().manual_seed(case.input_seed)
    return torch.randn(case.shape, generator=g, dtype=DTYPE).clamp(*INPUT_BOUNDS)


def composite_options(composite: str) -> dict[str, object]:
    return {"input_bounds": INPUT_BOUNDS} if composite == "epsilon-gamma-box" else {}


def parameter_checksum(model: nn.Module) -> torch.Tensor:
    """Sum of |p| over parameters and buffers: detects a model built differently (another torch
    or torchvision init) before the relevance comparison blames the engine."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    return torch.stack([t.detach().abs().sum() for t in tensors]).sum()


def key(model: str, composite: str, residual: str) -> str:
    return f"{model}/{composite}/{residual}"


def _engine_commit() -> str:
    """The commit of ``lrp/``, refusing an engine from elsewhere or with uncommitted edits."""
    root = Path(__file__).resolve().parent.parent
    engine = Path(lrp.__file__).resolve().parent
    if engine != root / "lrp":
        raise SystemExit(f"lrp imported from {engine}, not {root / 'lrp'}: run with python -m")

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", *cmd], capture_output=True, text=True, cwd=root, check=True
        ).stdout.strip()

    if git("status", "--porcelain", "--", "lrp"):
        raise SystemExit("lrp/ has uncommitted changes: references must record a commit")
    return git("log", "-1", "--format=%h", "--", "lrp")


def main() -> None:
    commit = _engine_commit()
    print(f"engine: lrp/ at {commit} ({lrp.__file__})")
    relevance: dict[str, torch.Tensor] = {}
    conservation: dict[str, torch.Tensor] = {}
    meta: dict[str, dict[str, object]] = {}
    for name, case in CASES.items():
        model = build_model(name)
        x = make_input(name)
        target = torch.tensor(case.target)
        with torch.no_grad():
            logits = model(x)
        meta[name] = {"logits": logits, "checksum": parameter_checksum(model)}
        for composite in lrp.composites.names():
            for residual in case.residual_modes:
                explainer = lrp.Explainer(
                    model, composite, residual=residual, **composite_options(composite)
                )
                e = explainer(x, target=target)
                k = key(name, composite, residual)
                relevance[k] = e.relevance.clone()
                conservation[k] = lrp.conservation(e)
                print(f"{k:60s} conservation {conservation[k].max().item():.2e}")
    DATA.parent.mkdir(exist_ok=True)
    torch.save(
        {
            "engine_commit": commit,
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "meta": meta,
            "relevance": relevance,
            "conservation": conservation,
        },
        DATA,
    )
    print(f"{len(relevance)} references -> {DATA} ({DATA.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
