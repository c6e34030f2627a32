"""One table per run: speed and peak memory of this LRP engine against a plain input gradient,
Zennit and Captum (ResNet-50, VGG-16, CaffeNet, EfficientNet-B0, DenseNet-121, MobileNetV3-Large,
ConvNeXt-T, RegNetY-400MF), and of batched insertion/deletion against the pure inference cost of
its forwards. The engine's preparation (tracing the model and building the prepared copy, once per
explainer) is timed separately and printed below the table.

Zennit has canonizers for VGG and torchvision's ResNet only. On the other models it runs without
one: its rules hook the layers, and every residual addition, concatenation and gating product is
differentiated as a plain gradient, silently; those rows are labelled and their conservation error
("cons. err") is the comparison that matters, not only their speed.

Times: all methods of one model run in one process, interleaved round by round; "x grad" and
"x inf" are medians of the per-round ratios to the gradient / inference of that round, which stay
right when the machine's speed changes between rounds (other jobs on a shared host). "x grad (CPU
s)" is the same with the process's CPU time: with --threads 1 it counts the work done whatever
share of the cores other jobs leave (with more threads, OpenMP spin-waits inflate it under load).
Peak memory: one subprocess per method, so the others do not pollute it. CPU: growth of the RSS
high-water mark (VmHWM) over the RSS after building the model and input, with glibc's mmap
threshold fixed (``MALLOC_ENV``) so that it is the peak of live tensors; CUDA: growth of
max_memory_allocated over the allocation after building them. Both include one-time costs such as
the engine's prepared copy of the model.

Every LRP method is run once before timing and its relevance checked against the explained logit
(relative conservation error, max over the batch); a method that fails or whose relevance is not
finite or off by more than --max-conservation-error is reported as n/a with the reason.

    python benchmarks/bench_engine.py --repeat 5                 # CPU, all models and methods
    python benchmarks/bench_engine.py --repeat 5 --threads 1 --markdown   # shared CPU host
    python benchmarks/bench_engine.py --device cuda --repeat 20 --markdown
    python benchmarks/bench_engine.py --models resnet50 --methods gradient lrp zennit
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata

import torch
import torchvision
from calibration import batchnorm_statistics
from torch import Tensor, nn

# model -> (default batch, input size): CaffeNet's native input is 227 px; batches keep one CPU
# round of the heavier models (DenseNet-121, ConvNeXt-T) to a few seconds
MODELS = {
    "resnet50": (8, 224),
    "vgg16": (4, 224),
    "caffenet": (8, 227),
    "efficientnet_b0": (8, 224),
    "densenet121": (4, 224),
    "mobilenet_v3_large": (8, 224),
    "convnext_tiny": (4, 224),
    "regnet_y_400mf": (8, 224),
}
ZENNIT_CANONIZED = ("resnet50", "vgg16")
ATTRIBUTION = ("inference", "gradient", "lrp", "zennit", "captum")
METHODS = (*ATTRIBUTION, "insdel")
LRP_METHODS = ("lrp", "zennit", "captum")
INSDEL_REF = "insdel-inference"  # plain inference over the same forwards as insertion/deletion

Run = Callable[[Tensor], object]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Result:
    """One table row; ``skip`` holds the reason when the method does not apply to the model."""

    model: str
    method: str
    label: str
    batch: int
    block: str = ""  # rows with the same block were timed in the same interleaved rounds
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    conservation: float | None = None
    prepare_s: float | None = None  # the engine only: preparing its copy (tracing), once
    note: str | None = None
    skip: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


# ---------------------------------------------------------------------------- environment
def setup(device: str, threads: int, tf32: bool) -> None:
    """Same thread count in the timing process and the memory workers; TF32 and cuDNN autotuning
    on CUDA as a production user would run (the rules are linear algebra like the gradient)."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True


def sync_fn(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


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


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_state() -> str:
    """Commit measured, and whether lrp/ had uncommitted edits (the numbers then describe them)."""

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "lrp")
    return commit + (" + uncommitted changes in lrp/" if dirty else "")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()} ({os.cpu_count()} logical cores)"


# ---------------------------------------------------------------------------- models and methods
def model_shape(name: str) -> tuple[int, int]:
    """Default batch and input size: ``MODELS``', else 8 at 224 px (any torchvision model)."""
    return MODELS.get(name, (8, 224))


