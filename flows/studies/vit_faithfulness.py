"""Faithfulness and localisation of ViT explanations on the pipeline's synthetic test split.

    python -m flows.studies.vit_faithfulness                  # train small_vit on CPU, print table
    python -m flows.studies.vit_faithfulness --checkpoint outputs/studies/small_vit.pt  # reuse it

Trains ``small_vit`` (``lrp.models.small_vit``) with :func:`flows.training.train_model` on the
train split of the synthetic set that ``params.yaml`` describes (``--train-per-class`` renders more
training images with the same generator: the first ``data.per_class`` images of each class are
byte-identical and the split is a hash of the path, so the pipeline's val and test images never
enter training), then scores each method on the pipeline's test split with the evaluate stage's
own code (:func:`flows.stages.evaluate.evaluate_piece`: insertion, deletion, ID, AOPC, relevance
mass, pointing game) and prints the report stage's table layout. Writes
``outputs/studies/vit_faithfulness.json`` (not a DVC output). Used to choose ``lrp.Explainer``'s
default ``attention=`` mode (docs/TRANSFORMERS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from flows.context import Context, data_root, engine_options, load_context
from flows.context import dataset as load_dataset
from flows.data import ImageDataset, collate, make_synthetic_dataset
from flows.io import write_json
from flows.methods import Method, make_attributor, parse_method
from flows.models import build_model, load_trained, save_trained
from flows.stages.evaluate import EvalSettings, evaluate_piece, merge_pieces
from flows.stages.report import markdown_table
from flows.training import evaluate as evaluate_accuracy
from flows.training import train_model

ARCH = "small_vit"
DEFAULT_METHODS = (
    "epsilon-transformer:attention=cp",
    "epsilon-transformer:attention=attnlrp",
    "epsilon-transformer:attention=cp,residual=proportional",
    "epsilon-transformer:attention=attnlrp,residual=proportional",
    "input-x-gradient",
    "integrated-gradients",
    "attention-rollout",
    "random",
)


def prepare_data(ctx: Context, train_per_class: int | None) -> tuple[ImageDataset, ImageDataset]:
    """(train, val) splits; the test split is the pipeline's. Generates the synthetic sets."""
    d = ctx.params.data
    root = data_root(ctx)
    if d.synthetic:
        make_synthetic_dataset(
            root, classes=d.classes, per_class=d.per_class, size=d.image_size, seed=d.seed
        )
    val = load_dataset(ctx, "val")
    if train_per_class is None or train_per_class <= d.per_class:
        return load_dataset(ctx, "train"), val
    if not d.synthetic:
        raise SystemExit("--train-per-class needs the synthetic dataset (data.synthetic: true)")
    bigger = make_synthetic_dataset(
        ctx.layout.studies() / f"vit_train_data_{train_per_class}",
        classes=d.classes,
        per_class=train_per_class,
        size=d.image_size,
        seed=d.seed,
    )
    train = ImageDataset(
        bigger,
        size=d.image_size,
        split="train",
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
    )
    return train, val


