"""Where the time of this engine and of a plain input gradient goes: the layers' linear algebra
(convolutions, their transposes, matrix products) against everything else, and the ratio to the
gradient that the engine's linear algebra alone sets (its floor for ``bench_engine.py``'s
"x grad" column).

Why: z+ on a layer whose input is signed (after SiLU, Hardswish, GELU or a residual sum) needs,
besides the layer's own forward, the denominators x+ W+ + x- W- and both transposes x+ W+^T s,
x- W-^T s: five convolution units against the gradient's two (forward, input transpose). On
EfficientNet-B0 every convolution has signed input. This table says how much of a time target
that leaves for everything else (sign splits, divisions, the empty-output fallback, activations).

Model, input, gradient and engine are ``bench_engine.py``'s (random weights, calibrated
BatchNorm, ``epsilon-plus-flat``, ``residual="splitting"``). Wall times: medians of ``--repeat``
interleaved rounds (``bench_engine.interleave``). Linear-algebra seconds: medians of as many more
calls of each method under a dispatch mode that clocks each such aten call; the mode's own cost
falls outside the clocked calls, so "rest" is the wall time minus them. "MB faulted": memory
first touched per call (minor page faults, several microseconds per 4 KiB on a VM). A method
pays its faults in wall time, and how much it faults moves with what ran before it in the
process: one reason the ratio moves from run to run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_engine_floor.py --markdown
    python benchmarks/bench_engine_floor.py --models resnet50 efficientnet_b0 --target 1.5
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_engine import (
    _engine,
    _gradient,
    build_model,
    interleave,
    model_shape,
    render,
    setup,
)
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lrp

#: aten calls that are a layer's linear algebra (forward, transposes, weight-free matmuls)
LINEAR_ALGEBRA = frozenset(
    {"convolution", "convolution_backward", "mm", "addmm", "bmm", "baddbmm"}
)


class LinearAlgebraClock(TorchDispatchMode):
    """Seconds and calls spent in :data:`LINEAR_ALGEBRA` aten calls while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        if func.overloadpacket.__name__ not in LINEAR_ALGEBRA:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def linear_algebra(run: Any, x: torch.Tensor, repeat: int) -> tuple[float, int, float]:
    """Median linear-algebra seconds of ``run(x)``, its number of such calls, and the median MB
    of memory it touched for the first time (minor page faults: each costs the kernel time that
    a call which reuses its memory does not pay; on a VM several microseconds per 4 KiB)."""
    clocks, faulted = [], []
    for _ in range(repeat):
        clock = LinearAlgebraClock()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with clock:
            run(x)
        faulted.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        clocks.append(clock)
    page_mb = resource.getpagesize() / 2**20
    return (statistics.median(c.seconds for c in clocks), clocks[0].calls,
            statistics.median(faulted) * page_mb)


def measure(name: str, repeat: int) -> dict[str, dict[str, float]]:
    """Wall and linear-algebra seconds (and calls) of the gradient and the engine on ``name``."""
    model = build_model(name, "cpu")
    batch, size = model_shape(name)
    x = torch.randn(batch, 3, size, size)
    runs = {"gradient": _gradient(model), "lrp": _engine(model, "epsilon-plus-flat", "splitting")[0]}
    walls = interleave({m: (lambda r=r: r(x)) for m, r in runs.items()}, repeat, 1, "cpu")
    out = {}
    for method, run in runs.items():
        seconds, calls, faulted_mb = linear_algebra(run, x, repeat)
        out[method] = {"wall": statistics.median(walls[method][0]), "la": seconds, "calls": calls,
                       "faulted_mb": faulted_mb}
    return out


def row(name: str, m: dict[str, dict[str, float]], target: float) -> list[str]:
    g, e = m["gradient"], m["lrp"]
    return [
        name,
        f"{g['wall']:.3f} ({g['la']:.3f}, {g['calls']:.0f}, {g['faulted_mb']:.0f})",
        f"{e['wall']:.3f} ({e['la']:.3f}, {e['calls']:.0f}, {e['faulted_mb']:.0f})",
        f"{e['wall'] / g['wall']:.2f}",
        f"{e['la'] / g['wall']:.2f}",
        f"{e['wall'] - e['la']:.3f}",
        f"{target * g['wall'] - e['la']:.3f}",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["efficientnet_b0", "mobilenet_v3_large",
                                                   "resnet50"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target", type=float, default=1.6, help="time target, x gradient")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    setup("cpu", args.threads, tf32=False)
    what = "s (lin. alg. s, calls, MB faulted)"
    columns = ["model", f"gradient {what}", f"engine {what}", "x grad",
               "floor: engine lin. alg. / gradient", "engine rest s",
               f"rest budget at {args.target}x s"]
    rows = []
    for name in args.models:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(row(name, measure(name, args.repeat), args.target))
    print(f"CPU, {args.threads} thread(s), median of {args.repeat} rounds")
    print(render(rows, args.markdown, columns))


if __name__ == "__main__":
    main()