def build_model(name: str, device: str) -> nn.Module:
    """Random weights (seed 0, nothing downloaded), eval mode, frozen parameters: the gradient
    baseline then computes only the input gradient, as LRP does.

    BatchNorm running statistics are set from 16 random inputs, as a trained network's are from
    its data: with torchvision's default statistics the random EfficientNet-B0 and
    MobileNetV3-Large give logits of 1e-14 and 1e-10, every method then works on vanishing (and
    partly subnormal, slow) numbers and no relevance survives an absolute stabiliser."""
    torch.manual_seed(0)
    if name == "caffenet":
        from lrp.models import caffenet

        model = caffenet()
    else:
        model = getattr(torchvision.models, name)(weights=None)
    size = model_shape(name)[1]
    batchnorm_statistics(model, torch.randn(16, 3, size, size))
    return model.eval().to(device).requires_grad_(False)


def _one_hot_argmax(out: Tensor) -> Tensor:
    return torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)


def _predicted_logit(out: Tensor) -> Tensor:
    """Initial relevance = the predicted logit, as this engine and Captum start from (Zennit's
    rules propagate whatever output vector they are given)."""
    return _one_hot_argmax(out) * out


def _inference(model: nn.Module) -> Run:
    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def _gradient(model: nn.Module) -> Run:
    """Gradient of the predicted logit w.r.t. the input: one forward, one backward."""

    def run(x: Tensor) -> Tensor:
        x = x.detach().requires_grad_(True)
        out = model(x)
        return torch.autograd.grad(out, x, _one_hot_argmax(out))[0]

    return run


def _engine(model: nn.Module, composite: str, residual: str) -> tuple[Run, float, bool]:
    """The explainer, the seconds its preparation took (trace + prepared copy), which happens
    once per explainer and is not part of the timed calls, and whether the model has residual
    merges (where ``residual`` applies)."""
    import lrp

    explainer = lrp.Explainer(model, composite, residual=residual)
    t0 = time.perf_counter()
    prepared = explainer.prepared_model()
    prepare_s = time.perf_counter() - t0
    merges = any(isinstance(m, lrp.rules.ResidualMerge) for m in prepared.modules())
    return (lambda x: explainer(x).relevance), prepare_s, merges