def train_vit(ctx: Context, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Train small_vit from scratch (or load ``--checkpoint``); returns the model and its record."""
    if args.checkpoint:
        model = load_trained(Path(args.checkpoint), architecture=ARCH).eval()
        return model, {"checkpoint": str(args.checkpoint)}
    train_ds, val_ds = prepare_data(ctx, args.train_per_class)
    torch.manual_seed(args.seed)
    model = build_model(ARCH, len(train_ds.classes), image_size=ctx.params.data.image_size)
    start = time.perf_counter()
    result = train_model(
        model,
        train_ds,
        val_ds,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=0.9,
        batch_size=args.batch_size,
        patience=args.epochs,
        device="cpu",
        seed=args.seed,
        progress=True,
        augment=True,
        schedule="cosine",
        optimizer=args.optimizer,
    )
    save_trained(result.model, ARCH, Path(args.save))
    record = {
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "epochs": args.epochs,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy,
        "train_seconds": time.perf_counter() - start,
        "saved": str(args.save),
    }
    return result.model.eval(), record


def explain_all(
    model: nn.Module, ds: ImageDataset, spec: str, ctx: Context, batch_size: int
) -> dict[str, np.ndarray]:
    """The stored arrays the evaluate stage reads, for one method over the whole dataset."""
    method = parse_method(spec)
    attribute = make_attributor(model, method, engine_options(ctx.params, method))
    parts: dict[str, list[np.ndarray]] = {}
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate):
        out = attribute(batch["image"], batch["label"])
        values = {
            "index": batch["index"].numpy(),
            "label": batch["label"].numpy(),
            "target": out["target"].numpy(),
            "logits": out["logits"].detach().numpy(),
            "conservation": out["conservation"].double().numpy(),
            "relevance": out["relevance"].detach().sum(1).float().numpy(),
        }
        for key, value in values.items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def run_study(ctx: Context, model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Scores of every method on the test split: the evaluate stage's summary per method."""
    test = load_dataset(ctx, "test", args.images)
    e = ctx.params.evaluate
    settings = EvalSettings(
        steps=args.steps,
        baseline=e.baseline,
        score=e.score,
        quantize_levels=(0,),
        batch_size=64,
        aopc_steps=args.steps,
    )
    pieces, infos, seconds = {}, {}, {}
    for spec in args.methods:
        label = parse_method(spec).label
        start = time.perf_counter()
        arrays = explain_all(model, test, spec, ctx, args.batch_size)
        pieces[label] = [
            evaluate_piece(
                model, test, arrays, label, settings, device=torch.device("cpu"), bar=False
            )
        ]
        infos[label] = arrays
        seconds[label] = time.perf_counter() - start
        print(f"{label}: {seconds[label]:.0f} s", file=sys.stderr, flush=True)
    merged = merge_pieces(pieces, infos, test, settings)
    summary = merged.summary
    _, accuracy = evaluate_accuracy(
        model, DataLoader(test, batch_size=64, collate_fn=collate), torch.device("cpu")
    )
    return {
        "summary": summary,
        "test_images": len(test),
        "test_accuracy": accuracy,
        "steps": args.steps,
        "seconds": seconds,
        "paired": paired_differences(merged.rows, [parse_method(m) for m in args.methods]),
    }


def paired_differences(rows: list[dict[str, Any]], methods: Sequence[Method]) -> list[dict]:
    """attnlrp minus cp per image (same residual rule): mean and standard error of ID and mass.

    The two modes explain the same images, so the per-image difference is what says whether a
    gap in the table is larger than its noise.
    """
    by_label: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["method"], {})[r["index"]] = r
    out = []
    for m in methods:
        if not m.composite or m.options.get("attention") != "cp":
            continue
        other = Method(m.name, {**m.options, "attention": "attnlrp"})
        if other.label not in by_label:
            continue
        a, b = by_label[m.label], by_label[other.label]
        entry: dict[str, Any] = {"cp": m.label, "attnlrp": other.label}
        for key in ("id", "relevance_mass"):
            d = np.array([float(b[i][key]) - float(a[i][key]) for i in sorted(a)])
            entry[key] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
        out.append(entry)
    return out


def table(summary: dict[str, Any], methods: Sequence[str]) -> str:
    """The report stage's markdown table (model, method, metrics) for the given method specs."""
    rows = []
    for spec in methods:
        label = parse_method(spec).label
        rows.append({"model": ARCH, "method": label, **summary[label]})
    return markdown_table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="data, explain, evaluate settings")
    parser.add_argument("--checkpoint", help="a trained small_vit file: skip training")
    parser.add_argument(
        "--save", help="where the trained model goes (default: outputs/studies/small_vit.pt)"
    )
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=400,
        help="render this many images per class for training (the pipeline's data.per_class "
        "or less: its own train split)",
    )
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=None, help="cap the test images")
    parser.add_argument("--steps", type=int, default=32, help="insertion/deletion/AOPC steps")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--out", help="default: outputs/studies/vit_faithfulness.json")
    args = parser.parse_args(argv)
    ctx = load_context(Path(args.params))
    args.save = Path(args.save or ctx.layout.studies() / "small_vit.pt")
    args.out = Path(args.out or ctx.layout.studies() / "vit_faithfulness.json")
    model, training = train_vit(ctx, args)
    result = run_study(ctx, model, args)
    result["training"] = training
    write_json(args.out, result)
    print(
        f"small_vit test accuracy {result['test_accuracy']:.3f} on {result['test_images']} "
        f"test images; training {training}"
    )
    print(table(result["summary"], args.methods))
    for p in result["paired"]:
        print(
            f"{p['attnlrp']} - {p['cp']}, per image: ID {p['id']['mean']:+.4f} "
            f"(SE {p['id']['se']:.4f}), relevance mass {p['relevance_mass']['mean']:+.4f} "
            f"(SE {p['relevance_mass']['se']:.4f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
