"""What z+'s empty-output fallback costs: the engine with ``empty="flat"`` (the default, which
keeps z+ conservative at outputs with no positive contribution) against ``empty="drop"`` (the
plain rule, Zennit's; a measurement only: it loses that relevance), and a plain input gradient.

Each mode runs in its own process, alternating, ``--pairs`` times (on a shared VM the times of
one process drift by tens of percent); per process the median of ``--repeat`` calls after one
warm-up. Model, batch, input size and gradient are ``bench_engine.py``'s (random weights,
BatchNorm statistics from random inputs).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_zplus_empty.py --model mobilenet_v3_large
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_engine import MODELS, _gradient, build_model, model_shape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lrp

import lrp
from lrp.rules import AlphaBeta


def _median_s(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(model_name: str, empty: str, repeat: int, threads: int) -> dict[str, float]:
    """One process: the gradient's and the engine's median seconds with ``empty``."""
    torch.set_num_threads(threads)
    model = build_model(model_name, "cpu")
    batch, size = model_shape(model_name)
    x = torch.randn(batch, 3, size, size)
    gradient = _gradient(model)
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    for module in explainer.prepared_model().modules():
        rule = getattr(module, "rule", None)
        if isinstance(rule, AlphaBeta):
            rule.empty = empty
    return {"gradient": _median_s(lambda: gradient(x), repeat),
            "lrp": _median_s(lambda: explainer(x), repeat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="mobilenet_v3_large", choices=sorted(MODELS))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=("flat", "drop"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.repeat, args.threads)))
        return
    batch, size = model_shape(args.model)
    print(f"{args.model}, batch {batch}, {size} px, {args.threads} thread(s), "
          f"median of {args.repeat}")
    print("| empty | gradient s | engine s | x gradient |\n| --- | --- | --- | --- |")
    for _ in range(args.pairs):
        for empty in ("flat", "drop"):
            out = subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--repeat", str(args.repeat),
                 "--threads", str(args.threads), "--worker", empty],
                capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {empty} | {r['gradient']:.3f} | {r['lrp']:.3f} | "
                  f"{r['lrp'] / r['gradient']:.2f} |")


if __name__ == "__main__":
    main()
