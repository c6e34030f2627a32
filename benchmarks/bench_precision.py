"""How much of LRP survives float32, bfloat16 and float16: the numbers behind "relevance is kept in
float32".

The model and the input are cast with ``.to(dtype)``; the engine follows the model's dtype. Each
dtype is compared with float64 (the reference) on the same images and target class (the float64
prediction), worst sample of the batch: conservation error (``lrp.conservation``, sums taken in
float64), the change of the relevance sum against float64 (precision's own share: biases dominate
the conservation error of some models), relative L2 distance, Pearson and Spearman correlation
and top-10 % pixel overlap of the heatmap (relevance summed over channels; insertion/deletion and
pixel flipping rank by it), and the share of relevances that underflow to 0 or are not finite. A
plain input gradient in the same dtypes is the baseline: the error any backward pass picks up at
that precision. A dtype whose kernels are missing on the device is reported with its error.

ResNet-50 has random weights and Gaussian input (nothing is downloaded); ``small_resnet`` and
``lrn_cnn`` are the pipeline's trained models (``outputs/models/*.pt``, skipped when absent) on
images of the synthetic data set.

    python benchmarks/bench_precision.py                   # ResNet-50 (random), batch 2, 224 px
    python benchmarks/bench_precision.py --models resnet50 vgg16 small_resnet lrn_cnn --markdown
    python benchmarks/bench_precision.py --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

import lrp

DTYPES = ("float64", "float32", "bfloat16", "float16")
METHODS = ("epsilon-plus-flat", "otsuki2024", "gradient")
COLUMNS = (
    "model", "method", "dtype", "conservation err", "sum R change vs fp64", "rel. L2 vs fp64",
    "Pearson r", "Spearman rho", "top-10% overlap", "zeroed", "non-finite", "note",
)  # fmt: skip


ROOT = Path(__file__).resolve().parent.parent
TRAINED = ("small_resnet", "lrn_cnn")  # the pipeline's models: outputs/models/<name>.pt, 64 px
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the pipeline's normalisation


def build(name: str) -> nn.Module:
    """Frozen, eval mode. Torchvision models and CaffeNet: random weights, seed 0 (nothing is
    downloaded). ``small_resnet`` / ``lrn_cnn``: the weights the pipeline trained on the synthetic
    shapes (``outputs/models``), for activations and relevance of a trained network's scale."""
    torch.manual_seed(0)
    if name == "caffenet":
        from lrp.models import caffenet

        model = caffenet()
    elif name in TRAINED:
        from torchvision.models.resnet import BasicBlock, ResNet

        from lrp.models import lrn_cnn

        path = ROOT / "outputs" / "models" / f"{name}.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = [v for k, v in state.items() if k.endswith("weight")][-1].shape[0]  # classes
        if name == "small_resnet":  # flows.models.small_resnet, built here to stay import-light
            model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=head)
        else:
            model = lrn_cnn(head)
        model.load_state_dict(state)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    return model.eval().requires_grad_(False)


def inputs(name: str, batch: int, size: int | None, device: str) -> Tensor:
    """float64 input batch: for the trained models, the first image of the first ``batch`` classes
    of the synthetic data set (normalised as in training); otherwise Gaussian noise."""
    if name not in TRAINED:
        size = size or (227 if name == "caffenet" else 224)
        torch.manual_seed(1)
        return torch.randn(batch, 3, size, size, dtype=torch.float64, device=device)
    folders = sorted((ROOT / "data" / "synthetic" / "images").iterdir())[:batch]
    images = [torchvision.io.read_image(str(sorted(f.glob("*.png"))[0]))[:3] for f in folders]
    x = torch.stack(images).double() / 255
    if size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in IMAGENET)
    return ((x - mean) / std).to(device)


@dataclasses.dataclass
class Attribution:
    relevance: Tensor  # as computed, in the model's dtype
    total: Tensor  # per-sample sum of the relevance, summed in float64
    initial: Tensor  # per-sample initial relevance (NaN for the gradient), float64


def explain(method: str, model: nn.Module, x: Tensor, target: Tensor) -> Attribution:
    """LRP with the composite ``method``, or (``gradient``) the plain input gradient of the
    target logit, which conserves nothing."""
    if method == "gradient":
        x = x.detach().requires_grad_(True)
        out = model(x)
        one_hot = torch.zeros_like(out).scatter_(1, target.view(-1, 1), 1.0)
        (g,) = torch.autograd.grad(out, x, one_hot)
        nan = torch.full((x.shape[0],), float("nan"), dtype=torch.float64)
        return Attribution(g, g.double().flatten(1).sum(1), nan)
    e = lrp.Explainer(model, method)(x, target)
    # sums in float64: measure the relevance, not the precision of the final summation
    return Attribution(e.relevance, e.relevance.double().flatten(1).sum(1), e.initial.double())


