"""Time the vectorised LRN rule against a plain gradient through ``F.local_response_norm``.

The rule should cost about as much as one gradient of the layer: it is the backward of LRP's
"modified gradient". Shapes are CaffeNet's two LRN inputs (norm1: 96 x 27 x 27, norm2: 256 x 13 x
13). The methods run round-robin, so a busy machine slows them alike; medians are reported.

    .venv/bin/python benchmarks/bench_lrn.py [--batch 16] [--repeats 20] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lrp.rules.lrn import lrn_contributions, lrn_relevance

LRN = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}


def timeit(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function in milliseconds, interleaved, after two warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 2):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def gradient(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    xg = x.detach().requires_grad_()
    y = F.local_response_norm(xg, **LRN)
    (g,) = torch.autograd.grad(y, xg, R)
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.dtype}, ms (median)")
    header = f"{'shape':>22} | {'F.lrn fwd':>9} | {'fwd+grad':>9} | {'rule eps':>9} | "
    header += f"{'rule a2b1':>9} | {'banded T':>9} | rule/grad"
    print(header)
    print("-" * len(header))
    for C, H in ((96, 27), (256, 13)):
        x = torch.randn(args.batch, C, H, H, dtype=dtype).relu() * 50  # post-ReLU, Caffe scale
        R = torch.randn_like(x)
        t = timeit(
            {
                "fwd": lambda x=x: F.local_response_norm(x, **LRN),
                "grad": lambda x=x, R=R: gradient(x, R),
                "eps": lambda x=x, R=R: lrn_relevance(x, R, **LRN),
                "ab": lambda x=x, R=R: lrn_relevance(
                    x, R, **LRN, form="alpha-beta", rule_alpha=2.0, rule_beta=1.0
                ),
                "band": lambda x=x: lrn_contributions(x, **LRN),
            },
            args.repeats,
        )
        fwd, grad, eps, ab, band = (t[k] for k in ("fwd", "grad", "eps", "ab", "band"))
        shape = f"({args.batch}, {C}, {H}, {H})"
        print(
            f"{shape:>22} | {fwd:9.2f} | {grad:9.2f} | {eps:9.2f} | {ab:9.2f} | {band:9.2f} | "
            f"{eps / grad:.2f}"
        )


if __name__ == "__main__":
    main()
