"""Legacy relevance references: what the engine at commit 5417643 (class-identity structure
recognition, before the torch.fx rewrite of issue 11) computes for VGG, ResNet and ResNeXt.

Issue 11 requires the rewritten engine to reproduce these to 1e-10 (float64) for every composite
and residual mode. The models and inputs are rebuilt from the seeds below (nothing but relevance,
logits and a parameter checksum is stored), so ``tests/test_legacy_regression.py`` imports
``build_model``/``make_input``/``CASES`` from here.

Regenerate only with the legacy engine (the file is a record of *that* engine). From the
repository root, with the legacy ``lrp/`` extracted next to it (the script checks every file
against the commit):

    rm -rf /tmp/legacy_engine && mkdir /tmp/legacy_engine
    git archive 5417643 lrp | tar -x -C /tmp/legacy_engine
    PYTHONPATH=/tmp/legacy_engine OMP_NUM_THREADS=1 .venv/bin/python \
        tests/make_legacy_references.py --engine-commit 5417643

(On a checkout of that commit itself: ``python -m tests.make_legacy_references``.)
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import lrp

DATA = Path(__file__).with_name("data") / "legacy_relevance.pt"
DTYPE = torch.float64
NUM_CLASSES = 10
INPUT_BOUNDS = (-3.0, 3.0)  # epsilon-gamma-box; inputs are clamped into them
# lrp.composites.names() of the legacy engine: composites added later have no legacy reference
LEGACY_COMPOSITES = (
    "lrp-0",
    "epsilon",
    "epsilon-plus",
    "epsilon-plus-flat",
    "epsilon-gamma-box",
    "epsilon-alpha2-beta1",
    "epsilon-alpha2-beta1-flat",
    "otsuki2024",
)
# lrp.rules.residual.MODES of the legacy engine
LEGACY_MODES = ("splitting", "half", "gradient", "proportional", "ablation-i", "ablation-iii")


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
        0, 1, 2, (1, 3, 24, 24), (3,), LEGACY_MODES,
    ),
    "resnext_1111_32x4d": Case(_reduced_resnext, 0, 1, 2, (1, 3, 24, 24), (5,), LEGACY_MODES),
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


def _git(*cmd: str) -> str:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=root, check=True)
    return out.stdout


def _engine_commit(claimed: str | None) -> str:
    """The commit whose ``lrp/`` computed the references, verified file by file.

    Without ``claimed``: this checkout's ``lrp/`` (no uncommitted edits). With it: the imported
    ``lrp`` package (e.g. ``git archive`` of an old commit on PYTHONPATH) must equal that
    commit's ``lrp/`` exactly, so a reference is never labelled with the wrong engine.
    """
    root = Path(__file__).resolve().parent.parent
    engine = Path(lrp.__file__).resolve().parent
    if claimed is None:
        if engine != root / "lrp":
            raise SystemExit(f"lrp imported from {engine}: run with python -m, or --engine-commit")
        if _git("status", "--porcelain", "--", "lrp").strip():
            raise SystemExit("lrp/ has uncommitted changes: references must record a commit")
        return _git("log", "-1", "--format=%h", "--", "lrp").strip()
    expected = set(_git("ls-tree", "-r", "--name-only", claimed, "lrp").split())
    found = {f"lrp/{p.relative_to(engine).as_posix()}" for p in engine.rglob("*.py")}
    if found != {f for f in expected if f.endswith(".py")}:
        raise SystemExit(f"{engine} does not have the files of {claimed}:lrp")
    for name in sorted(found):
        if (engine.parent / name).read_text() != _git("show", f"{claimed}:{name}"):
            raise SystemExit(f"{engine.parent / name} differs from {claimed}:{name}")
    return _git("rev-parse", "--short", claimed).strip()


def _otsuki_with_winner_take_all_pools() -> lrp.Composite:
    """otsuki2024 with every max-pool left to its gradient (winner takes all). On VGG, which has
    no 3x3/2 stem pool, this is what issue 11 asks of the preset (the 2x2-average backward only
    where the paper uses it); the legacy preset applied it to every max-pool."""
    c = lrp.composites.get("otsuki2024")
    rules = {k: r for k, r in c.rules.items() if not (isinstance(k, tuple) and nn.MaxPool2d in k)}
    assert len(rules) == len(c.rules) - 1
    return lrp.Composite(
        c.name, rules, first=c.first, fold_batchnorm=c.fold_batchnorm, output=c.output
    )


# legacy-engine references of a variant composite: (model, key suffix, composite factory)
VARIANTS = {
    ("vgg11_bn", "otsuki2024"): ("otsuki2024[wta-maxpool]", _otsuki_with_winner_take_all_pools),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-commit", help="the commit of the lrp package on PYTHONPATH")
    commit = _engine_commit(parser.parse_args().engine_commit)
    print(f"engine: lrp/ at {commit} ({lrp.__file__})")
    relevance: dict[str, torch.Tensor] = {}
    conservation: dict[str, torch.Tensor] = {}
    meta: dict[str, dict[str, object]] = {}
    from lrp.rules.residual import MODES

    if tuple(lrp.composites.names()) != LEGACY_COMPOSITES or tuple(MODES) != LEGACY_MODES:
        raise SystemExit(f"not the legacy engine: composites {lrp.composites.names()}")
    for name, case in CASES.items():
        model = build_model(name)
        x = make_input(name)
        target = torch.tensor(case.target)
        with torch.no_grad():
            logits = model(x)
        meta[name] = {"logits": logits, "checksum": parameter_checksum(model)}
        for composite in LEGACY_COMPOSITES:
            for residual in case.residual_modes:
                explainer = lrp.Explainer(
                    model, composite, residual=residual, **composite_options(composite)
                )
                e = explainer(x, target=target)
                k = key(name, composite, residual)
                relevance[k] = e.relevance.clone()
                conservation[k] = lrp.conservation(e)
                print(f"{k:60s} conservation {conservation[k].max().item():.2e}")
        for (model_name, _), (suffix, factory) in VARIANTS.items():
            if model_name == name:
                e = lrp.Explainer(model, factory())(x, target=target)
                k = key(name, suffix, "splitting")
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