def _zennit(model: nn.Module, model_name: str) -> tuple[Run, str | None]:
    """Zennit's EpsilonPlusFlat with the matching canonizer. Zennit has no LRN rule: CaffeNet's
    LRN layers get its ``Pass`` rule (relevance passes unchanged), which is labelled."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.rules import Pass
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    canonizers = {"resnet50": [ResNetCanonizer()], "vgg16": [VGGCanonizer()]}.get(model_name, [])
    layer_map = [(nn.LocalResponseNorm, Pass())]
    composite = EpsilonPlusFlat(canonizers=canonizers, layer_map=layer_map)
    attributor = Gradient(model=model, composite=composite)
    attributor.__enter__()  # hooks stay registered: each call is one forward and one backward
    has_lrn = any(isinstance(m, nn.LocalResponseNorm) for m in model.modules())
    note = "Zennit has no LRN rule: LRN layers pass relevance unchanged (zennit.rules.Pass)"
    if model_name not in ZENNIT_CANONIZED and model_name != "caffenet":
        note = (
            f"Zennit has no canonizer for {model_name}: BatchNorm is not folded and its "
            "additions, concatenations and gates get the plain gradient, without a warning; "
            "compare its conservation error"
        )
        return (lambda x: attributor(x, _predicted_logit)[1]), note
    return (lambda x: attributor(x, _predicted_logit)[1]), (note if has_lrn else None)


class _FunctionalFlatten(nn.Module):
    """CaffeNet with ``torch.flatten`` in ``forward`` (as torchvision's VGG/AlexNet): Captum's LRP
    raises on an ``nn.Flatten`` module, having no rule for it; the computation is identical."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features, self.avgpool, self.classifier = net.features, net.avgpool, net.classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _captum(model: nn.Module, target: Tensor) -> tuple[Run, str | None]:
    """``captum.attr.LRP`` with its default rules (epsilon everywhere; it has no z+ or flat
    composite). The target is given, as Captum requires; it does two forwards and one backward.
    Captum has no LRN rule either: LRN layers get its ``IdentityRule`` (pass-through), labelled."""
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import IdentityRule

    if isinstance(model, nn.Sequential) and any(isinstance(m, nn.Flatten) for m in model):
        model = _FunctionalFlatten(model)
    lrn = [m for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
    note = "Captum has no LRN rule: LRN layers pass relevance unchanged (IdentityRule)"
    attributor = LRP(model)
    warnings.filterwarnings("ignore", "Input Tensor 0 did not already require gradients")

    def run(x: Tensor) -> Tensor:
        for m in lrn:  # Captum deletes every `rule` attribute after each call
            m.rule = IdentityRule()
        return attributor.attribute(x, target=target)

    return run, (note if lrn else None)


def make_runner(
    method: str, model: nn.Module, model_name: str, target: Tensor, args: argparse.Namespace
) -> tuple[Run, str | None]:
    """A one-argument callable doing one full attribution (or inference) of a batch, and a note
    for the table when the method had to be adapted to the model."""
    if method == "inference":
        return _inference(model), None
    if method == "gradient":
        return _gradient(model), None
    if method == "lrp":
        return _engine(model, args.composite, args.residual)[0], None
    if method == "zennit":
        return _zennit(model, model_name)
    if method == "captum":
        return _captum(model, target)
    raise ValueError(f"unknown method {method!r}")


def label(method: str, model_name: str, args: argparse.Namespace, merges: bool = False) -> str:
    """The row's method label; the engine's names its residual mode where the model merges."""
    canonizer = {"resnet50": ", ResNetCanonizer", "vgg16": ", VGGCanonizer"}.get(
        model_name, "" if model_name == "caffenet" else ", no canonizer"
    )
    return {
        "inference": "inference",
        "gradient": "gradient",
        "lrp": f"**this engine** ({args.composite}{', ' + args.residual if merges else ''})",
        "zennit": f"Zennit (EpsilonPlusFlat{canonizer})",
        "captum": "Captum LRP (default epsilon rules)",
    }[method]


def conservation_error(relevance: Tensor, logits: Tensor) -> float:
    """max over the batch of |sum R - f_c| / |f_c|, f_c the predicted logit (which all LRP
    methods here explain). Biases absorb some relevance, so it need not be 0."""
    f = logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1).double()
    total = relevance.detach().flatten(1).double().sum(1)
    return float(((total - f).abs() / f.abs()).max())


# ---------------------------------------------------------------------------- timing
def _prepare_methods(
    args: argparse.Namespace, model_name: str, batch: int, size: int
) -> tuple[dict[str, Run], dict[str, Result], Tensor]:
    """Build each method on its own copy of the model (Zennit's canonizers and hooks, Captum's
    rule attributes change the model they attach to), run it once (warm-up) and check LRP
    methods' conservation; failing or invalid methods become n/a rows."""
    model = build_model(model_name, args.device)
    x = torch.randn(batch, 3, size, size, device=args.device)
    with torch.no_grad():  # not inference_mode: Captum's autograd would reject the target
        logits = model(x)
    target = logits.argmax(1)
    runs: dict[str, Run] = {}
    results: dict[str, Result] = {}
    for method in (m for m in args.methods if m in ATTRIBUTION):
        r = Result(model_name, method, label(method, model_name, args), batch, block=model_name)
        results[method] = r
        try:
            if method == "lrp":  # built here to time its preparation
                run, r.prepare_s, merges = _engine(
                    copy.deepcopy(model), args.composite, args.residual)
                r.label = label(method, model_name, args, merges)
            else:
                run, r.note = make_runner(method, copy.deepcopy(model), model_name, target, args)
            out = run(x)
        except Exception as e:  # a library that cannot handle the model is a result, not a crash
            r.skip = f"raises {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        if method in LRP_METHODS:
            r.conservation = conservation_error(out, logits)
            if not r.conservation <= args.max_conservation_error:  # also catches NaN
                r.skip = (
                    f"runs, but the relevance is not conserved (sum R / logit off by "
                    f"{r.conservation:.2g}x the logit): not a valid LRP of this model"
                )
                if method == "captum" and model_name.startswith("resnet"):
                    r.skip += (
                        "; Captum's LRP has no rule for the skip additions "
                        "(`out += identity` in torchvision's Bottleneck.forward)"
                    )
                continue
        runs[method] = run
    return runs, results, x


def interleave(
    runs: dict[str, Callable[[], object]], repeat: int, warmup: int, device: str
) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and process CPU seconds per call of each function, round by round, so load changes
    hit all alike. CPU time (all threads) counts the work done rather than the share of the cores
    other jobs left us; it is meaningless on CUDA, where the work is on the GPU."""
    sync = sync_fn(device)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runs}
    for round_ in range(warmup + repeat):
        for name, fn in runs.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            if round_ >= warmup:
                times[name][0].append(time.perf_counter() - t0)
                times[name][1].append(time.process_time() - c0)
    return times


def time_model(args: argparse.Namespace, model_name: str) -> list[Result]:
    batch, size = _batch_size(args, model_name)
    runs, results, x = _prepare_methods(args, model_name, batch, size)
    # the preparation call was the first warm-up round
    times = interleave(
        {m: (lambda run=run: run(x)) for m, run in runs.items()},
        args.repeat,
        max(args.warmup - 1, 0),
        args.device,
    )
    for method, (wall, cpu) in times.items():
        results[method].times, results[method].cpu_times = wall, cpu
        results[method].peak_mb = peak_memory(args, model_name, method, batch, size)
    return list(results.values())


def _batch_size(args: argparse.Namespace, model_name: str) -> tuple[int, int]:
    batch, size = model_shape(model_name)
    return args.batch or batch, args.size or size


# ---------------------------------------------------------------------------- insertion/deletion
def insdel_forwards(args: argparse.Namespace) -> int:
    """Forwards of insertion + deletion: steps + 1 points per curve, two curves per image."""
    return args.id_images * 2 * (args.id_steps + 1)


def one_batch(args: argparse.Namespace) -> argparse.Namespace:
    """Insertion/deletion settings for 1 image with exactly one full forward batch: the warm-up,
    and the memory worker (the peak is set by the forward batch, not by the number of steps)."""
    return argparse.Namespace(
        **{**vars(args), "id_images": 1, "id_steps": max(args.id_batch // 2 - 1, 1)}
    )


def insdel_runner(args: argparse.Namespace, method: str, model: nn.Module, size: int) -> Run:
    """The batched metric, or plain inference (+ softmax) over the same number of forwards in
    batches of the same size: the physical limit the metric is measured against. Heatmaps are
    random: the cost does not depend on what they show."""
    from lrp.metrics import insertion_deletion

    device, total = args.device, insdel_forwards(args)
    if method == "insdel":
        heat = torch.randn(args.id_images, size, size, device=device)
        return lambda x: insertion_deletion(
            model, x, heat, steps=args.id_steps, baseline="zero", score="softmax",
            batch_size=args.id_batch,
        )  # fmt: skip
    chunk = torch.randn(min(args.id_batch, total), 3, size, size, device=device)

    def reference(x: Tensor) -> None:
        with torch.inference_mode():
            for done in range(0, total, chunk.shape[0]):
                model(chunk[: min(chunk.shape[0], total - done)]).float().softmax(1)

    return reference


def time_insdel(args: argparse.Namespace, model_name: str) -> list[Result]:
    _, size = _batch_size(args, model_name)
    model = build_model(model_name, args.device)
    x = torch.randn(args.id_images, 3, size, size, device=args.device)
    methods = (INSDEL_REF, "insdel")
    light = one_batch(args)
    if args.warmup:  # one full forward batch each, and the last, partial batch's shape
        for m in methods:
            insdel_runner(light, m, model, size)(x[:1])
        with torch.inference_mode():
            model(
                torch.zeros(
                    insdel_forwards(args) % args.id_batch or 1, 3, size, size, device=args.device
                )
            )
    runs = {m: insdel_runner(args, m, model, size) for m in methods}
    times = interleave(
        {m: (lambda run=run: run(x)) for m, run in runs.items()}, args.id_repeat, 0, args.device
    )
    fwd = insdel_forwards(args)
    labels = {
        INSDEL_REF: f"inference, same {fwd} forwards (+softmax)",
        "insdel": (
            f"insertion+deletion, batched ({args.id_steps} steps, {fwd} forwards in batches "
            f"of {args.id_batch})"
        ),
    }
    return [
        Result(
            model_name,
            m,
            labels[m],
            args.id_images,
            block=f"{model_name}/insdel",
            times=wall,
            cpu_times=cpu,
            peak_mb=peak_memory(light, model_name, m, 1, size),
        )
        for m, (wall, cpu) in times.items()
    ]


# ---------------------------------------------------------------------------- memory
def worker(args: argparse.Namespace) -> None:
    """Subprocess: build one method, call it warmup + 1 times (insertion/deletion: once, on one
    full forward batch), print the peak memory growth."""
    setup(args.device, args.threads, args.tf32)
    device, cuda = args.device, args.device.startswith("cuda")
    model = build_model(args.model, device)
    n = args.batch
    x = torch.randn(n, 3, args.size, args.size, device=device)
    sync = sync_fn(device)
    sync()
    rss_before = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    if args.method in (INSDEL_REF, "insdel"):
        run = insdel_runner(args, args.method, model, args.size)
    else:
        target = torch.zeros(n, dtype=torch.long, device=device)
        if args.method == "captum":  # inside the measured region: a forward is below Captum's peak
            with torch.no_grad():  # not inference_mode: Captum's autograd would reject the target
                target = model(x).argmax(1)
        run, _ = make_runner(args.method, model, args.model, target, args)
    for _ in range(1 if args.method in (INSDEL_REF, "insdel") else args.warmup + 1):
        run(x)
    sync()
    peak = (
        (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _peak_rss_mb() - rss_before
    )
    print(json.dumps({"peak_mb": peak}))


#: glibc's mmap threshold fixed (its default adapts to what was freed before): every allocation
#: above 128 KiB is mapped and unmapped on free, so the peak RSS growth is the peak of live
#: tensors and repeats to 0.1 MB (ResNet-50: 670.2/670.1/670.2 MB for the gradient in three
#: workers, 728/804/859 MB with the adaptive default)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def peak_memory(
    args: argparse.Namespace, model_name: str, method: str, batch: int, size: int
) -> float:
    if args.no_memory:
        return float("nan")
    cmd = [
        sys.executable, __file__, "--worker", "--model", model_name, "--method", method,
        "--batch", str(batch), "--size", str(size), "--device", args.device,
        "--composite", args.composite, "--residual", args.residual,
        "--warmup", "1", "--threads", str(args.threads),
        "--id-images", str(args.id_images), "--id-steps", str(args.id_steps),
        "--id-batch", str(args.id_batch), *([] if args.tf32 else ["--no-tf32"]),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if out.returncode != 0:
        print(
            f"memory worker failed for {model_name}/{method}:\n{out.stderr[-2000:]}",
            file=sys.stderr,
        )
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


# ---------------------------------------------------------------------------- table
COLUMNS = (
    "model", "method", "batch", "s/batch (median)", "images/s", "x grad", "x grad (CPU s)",
    "x inf", "peak MB", "mem x grad", "cons. err",
)  # fmt: skip


def time_ratio(a: Result, b: Result | None, cpu: bool = False) -> str:
    """Per-image time of ``a`` over ``b``. Rows timed in the same rounds (same length lists: one
    interleave call) give the median of the per-round ratios, which stays right when the machine's
    speed changes between rounds (other jobs on a shared host); otherwise the ratio of medians."""
    if b is None or b.skip or not a.times or not b.times:
        return "-"
    ta, tb = (a.cpu_times, b.cpu_times) if cpu else (a.times, b.times)
    scale = b.batch / a.batch
    if a.block == b.block:
        return f"{statistics.median(x / y for x, y in zip(ta, tb, strict=True)) * scale:.2f}"
    return f"{statistics.median(ta) / statistics.median(tb) * scale:.2f}"


def table_rows(results: list[Result], cuda: bool) -> tuple[list[list[str]], list[str]]:
    """Cells per row and the footnotes. Ratios are per image against the gradient ("x grad") and
    the inference row ("x inf") of the same model in the same run; insertion/deletion's "x inf"
    is against plain inference over the same forwards."""
    rows, notes = [], []
    by_key = {(r.model, r.method): r for r in results}
    for r in results:
        grad = by_key.get((r.model, "gradient"))
        inf = by_key.get((r.model, INSDEL_REF if r.method.startswith("insdel") else "inference"))
        mark = ""
        for text in filter(None, (r.skip, r.note)):
            notes.append(text)
            mark += f" [{len(notes)}]"
        if r.skip:
            rows.append([r.model, r.label + mark, str(r.batch), *["n/a"] * (len(COLUMNS) - 3)])
            continue
        grad_mb = grad.peak_mb if grad and not grad.skip else float("nan")
        rows.append([
            r.model, r.label + mark, str(r.batch), f"{r.median_s:.3f}",
            f"{r.batch / r.median_s:.2f}", time_ratio(r, grad),
            "-" if cuda else time_ratio(r, grad, cpu=True), time_ratio(r, inf),
            "-" if math.isnan(r.peak_mb) else f"{r.peak_mb:.0f}",
            "-" if math.isnan(r.peak_mb / grad_mb) else f"{r.peak_mb / grad_mb:.2f}",
            "-" if r.conservation is None else f"{r.conservation:.1e}",
        ])  # fmt: skip
    return rows, notes


def render(rows: list[list[str]], markdown: bool, columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table, or plain text with the first two columns left-aligned."""
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])
    plain = [[c.replace("**", "") for c in row] for row in [list(columns), *rows]]
    widths = [max(len(row[i]) for row in plain) for i in range(len(columns))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in plain
    )


