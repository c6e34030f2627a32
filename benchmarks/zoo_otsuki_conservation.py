"""otsuki2024 float32 conservation error per torchvision CNN builder (issue 11), random weights.

Per model, at the zoo test's input sizes and sample counts (nothing is downloaded), at the
published ``otsuki_epsilon=1e-5``: the zoo tests' random statistics (:func:`randomize_statistics`,
what tests/zoo_checks.py checks) and trained-like activation scales
(:func:`calibrate_activations`), each with the stabiliser's share absorbed (the published code)
and spread flat (``stabilizer_share="flat"``, the preset's default).

    OMP_NUM_THREADS=1 python benchmarks/zoo_otsuki_conservation.py [--size PX] [names...]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from calibration import calibrate_activations  # noqa: E402
from test_zoo_torchvision import CNN_BUILDERS, DEFAULT, build, input_size  # noqa: E402
from zoo_checks import make_input, randomize_statistics  # noqa: E402

import lrp  # noqa: E402

SHARES = ("absorb", "flat")
COLUMNS = [(state, share) for state in ("random", "calibrated") for share in SHARES]


def errors(model: torch.nn.Module, x: torch.Tensor, share: str) -> str:
    """Per-sample conservation errors, or the exception's name."""
    try:
        e = lrp.Explainer(model, "otsuki2024", otsuki_epsilon=1e-5, stabilizer_share=share)(x)
    except Exception as err:  # report and go on with the next model
        return f"raises {type(err).__name__}"
    return ", ".join(f"{v:.1e}" for v in lrp.conservation(e).tolist())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="*", default=CNN_BUILDERS)
    parser.add_argument("--size", type=int, help="input px instead of the zoo test's")
    args = parser.parse_args()
    head = " | ".join(f"{state}, {share}" for state, share in COLUMNS)
    print(f"| model | px | n | {head} |\n|---|---|---|" + "---|" * len(COLUMNS))
    for name in args.names:
        size, n = args.size or input_size(name), (1 if name in DEFAULT else 2)
        t = time.perf_counter()
        torch.manual_seed(0)
        model = randomize_statistics(build(name)).eval().requires_grad_(False)
        x = make_input(n, size, torch.float32)
        cells = [errors(model, x, share) for share in SHARES]
        calibrate_activations(model, size)
        cells += [errors(model, x, share) for share in SHARES]
        print(f"| {name} | {size} | {n} | " + " | ".join(cells) + " |", flush=True)
        del model
        gc.collect()
        print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
