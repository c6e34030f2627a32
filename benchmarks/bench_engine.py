"""Engine speed and memory against a plain input gradient and Zennit, in one run.

Times: all methods in one process, interleaved round by round (fair under load on a shared
machine). Peak memory: one subprocess per method, so the others do not pollute it. CPU: peak
RSS minus the RSS after building the model and input, so it includes one-time costs such as the
explainer's prepared copy of the model; CUDA: max_memory_allocated during the timed calls.
Prints one table per model.

    python benchmarks/bench_engine.py                       # VGG-16 b4 and ResNet-50 b8, 224 px, CPU
    python benchmarks/bench_engine.py --models resnet50 --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import copy
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


def _peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM: reset by exec, unlike ru_maxrss after fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


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
        peak = _peak_rss_mb() - rss_before
    print(json.dumps({"median_s": statistics.median(times), "min_s": min(times), "peak_mb": peak}))


def time_interleaved(args: argparse.Namespace, model_name: str, batch: int) -> dict[str, dict]:
    """Time all methods in one process, interleaved round by round, so load on a shared machine
    hits them alike; report the median and the minimum per method."""
    torch.set_num_threads(args.threads)
    model = _build(model_name, args.device)
    x = torch.randn(batch, 3, args.size, args.size, device=args.device)
    # own copy per method: Zennit's canonizers and hooks change the model they attach to
    runs = {m: _runner(m, copy.deepcopy(model), args.composite, args.residual) for m in args.methods}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(args.warmup):
        for run in runs.values():
            run(x)
    for _ in range(args.repeat):
        for method, run in runs.items():
            sync()
            t0 = time.perf_counter()
            run(x)
            sync()
            times[method].append(time.perf_counter() - t0)
    return {m: {"median_s": statistics.median(t), "min_s": min(t)} for m, t in times.items()}


def peak_memory(args: argparse.Namespace, model_name: str, batch: int, method: str) -> float:
    cmd = [sys.executable, __file__, "--worker", "1", "--model", model_name, "--method", method,
           "--batch", str(batch), "--size", str(args.size), "--device", args.device,
           "--composite", args.composite, "--residual", args.residual,
           "--repeat", "1", "--warmup", "1", "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    p.add_argument("--batch", type=int, default=None, help="default: vgg16 4, resnet50 8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--composite", default="epsilon-plus-flat")
    p.add_argument("--residual", default="splitting")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"device={args.device} threads={args.threads} size={args.size} composite={args.composite} "
          f"residual={args.residual} repeat={args.repeat} (seconds per batch; methods interleaved)")
    for model_name in args.models:
        batch = args.batch or DEFAULT_BATCH.get(model_name, 8)
        rows = time_interleaved(args, model_name, batch)
        for method in rows:
            rows[method]["peak_mb"] = peak_memory(args, model_name, batch, method)
        grad = rows.get("gradient")
        print(f"\n{model_name}, batch {batch}")
        print(f"{'method':<11}{'median s':>9}{'min s':>8}{'img/s':>7}{'x grad (median)':>17}"
              f"{'x grad (min)':>14}{'peak MB':>9}{'mem x grad':>12}")
        for method, r in rows.items():
            rm = r["median_s"] / grad["median_s"] if grad else float("nan")
            rn = r["min_s"] / grad["min_s"] if grad else float("nan")
            mem = r["peak_mb"] / grad["peak_mb"] if grad and grad["peak_mb"] > 0 else float("nan")
            print(f"{method:<11}{r['median_s']:>9.3f}{r['min_s']:>8.3f}{batch / r['median_s']:>7.1f}"
                  f"{rm:>17.2f}{rn:>14.2f}{r['peak_mb']:>9.0f}{mem:>12.2f}")


if __name__ == "__main__":
    main()
