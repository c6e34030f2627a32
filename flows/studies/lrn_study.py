"""Binder et al. 2016's comparison on a project-trained LRN model: AOPC of the Taylor LRN rule
versus the identity baseline across epsilon values (region perturbation, METHOD.md section 2).

    python -m flows.studies.lrn_study --checkpoint outputs/models/lrn_cnn.pt --data data/synthetic

Only the rule of the ``nn.LocalResponseNorm`` layers changes between rows; every other layer keeps
the rules of one composite (``--composite``, default ``epsilon-plus-flat``) with its own epsilon.
Rows: ``lrn=identity`` (the paper's baseline, "ignore the LRN layer"), ``lrn=taylor`` (epsilon form)
for each ``--epsilons`` value, optionally the alpha-beta Taylor form (``--alpha-beta 1,0 2,1``) and
a random heatmap (the floor every method should beat). Each row perturbs 9x9 regions (default) in
order of decreasing relevance (MoRF; ``--orders morf lerf`` adds LeRF) for 100 steps with uniform
noise and reports the mean AOPC +- its standard error over the images, plus the paired difference to
identity (same images, same noise, so its standard error is much smaller than the rows' own).
MoRF: higher AOPC is better; LeRF: lower is better. ``--out`` writes the rows (with every setting)
as JSON.

``--train-epochs N`` first trains the model on the train/val splits of ``--data`` (SGD, cosine
schedule, ``--lr``) and saves it to ``--checkpoint``, so one command reproduces the whole table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lrp
from flows import models
from flows.data import ImageDataset, collate
from flows.io import write_torch
from flows.models import build_model
from flows.training import train_model
from lrp.metrics import perturbation_curve
from lrp.rules.base import Rule
from lrp.rules.lrn import LRNIdentity, LRNTaylor

DEFAULT_EPSILONS = (1e-3, 1e-2, 1e-1, 1.0)
#: epsilon of the alpha-beta rows (stabiliser only; the sign split does the work)
ALPHA_BETA_EPSILON = 1e-6


def lrn_settings(
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS,
    alpha_beta: tuple[tuple[float, float], ...] = (),
) -> list[tuple[str, float | None, Rule]]:
    """(row name, LRN epsilon or None, rule for the LRN layers): identity first, then Taylor."""
    rows: list[tuple[str, float | None, Rule]] = [("lrn=identity", None, LRNIdentity())]
    rows += [("lrn=taylor", float(eps), LRNTaylor(epsilon=float(eps))) for eps in epsilons]
    for a, b in alpha_beta:
        rule = LRNTaylor(epsilon=ALPHA_BETA_EPSILON, form="alpha-beta", alpha=a, beta=b)
        rows.append((f"lrn=taylor alpha{a:g}-beta{b:g}", ALPHA_BETA_EPSILON, rule))
    return rows


def lrn_heatmaps(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    rule: Rule,
    *,
    composite: str = "epsilon-plus-flat",
    batch_size: int = 64,
) -> Tensor:
    """(N, C, H, W) relevance for ``labels`` with ``rule`` on every LRN layer, in batches."""
    explainer = lrp.Explainer(model, composite, lrn=rule)
    return torch.cat(
        [
            explainer(images[i : i + batch_size], labels[i : i + batch_size]).relevance
            for i in range(0, len(images), batch_size)
        ]
    )


def lrn_aopc_table(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    composite: str = "epsilon-plus-flat",
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS,
    alpha_beta: tuple[tuple[float, float], ...] = (),
    orders: tuple[str, ...] = ("morf",),
    region: int = 9,
    steps: int = 100,
    perturbation: str = "uniform",
    batch_size: int = 64,
    seed: int = 0,
    random_row: bool = True,
) -> list[dict[str, Any]]:
    """One row per (LRN treatment, order): AOPC mean, standard error and paired diff to identity.

    ``labels`` are the explained (and scored) classes. Every row of one order sees the same images
    and the same seeded noise, so ``diff_vs_identity`` (mean of the per-image AOPC differences) and
    its ``diff_sem`` measure the effect of the LRN rule alone.
    """
    if not any(isinstance(m, nn.LocalResponseNorm) for m in model.modules()):
        raise ValueError("lrn_aopc_table: the model has no nn.LocalResponseNorm layer")
    if len(images) != len(labels):
        raise ValueError(f"lrn_aopc_table: {len(images)} images but {len(labels)} labels")
    model = model.eval()
    metric_args = dict(
        region=region, steps=steps, perturbation=perturbation, seed=seed, batch_size=batch_size
    )
    heatmaps: list[tuple[str, float | None, str, Tensor, float]] = []
    for name, eps, rule in lrn_settings(epsilons, alpha_beta):
        start = time.perf_counter()
        heat = lrn_heatmaps(model, images, labels, rule, composite=composite, batch_size=batch_size)
        heatmaps.append((name, eps, repr(rule), heat, time.perf_counter() - start))
    if random_row:
        g = torch.Generator().manual_seed(seed)
        heat = torch.rand(images.shape[0], *images.shape[2:], generator=g)
        heatmaps.append(("random heatmap", None, "random", heat, 0.0))

    rows = []
    for order in orders:
        identity_aopc: Tensor | None = None
        for name, eps, rule_repr, heat, explain_s in heatmaps:
            start = time.perf_counter()
            result = perturbation_curve(model, images, heat, labels, order=order, **metric_args)
            aopc = result.aopc.detach().cpu().double()
            if identity_aopc is None:
                identity_aopc = aopc
            params = {
                **result.params,
                "composite": composite,
                "lrn_rule": rule_repr,
                "explain_seconds": round(explain_s, 2),
                "perturb_seconds": round(time.perf_counter() - start, 2),
            }
            rows.append(_row(name, eps, order, aopc, identity_aopc, params))
    return rows


def _sem(v: Tensor) -> float:
    n = v.numel()
    return float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")


def _row(
    method: str,
    eps: float | None,
    order: str,
    aopc: Tensor,
    identity: Tensor,
    params: dict[str, Any],
) -> dict[str, Any]:
    diff = aopc - identity
    return {
        "method": method,
        "lrn_epsilon": eps,
        "order": order,
        "aopc": float(aopc.mean()),
        "sem": _sem(aopc),
        "diff_vs_identity": float(diff.mean()),
        "diff_sem": _sem(diff),
        "n": aopc.numel(),
        "params": params,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; the paired difference to identity is given with its standard error."""
    lines = [
        "| order | LRN treatment | LRN epsilon | AOPC +- s.e. | diff vs identity +- s.e. (paired) | n |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        eps = "-" if r["lrn_epsilon"] is None else f"{r['lrn_epsilon']:g}"
        better = "higher" if r["order"] == "morf" else "lower"
        lines.append(
            f"| {r['order'].upper()} ({better} is better) | {r['method']} | {eps} "
            f"| {r['aopc']:.4f} +- {r['sem']:.4f} "
            f"| {r['diff_vs_identity']:+.4f} +- {r['diff_sem']:.4f} | {r['n']} |"
        )
    return "\n".join(lines)


def train_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.architecture`` on the train/val splits of ``args.data``; save the best weights."""
    train_ds = ImageDataset(args.data, size=args.image_size, split="train")
    val_ds = ImageDataset(args.data, size=args.image_size, split="val")
    torch.manual_seed(args.train_seed)
    model = build_model(args.architecture, len(train_ds.classes))
    start = time.perf_counter()
    result = train_model(
        model,
        train_ds,
        val_ds,
        epochs=args.train_epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=0.9,
        batch_size=args.train_batch_size,
        patience=args.train_epochs,
        device="cpu",
        seed=args.train_seed,
        progress=False,
        schedule="cosine",
    )
    seconds = time.perf_counter() - start
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "val_accuracy": result.val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs": args.train_epochs,
        "lr": args.lr,
        "train_seconds": round(seconds, 1),
        "train_size": len(train_ds),
        "val_size": len(val_ds),
    }
    write_torch(
        args.checkpoint,
        {"architecture": args.architecture, "model": result.model.state_dict(),
         "epoch": result.best_epoch, **summary},
    )
    print(
        f"trained {args.architecture}: val accuracy {result.val_accuracy:.3f} (epoch "
        f"{result.best_epoch} of {args.train_epochs}, lr {args.lr}, cosine) in {seconds:.0f} s"
    )
    return summary


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ALPHA,BETA such as 1,0; got {text!r}") from None
    return a, b


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="trained LRN model (state_dict or training checkpoint)",
    )
    p.add_argument(
        "--architecture", default=None,
        help="architecture of --checkpoint (default: recorded in the file; lrn_cnn to train)",
    )
    p.add_argument(
        "--data", type=Path, required=True, help="dataset root (synthetic layout or ImageFolder)"
    )
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=150, help="number of images (round-robin over classes)")
    p.add_argument("--composite", default="epsilon-plus-flat", help="rules of the other layers")
    p.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        default=list(DEFAULT_EPSILONS),
        help="epsilons of the LRN Taylor rule (epsilon form)",
    )
    p.add_argument(
        "--alpha-beta",
        type=_pair,
        nargs="*",
        default=[],
        metavar="A,B",
        help="extra rows with the alpha-beta Taylor form, e.g. 1,0 2,1",
    )
    p.add_argument("--orders", nargs="+", default=["morf"], choices=["morf", "lerf"])
    p.add_argument("--region", type=int, default=9)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--perturbation", default="uniform", help="uniform | zero | blur | mean")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    t = p.add_argument_group("training (only with --train-epochs)")
    t.add_argument(
        "--train-epochs",
        type=int,
        default=0,
        help="train the model first and save it to --checkpoint (0: load it)",
    )
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--train-batch-size", type=int, default=32)
    t.add_argument("--train-seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if args.train_epochs > 0:
        args.architecture = args.architecture or "lrn_cnn"
        train_checkpoint(args)
    dataset = ImageDataset(args.data, size=args.image_size, split=args.split, subset=args.n)
    if len(dataset) < args.n:
        print(f"note: split {args.split!r} of {args.data} has only {len(dataset)} images")
    try:
        model = models.load_trained(args.checkpoint, len(dataset.classes), args.architecture)
    except models.ModelError as exc:
        raise SystemExit(f"error: {exc}") from None
    model = model.eval()
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset), collate_fn=collate)))
    images, labels = batch["image"], batch["label"]
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    rows = lrn_aopc_table(
        model,
        images,
        labels,
        composite=args.composite,
        epsilons=tuple(args.epsilons),
        alpha_beta=tuple(args.alpha_beta),
        orders=tuple(args.orders),
        region=args.region,
        steps=args.steps,
        perturbation=args.perturbation,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    print(
        f"{type(model).__name__} from {args.checkpoint}: accuracy {accuracy:.3f} on the "
        f"{len(dataset)} {args.split} images of {args.data} (true class explained); other "
        f"layers: {args.composite}; region {args.region}, {rows[0]['params']['steps']} steps, "
        f"perturbation {args.perturbation}; {time.perf_counter() - start:.0f} s"
    )
    print(format_table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "checkpoint": str(args.checkpoint),
            "data": str(args.data),
            "split": args.split,
            "accuracy": accuracy,
            "argv": vars(args)
            | {"checkpoint": str(args.checkpoint), "data": str(args.data), "out": str(args.out)},
        }
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
