"""Otsuki et al. (2024) Table 1 layout: methods x Ins / Del / ID, raw and heat-quantized.

    python -m lrp.metrics.table --model resnet50 --weights imagenet --images /data/val --n 1000
    python -m lrp.metrics.table --model ckpt.pt --images /data/cub/test --target label
    python -m lrp.metrics.table            # offline smoke run: random resnet18, random images

Protocol defaults follow Otsuki et al.: 500 pixels per step, zero baseline, softmax of the scored
class, trapezoid AUC; ``--ties threshold`` reproduces their tie handling (tied pixels move together,
which flatters quantized maps: both tables are printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lrp.baselines import BASELINES, lrp_methods, make_attributor
from lrp.errors import InvalidInputError
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


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (name, options); values as int/float/str."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidInputError(f"method spec {spec!r}: option {item!r} is not key=value")
        options[key.strip()] = _parse_value(value.strip())
    return name.strip(), options


def _parse_value(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


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
    attributors = [make_attributor(model, name, **opts) for name, opts in specs]
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
        name, opts = specs[i]
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
                    "method": name,
                    "method_options": opts,
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


def _load_model(spec: str, weights: str, num_classes: int | None) -> nn.Module:
    import torchvision

    if spec.endswith((".pt", ".pth")):
        obj = torch.load(spec, map_location="cpu", weights_only=False)
        if isinstance(obj, nn.Module):
            return obj
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if state is None:
            raise InvalidInputError(f"--model {spec}: neither a module nor a state dict")
        arch = next((a for a in ("resnet50", "resnet18") if a in spec), "resnet50")
        k = state["fc.weight"].shape[0]
        model = getattr(torchvision.models, arch)(num_classes=k)
        model.load_state_dict(state)
        return model
    if not hasattr(torchvision.models, spec):
        raise InvalidInputError(f"--model {spec!r}: not a torchvision model name or .pt file")
    if weights == "imagenet":  # uses (and may download to) the torch hub cache
        return getattr(torchvision.models, spec)(weights="DEFAULT")
    return getattr(torchvision.models, spec)(num_classes=num_classes or 1000)


def _batches(args: argparse.Namespace) -> tuple[list[tuple[Tensor, Tensor | None]], str]:
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
        prog="python -m lrp.metrics.table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="resnet18", help="torchvision name or a .pt/.pth file")
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
    model = _load_model(args.model, args.weights, None).eval().to(args.device)
    batches, source = _batches(args)
    if source == "random":
        print(
            f"No --images: {args.n} random images, model {args.model} with {args.weights} "
            "weights. Numbers only show that the pipeline runs.",
            file=sys.stderr,
        )
    methods = args.methods or [m for m in DEFAULT_METHODS if m in BASELINES or m in lrp_methods()]
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
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