def compare(a: Attribution, ref: Attribution) -> dict[str, float]:
    """Worst sample of the batch: conservation (``lrp.conservation`` on float64 sums), the change
    of the relevance sum against float64 (the precision's own share of the conservation error,
    which biases dominate), and the agreement of the heatmap (relevance summed over channels)
    with the float64 one. "zeroed": share of input relevances that are exactly 0 where float64
    has a value (underflow)."""
    wide = lrp.Explanation(
        a.relevance.double(), a.relevance.new_zeros(0), target=None, initial=a.initial
    )
    shift = (a.total - ref.total).abs() / ref.initial.abs()
    finite = torch.isfinite(a.relevance)
    zeroed = ((a.relevance == 0) & (ref.relevance != 0)).double().mean()
    h = torch.where(finite, a.relevance, 0).double().sum(1).flatten(1)
    r = ref.relevance.double().sum(1).flatten(1)
    k = max(1, r.shape[1] // 10)
    top_h, top_r = h.topk(k, dim=1).indices, r.topk(k, dim=1).indices
    overlap = [
        len(set(i.tolist()) & set(j.tolist())) / k for i, j in zip(top_h, top_r, strict=True)
    ]
    return {
        "conservation": float(lrp.conservation(wide).max()),
        "shift": float(shift.max()),
        "rel_l2": float(((h - r).norm(dim=1) / r.norm(dim=1)).max()),
        "pearson": float(_corr(h, r).min()),
        "spearman": float(_corr(_ranks(h), _ranks(r)).min()),
        "overlap": min(overlap),
        "zeroed": float(zeroed),
        "nonfinite": float((~finite).double().mean()),
    }


def _ranks(t: Tensor) -> Tensor:
    return t.argsort(dim=1).argsort(dim=1).double()


def _corr(a: Tensor, b: Tensor) -> Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def run_model(args: argparse.Namespace, name: str) -> list[list[str]]:
    if name in TRAINED and not (ROOT / "outputs" / "models" / f"{name}.pt").is_file():
        return [
            [name, "-", "-", *["-"] * (len(COLUMNS) - 4), "skipped: no outputs/models checkpoint"]
        ]
    x64 = inputs(name, args.batch, args.size, args.device)
    with torch.no_grad():
        target = build(name).to(args.device, torch.float64)(x64).argmax(1)
    rows = []
    for method in args.methods:
        ref = None
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            model = build(name).to(args.device, dtype)
            try:
                a = explain(method, model, x64.to(dtype), target)
            except Exception as e:  # a missing low-precision kernel is a result
                note = f"raises {type(e).__name__}: {str(e).splitlines()[0][:90]}"
                rows.append([name, method, dtype_name, *["-"] * (len(COLUMNS) - 4), note])
                continue
            if ref is None:  # the first dtype (float64) is the reference
                ref = a
            m = compare(a, ref)
            rows.append([
                name, method, dtype_name, _fmt(m["conservation"]), _fmt(m["shift"]),
                _fmt(m["rel_l2"]), _corr_fmt(m["pearson"]), _corr_fmt(m["spearman"]),
                f"{m['overlap']:.3f}", f"{m['zeroed']:.1%}", f"{m['nonfinite']:.1%}", "",
            ])  # fmt: skip
    return rows


def _fmt(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1e}"


def _corr_fmt(v: float) -> str:
    return "undefined (heatmap all 0)" if math.isnan(v) else f"{v:.4f}"


def render(rows: list[list[str]], markdown: bool) -> str:
    table = [list(COLUMNS), *rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in table]
        return "\n".join([lines[0], "|" + " --- |" * len(COLUMNS), *lines[1:]])
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["resnet50", *TRAINED],
        help="torchvision names and caffenet (random weights); small_resnet, lrn_cnn (trained)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="composites or 'gradient'")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=None, help="default: 224 (caffenet 227)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    if args.dtypes[0] != "float64":
        p.error("the first dtype is the reference: start --dtypes with float64")
    if args.device.startswith("cuda"):  # exact float32 matmuls: TF32 would blur the fp32 row
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = [row for name in args.models for row in run_model(args, name)]
    print(
        f"date {datetime.date.today().isoformat()}; torch {torch.__version__}; device "
        f"{args.device}; batch {args.batch}; {', '.join(TRAINED)}: trained (outputs/models, "
        "synthetic images), others: random weights and Gaussian input; target = float64 "
        "prediction; heatmap = relevance summed over channels; worst sample of the batch"
    )
    print(render(rows, args.markdown))


if __name__ == "__main__":
    main()
