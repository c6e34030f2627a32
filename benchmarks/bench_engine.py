"""Engine speed and memory against a plain input gradient and Zennit, in one run.

Each measurement runs in its own subprocess so peak memory is not polluted by the others. CPU: peak
RSS minus the RSS after building the model and input, so it includes one-time costs such as the
explainer's prepared copy of the model; CUDA: max_memory_allocated during the timed calls.
Prints one table per model.

    python benchmarks/bench_engine.py                       # VGG-16 b4 and ResNet-50 b8, 224 px, CPU
    python benchmarks/bench_engine.py --models resnet50 --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchvision

DEFAULT_BATCH = {"vgg16": 4, "resnet50": 8}
METHODS = ("inference", "gradient", "lrp", "zennit")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _build(model_name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval().to(device)
    return model.requires_grad_(False)


def _runner(method: str, model: torch.nn.Module, composite: str, residual: str):
    """A zero-argument callable doing one full attribution (or inference) of a fixed batch."""
    if method == "inference":

        def run(x):
            with torch.inference_mode():
                return model(x)

        return run
    if method == "gradient":

        def run(x):
            x = x.detach().requires_grad_(True)
            out = model(x)
            (g,) = torch.autograd.grad(
                out, x, torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)
            )
            return g

        return run
    if method == "lrp":
        import lrp

        explainer = lrp.Explainer(model, composite, residual=residual)
        return lambda x: explainer(x).relevance
    if method == "zennit":
        from zennit.attribution import Gradient
        from zennit.composites import COMPOSITES
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer

        canon = (
            ResNetCanonizer() if isinstance(model, torchvision.models.ResNet) else VGGCanonizer()
        )
        zcomp = COMPOSITES[composite.replace("-", "_")](canonizers=[canon])
        attributor = Gradient(model=model, composite=zcomp)
        attributor.__enter__()

        def run(x):
            out = model(x)
            one_hot = torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)
            return attributor(x, one_hot)[1]

        return run
    raise ValueError(method)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = args.device
    model = _build(args.model, device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    rss_before = _rss_mb()  # before the first call: includes one-time costs (LRP's prepared copy)
    run = _runner(args.method, model, args.composite, args.residual)
    for _ in range(args.warmup):
        run(x)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        run(x)
        sync()
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    print(json.dumps({"median_s": statistics.median(times), "min_s": min(times), "peak_mb": peak}))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    p.add_argument("--batch", type=int, default=None, help="default: vgg16 4, resnet50 8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--composite", default="epsilon-plus-flat")
    p.add_argument("--residual", default="splitting")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(
        f"device={args.device} threads={args.threads} size={args.size} composite={args.composite} "
        f"residual={args.residual} repeat={args.repeat} (median seconds per batch)"
    )
    for model_name in args.models:
        batch = args.batch or DEFAULT_BATCH.get(model_name, 8)
        rows = {}
        for method in args.methods:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "1",
                "--model",
                model_name,
                "--method",
                method,
                "--batch",
                str(batch),
                "--size",
                str(args.size),
                "--device",
                args.device,
                "--composite",
                args.composite,
                "--residual",
                args.residual,
                "--repeat",
                str(args.repeat),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[method] = json.loads(out.strip().splitlines()[-1])
        grad = rows.get("gradient")
        print(f"\n{model_name}, batch {batch}")
        print(
            f"{'method':<12}{'median s':>10}{'img/s':>9}{'x gradient':>12}{'peak MB':>10}{'mem x grad':>12}"
        )
        for method, r in rows.items():
            ratio = r["median_s"] / grad["median_s"] if grad else float("nan")
            mem = r["peak_mb"] / grad["peak_mb"] if grad and grad["peak_mb"] > 0 else float("nan")
            print(
                f"{method:<12}{r['median_s']:>10.3f}{batch / r['median_s']:>9.1f}{ratio:>12.2f}"
                f"{r['peak_mb']:>10.0f}{mem:>12.2f}"
            )


if __name__ == "__main__":
    main()
