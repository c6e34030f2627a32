"""Throughput of batched insertion + deletion vs a per-image loop and vs plain inference.

Insertion + deletion needs 2 * (steps + 1) forwards per image, so the physical limit is the
model's inference throughput divided by that number; the "ratio" column says how close we get.

Default (about 1-3 min on 2 CPU cores):  python benchmarks/bench_metrics.py
Full size (the paper's setting, GPU):    python benchmarks/bench_metrics.py --model resnet50 \
    --size 224 --n 64 --steps 100 --device cuda --batch-size 256
Heat-quantized maps, tied pixels moved together (only distinct inputs are forwarded: at most
levels + 1 per curve):                   python benchmarks/bench_metrics.py --quantize 8 \
    --ties threshold
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from lrp.metrics import insertion_deletion
from lrp.postprocess import heat_quantization


class Counting(torch.nn.Module):
    """Counts the inputs the metric forwards (distinct perturbed images plus the clean pass)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.inner(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet18", help="torchvision model name (random weights)")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--n", type=int, default=4, help="images")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="forwards per batch")
    p.add_argument(
        "--loop-images", type=int, default=None, help="images for the per-image loop (default: --n)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ties", default="rank", choices=("rank", "threshold"))
    p.add_argument("--quantize", type=int, default=0, help="heat-quantize to N levels (0: raw)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval().to(device)
    x = torch.randn(args.n, 3, args.size, args.size, device=device)
    heat = torch.randn(args.n, args.size, args.size, device=device)
    if args.quantize:
        heat = heat_quantization(heat, args.quantize)
    forwards_per_image = 2 * (args.steps + 1)
    common = dict(steps=args.steps, baseline="zero", score="softmax", ties=args.ties)

    # warm-up (allocator, cudnn autotune, first-call overheads)
    insertion_deletion(model, x[:1], heat[:1], steps=2, batch_size=args.batch_size)

    t_batched = _timed(
        lambda: insertion_deletion(model, x, heat, batch_size=args.batch_size, **common), device
    )
    counting = Counting(model)
    insertion_deletion(counting, x, heat, batch_size=args.batch_size, **common)
    run_per_image = counting.rows / args.n
    m = args.loop_images or args.n

    def loop() -> None:
        for i in range(m):  # one image, one step per forward: what per-image metric code does
            insertion_deletion(model, x[i : i + 1], heat[i : i + 1], batch_size=1, **common)

    t_loop = _timed(loop, device)

    total = args.n * forwards_per_image  # the limit: inference of every step of every image
    batch = torch.randn(min(args.batch_size, total), 3, args.size, args.size, device=device)

    def inference() -> None:
        with torch.inference_mode():
            done = 0
            while done < total:
                k = min(batch.shape[0], total - done)
                model(batch[:k]).float().softmax(1)
                done += k

    t_inf = _timed(inference, device)
    ips_batched = args.n / t_batched
    ips_loop = m / t_loop
    ips_limit = args.n / t_inf  # images/s if the metric cost only its forwards
    print(
        f"model={args.model} size={args.size} n={args.n} steps={args.steps} "
        f"forwards/image={forwards_per_image} (run: {run_per_image:.1f}, the rest are repeats) "
        f"ties={args.ties} quantize={args.quantize} batch={args.batch_size} device={device} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"{'variant':32} {'images/s':>10} {'x loop':>8} {'of limit':>9}")
    rows = [
        ("insertion+deletion, batched", ips_batched),
        ("insertion+deletion, per-image loop", ips_loop),
        ("plain inference (same #forwards)", ips_limit),
    ]
    for name, ips in rows:
        print(f"{name:32} {ips:10.3f} {ips / ips_loop:8.2f} {ips / ips_limit:9.2%}")


if __name__ == "__main__":
    main()
