"""Otsuki et al. (2024) Table 1 layout: methods x Ins / Del / ID, raw and heat-quantized.

    python -m flows.studies.otsuki_table --model small_resnet      # the pipeline's trained model
    python -m flows.studies.otsuki_table --checkpoint m.pt --images /data/cub/test --target label
    python -m flows.studies.otsuki_table --model resnet50 --weights imagenet --images /data/val
    python -m flows.studies.otsuki_table --model resnet18  # offline smoke run: random images

``--model`` naming an architecture of ``params.yaml`` scores the model the train stage wrote
(``outputs/models/<model>.pt``, rebuilt from its recorded architecture) on the pipeline's own
explain split and writes ``outputs/studies/otsuki_table_<model>.json`` (not a DVC output).

Protocol defaults follow Otsuki et al.: 500 pixels per step, zero baseline, softmax of the scored
class, trapezoid AUC; ``--ties threshold`` reproduces their tie handling (tied pixels move together,
which flatters quantized maps: both tables are printed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader

from flows import models
from flows.config import ParamsError
from flows.context import Context, dataset, load_context, load_trained
from flows.data import collate
from flows.io import write_json
from flows.methods import MethodError, parse_method
from lrp.baselines import BASELINES, lrp_methods, make_attributor
from lrp.metrics.insertion_deletion import insertion_deletion
from lrp.postprocess import heat_quantization, reduce_channels

_FIELDS = ("insertion", "deletion", "id", "n")

DEFAULT_METHODS = (
    "gradient",
    "integrated-gradients",
    "guided-backprop",
    "grad-cam",
    "score-cam",
    "random",
    "epsilon-plus-flat",
    "otsuki2024",
)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    methods: Sequence[str],
    *,
    quantize: Sequence[bool] = (False, True),
    levels: int = 8,
    reduce: str = "sum",
    device: torch.device | str | None = None,
    **metric_options: Any,
) -> list[dict[str, Any]]:
    """Insertion / deletion / ID of every method, with and without heat quantization.

    ``batches`` yields ``(images, target)`` (target None: the predicted class). Methods are specs
    for :func:`parse_method`; each is prepared once. ``metric_options`` go to
    :func:`lrp.metrics.insertion_deletion`. Returns one row per (method, quantized) with the means
    over all images, the image count, and the full parameter log.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    specs = [parse_method(m) for m in methods]
    attributors = [make_attributor(model, s.name, **s.options) for s in specs]
    sums: dict[tuple[int, bool], dict[str, float]] = {}
    params: dict[tuple[int, bool], dict[str, Any]] = {}
    for x, target in batches:
        x = x.to(device)
        t = target.to(device) if target is not None else None
        for i, attributor in enumerate(attributors):
            heat = reduce_channels(attributor(x, t).detach().float(), reduce)
            for q in quantize:
                h = heat_quantization(heat, levels) if q else heat
                res = insertion_deletion(model, x, h, t, **metric_options)
                acc = sums.setdefault((i, q), dict.fromkeys(_FIELDS, 0))
                acc["insertion"] += float(res.insertion.sum())
                acc["deletion"] += float(res.deletion.sum())
                acc["id"] += float(res.id.sum())
                acc["n"] += x.shape[0]
                params[(i, q)] = res.params
    rows = []
    for (i, q), acc in sums.items():
        n = acc["n"]
        rows.append(
            {
                "method": methods[i],
                "quantized": q,
                "insertion": acc["insertion"] / n,
                "deletion": acc["deletion"] / n,
                "id": acc["id"] / n,
                "n": n,
                "params": {
                    **params[(i, q)],
                    "method": specs[i].name,
                    "method_options": specs[i].options,
                    "reduce": reduce,
                    "heat_quantization": levels if q else None,
                },
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Methods x (Ins / Del / ID in %) for raw maps and for heat-quantized maps, side by side."""
    by = {(r["method"], r["quantized"]): r for r in rows}
    names = list(dict.fromkeys(r["method"] for r in rows))
    width = max([len(n) for n in names] + [6])

    def cells(r: dict[str, Any] | None) -> str:
        if r is None:
            return f"{'-':>6} {'-':>6} {'-':>6}"
        return f"{100 * r['insertion']:6.1f} {100 * r['deletion']:6.1f} {100 * r['id']:6.1f}"

    head = f"{'':{width}} | {'raw map':^20} | {'heat quantization':^20}"
    sub = f"{'method':{width}} | {'Ins':>6} {'Del':>6} {'ID':>6} | {'Ins':>6} {'Del':>6} {'ID':>6}"
    lines = [head, sub, "-" * len(sub)]
    for n in names:
        lines.append(f"{n:{width}} | {cells(by.get((n, False)))} | {cells(by.get((n, True)))}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _load_model(args: argparse.Namespace, ctx: Context | None) -> nn.Module:
    """A pipeline model (trained file, recorded architecture), a model file, or torchvision."""
    if ctx is not None:
        return load_trained(ctx, args.model, len(dataset(ctx, "all").classes))
    if args.checkpoint:
        return models.load_trained(Path(args.checkpoint), architecture=args.architecture)
    models.check_name(args.model)
    if args.weights == "imagenet":  # uses (and may download to) the torch hub cache
        return torchvision.models.get_model(args.model, weights="DEFAULT")
    return torchvision.models.get_model(args.model, num_classes=1000)


def _batches(
    args: argparse.Namespace, ctx: Context | None
) -> tuple[list[tuple[Tensor, Tensor | None]], str]:
    if ctx is not None:
        ds = dataset(ctx, ctx.params.explain.split, args.n)
        loader = DataLoader(ds, batch_size=args.batch, collate_fn=collate)
        label = args.target == "label"
        return [(b["image"], b["label"] if label else None) for b in loader], str(ds.root)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    if args.images is None:
        g = torch.Generator().manual_seed(args.seed)
        x = (torch.rand(args.n, 3, args.size, args.size, generator=g) - mean) / std
        return [(x[i : i + args.batch], None) for i in range(0, args.n, args.batch)], "random"
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize(int(args.size * 256 / 224)),
            transforms.CenterCrop(args.size),
            transforms.ToTensor(),
            transforms.Normalize(mean.flatten().tolist(), std.flatten().tolist()),
        ]
    )
    ds = datasets.ImageFolder(args.images, transform=tf)
    n = min(args.n, len(ds))
    idx = torch.linspace(0, len(ds) - 1, n).round().long().tolist()  # spread over classes
    out = []
    for i in range(0, n, args.batch):
        items = [ds[j] for j in idx[i : i + args.batch]]
        x = torch.stack([im for im, _ in items])
        y = torch.tensor([lab for _, lab in items]) if args.target == "label" else None
        out.append((x, y))
    return out, args.images


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.studies.otsuki_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="resnet18",
                   help="an architecture of --params (its trained model) or a torchvision name")
    p.add_argument("--params", default="params.yaml", help="the pipeline's params file")
    p.add_argument("--checkpoint", default=None, help="a model file instead of --model")
    p.add_argument("--architecture", default=None,
                   help="architecture of --checkpoint when the file does not record it")
    p.add_argument("--weights", choices=("random", "imagenet"), default="random")
    p.add_argument("--images", default=None, help="ImageFolder directory (default: random images)")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8, help="images per attribution batch")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="names or name:key=value,... (default: baselines + LRP composites)",
    )
    p.add_argument(
        "--target",
        choices=("predicted", "label"),
        default="predicted",
        help="'label' needs folder indices equal to the model's class indices",
    )
    p.add_argument("--pixels-per-step", type=int, default=500)
    p.add_argument("--baseline", default="zero", choices=("zero", "blur", "mean", "uniform"))
    p.add_argument("--score", default="softmax", choices=("softmax", "logit"))
    p.add_argument("--ties", default="rank", choices=("rank", "threshold"))
    p.add_argument("--reduce", default="sum", choices=("sum", "abs-sum", "max-abs", "l2"))
    p.add_argument("--levels", type=int, default=8)
    p.add_argument("--metric-batch", type=int, default=128, help="forwards per metric batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows (with params) here")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    try:
        ctx = _pipeline_context(args)
        model = _load_model(args, ctx).eval().to(args.device)
        methods = [parse_method(m).spec for m in args.methods] if args.methods else None
    except (models.ModelError, ParamsError, MethodError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ctx is not None:
        args.size = ctx.params.data.image_size
        args.json = args.json or str(ctx.layout.studies() / f"otsuki_table_{args.model}.json")
    batches, source = _batches(args, ctx)
    if source == "random":
        print(
            f"No --images: {args.n} random images, model {args.model} with {args.weights} "
            "weights. Numbers only show that the pipeline runs.",
            file=sys.stderr,
        )
    methods = methods or [m for m in DEFAULT_METHODS if m in BASELINES or m in lrp_methods()]
    rows = evaluate(
        model,
        batches,
        methods,
        levels=args.levels,
        reduce=args.reduce,
        device=args.device,
        pixels_per_step=args.pixels_per_step,
        baseline=args.baseline,
        score=args.score,
        ties=args.ties,
        batch_size=args.metric_batch,
        seed=args.seed,
    )
    print(
        f"model={args.model} weights={args.weights} data={source} n={rows[0]['n']} "
        f"size={args.size} pps={args.pixels_per_step} baseline={args.baseline} "
        f"score={args.score} target={args.target} ties={args.ties} reduce={args.reduce} "
        f"levels={args.levels}"
    )
    print(format_table(rows))
    if args.json:
        write_json(Path(args.json), rows)
        print(f"rows written to {args.json}", file=sys.stderr)
    return 0


def _pipeline_context(args: argparse.Namespace) -> Context | None:
    """The pipeline's context when ``--model`` is one of its architectures (and no checkpoint)."""
    if args.checkpoint or not Path(args.params).is_file():
        return None
    ctx = load_context(args.params)
    return ctx if args.model in ctx.params.model.architectures else None


if __name__ == "__main__":
    raise SystemExit(main())
