"""vit_b_16 (random weights), batch 8 at 224 px: the engine's LRP against a plain input gradient.

Prints, per method, the median wall and CPU time of one explanation (forward + backward) over
``--repeat`` calls after one warm-up, the ratio to the gradient's, and the peak memory growth
from before the warm-up call (one-time preparation included). Each method runs in its own
subprocess so peaks do not mix: on CPU the growth of the peak RSS (``ru_maxrss``) over the RSS
after building the model and input; on CUDA ``max_memory_allocated`` over the allocation then. Issue 12 targets: time <= 1.6x,
memory <= 1.5x the gradient's.

    python benchmarks/bench_vit.py --threads 1            # CPU time counts work on a shared host
    LXT_PATH=/tmp/lxt/lxt-2.1 python benchmarks/bench_vit.py --threads 1   # adds LXT's CP-LRP

LXT (2.1, the AttnLRP authors' package) is loaded from its unpacked sdist as in
tests/test_vit_lxt.py: its torchvision-ViT map (``cp_LRP``: GELU identity, LayerNorm std
detached, query/key detached) patched into the torch.nn classes, gradient x input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lrp

METHODS = ("gradient", "lrp-cp", "lrp-attnlrp", "lxt-cp")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _lxt_patch() -> None:
    """LXT's cp_LRP map for torchvision ViT, patched into torch.nn (this subprocess only)."""
    root = Path(os.environ["LXT_PATH"])
    root = root / "lxt" if (root / "lxt").is_dir() else root
    for name in ("lxt", "lxt.efficient", "lxt.efficient.models"):
        stub = types.ModuleType(name)  # package shells: their __init__ imports transformers
        stub.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = stub
    vit_map = importlib.import_module("lxt.efficient.models.vit_torch").cp_LRP
    for target, patch in vit_map.items():
        assert patch(target)


def make_run(method: str, model: nn.Module) -> Callable[[Tensor], Tensor]:
    if method == "gradient":
        def run(x: Tensor) -> Tensor:
            x = x.detach().requires_grad_(True)
            out = model(x)
            (g,) = torch.autograd.grad(out.max(1).values.sum(), x)
            return g
        return run
    if method == "lxt-cp":
        _lxt_patch()

        def run_lxt(x: Tensor) -> Tensor:
            x = x.detach().requires_grad_(True)
            out = model(x)
            (g,) = torch.autograd.grad(out.max(1).values.sum(), x)
            return x.detach() * g
        return run_lxt
    import lrp

    explainer = lrp.Explainer(model, "epsilon-transformer", attention=method.split("-")[1])
    return lambda x: explainer(x).relevance


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    model = vit_b_16().eval().to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    run = make_run(args.method, model)
    run(x)
    sync()  # warm-up (inside the peak: the engine's preparation is a one-time cost it includes)
    walls, cpus = [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        run(x)
        sync()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if args.device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({"wall": statistics.median(walls), "cpu": statistics.median(cpus),
                      "peak_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", choices=METHODS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    methods = [m for m in METHODS if m != "lxt-cp" or os.environ.get("LXT_PATH")]
    results = {}
    for m in methods:
        cmd = [sys.executable, __file__, "--child", "--method", m, "--threads", str(args.threads),
               "--batch", str(args.batch), "--repeat", str(args.repeat), "--device", args.device]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        results[m] = json.loads(out.stdout.strip().splitlines()[-1])
    g = results["gradient"]
    print(f"vit_b_16, batch {args.batch}, 224 px, float32, {args.device}, threads {args.threads}, "
          f"median of {args.repeat}")
    print(f"{'method':<13} {'wall s':>8} {'cpu s':>8} {'x grad (cpu)':>13} {'peak MB':>9} "
          f"{'x grad':>7}")
    for m, r in results.items():
        print(f"{m:<13} {r['wall']:8.2f} {r['cpu']:8.2f} {r['cpu'] / g['cpu']:13.2f} "
              f"{r['peak_mb']:9.0f} {r['peak_mb'] / g['peak_mb']:7.2f}")


if __name__ == "__main__":
    main()