def header(args: argparse.Namespace, load_before: tuple[float, ...]) -> str:
    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "torchvision", "zennit", "captum"))
    load = os.getloadavg()
    return "\n".join([
        f"date: {datetime.date.today().isoformat()}; device: {args.device} "
        f"({_device_name(args.device)}); threads: {args.threads}; "
        f"TF32: {args.tf32 if args.device.startswith('cuda') else 'n/a'}",
        f"{versions}; python {platform.python_version()}",
        "random weights, BatchNorm statistics from 16 random inputs, float32, "
        f"repeat {args.repeat} (insertion/deletion {args.id_repeat}), "
        f"warmup {args.warmup}; load average (1 min) {load_before[0]:.1f} before, "
        f"{load[0]:.1f} after",
        f"code: {_git_state()}",
        "command: " + " ".join(["python", "benchmarks/bench_engine.py", *sys.argv[1:]]),
    ])  # fmt: skip


# ---------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        help=f"{' '.join(MODELS)} or any torchvision name",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="default: " + ", ".join(f"{m} {b}" for m, (b, _) in MODELS.items()),
    )
    p.add_argument("--size", type=int, default=None, help="default: 224 (caffenet 227)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--composite", default="epsilon-plus-flat")
    p.add_argument("--residual", default="splitting")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="CUDA: exact fp32 matmuls")
    p.add_argument(
        "--max-conservation-error",
        type=float,
        default=10.0,
        help="n/a an LRP method whose relevance sum is off by more than this x the logit "
        "(biases absorb relevance, so this only catches broken propagation)",
    )
    p.add_argument(
        "--id-models", nargs="+", default=["resnet50"], help="models for insertion/deletion"
    )
    p.add_argument("--id-images", type=int, default=2)
    p.add_argument("--id-steps", type=int, default=100)
    p.add_argument("--id-batch", type=int, default=64, help="forwards per batch")
    p.add_argument("--id-repeat", type=int, default=2, help="timed rounds (each is long)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    setup(args.device, args.threads, args.tf32)
    load_before = os.getloadavg()
    results: list[Result] = []
    for model_name in args.models:
        print(f"timing {model_name} ...", file=sys.stderr, flush=True)
        results += time_model(args, model_name)
        if "insdel" in args.methods and model_name in args.id_models:
            print(f"timing insertion/deletion on {model_name} ...", file=sys.stderr, flush=True)
            results += time_insdel(args, model_name)
    rows, notes = table_rows(results, args.device.startswith("cuda"))
    print(header(args, load_before))
    print()
    print(render(rows, args.markdown))
    if notes:
        print()
        print("\n".join(f"[{i}] {n}" for i, n in enumerate(notes, 1)))
    prepared = [r for r in results if r.prepare_s is not None]
    if prepared:
        print()
        print(
            "engine preparation (trace + prepared copy, once per explainer, not in the times "
            "above): " + ", ".join(f"{r.model} {r.prepare_s:.2f} s" for r in prepared)
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ | {"median_s": r.median_s} for r in results], f, indent=1)


if __name__ == "__main__":
    main()
