"""Device and runtime helpers of the dataset loops: TF32, channels_last, batch size, worker GPUs.

These settings change how fast explanations are computed, not what they are (beyond float
tolerance), so they live in ``params.runtime`` and are not DVC stage params. Relevance itself is
always computed in float32 (docs/PIPELINE.md, "Why float32 relevance").
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from typing import Any

import distributed
import torch
from torch import nn

log = logging.getLogger(__name__)

# Batch sizes found by the automatic search, per process: (model, method, input shape, device).
_BATCH_CACHE: dict[tuple[Any, ...], int] = {}
_BATCH_LOCK = threading.Lock()
CPU_BATCH_SIZE = 64  # `batch_size: auto` off CUDA: a search would only measure host RAM
CUDA_METRIC_BATCH_SIZE = 256  # forward-only metric batches with `batch_size: auto` on CUDA


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU; anything else is passed to torch.device."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@contextlib.contextmanager
def torch_backends(device: torch.device, *, tf32: bool) -> Iterator[None]:
    """Allow TF32 matmuls/convolutions on CUDA while the block runs (restored afterwards).

    TF32 rounds the *inputs* of matmuls and convolutions to 10 mantissa bits (accumulation stays
    float32): several times faster on Ampere and later, and the relevance stays a float32 tensor.
    It changes results at about 1e-3 relative; set ``runtime.tf32: false`` for plain float32.
    """
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def use_channels_last(mode: bool | str, model: nn.Module, device: torch.device) -> bool:
    """Whether to run NHWC: ``"auto"`` means on CUDA for models with 2-D convolutions.

    cuDNN's fast convolution kernels (tensor cores) are NHWC; on CPU NCHW is usually as fast, so
    ``auto`` leaves CPU runs alone. ``True`` forces it anywhere (results equal to float tolerance).
    """
    if isinstance(mode, bool):
        return mode
    if mode != "auto":
        raise ValueError(f"channels_last must be true, false or 'auto', got {mode!r}")
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def inference_model(
    mode: bool | str, model: nn.Module, device: torch.device, example: torch.Tensor
) -> tuple[nn.Module, str]:
    """The model for forward-only passes (the metrics): an optimized copy, or ``model`` itself.

    ``"auto"`` (and ``True``) on CPU: ``torch.fx.experimental.optimization.optimize_for_inference``
    (BatchNorm folded into the convolutions, dropout removed, oneDNN layout between the layers
    it supports), 1.4-1.9x faster on the pipeline's CPU models. The copy computes the same function;
    its outputs differ from the model's by float32 roundoff (a few 1e-6 on logits of order 10,
    as another batch size or thread count does). It is checked on ``example`` (a full batch and
    a single input) against the model and dropped, with the reason, when it is not within 1e-4 of
    the largest logit, or when the model cannot be traced or optimized. Elsewhere (CUDA, MPS) and
    with ``False``, ``model`` is returned. The model must be in eval mode; it is not modified.
    Returns the model to use and what was done (for the log).
    """
    if not isinstance(mode, bool) and mode != "auto":
        raise ValueError(f"optimize_inference must be true, false or 'auto', got {mode!r}")
    if mode is False:
        return model, "off"
    if device.type != "cpu":
        return model, f"off ({device.type})"
    import warnings

    from torch.fx.experimental.optimization import optimize_for_inference

    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            fast = optimize_for_inference(model).eval()
            for x in (example, example[:1]):
                want, got = model(x), fast(x)
                tol = 1e-4 * max(float(want.abs().max()), 1.0)
                if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=tol):
                    worst = float((got - want).abs().max()) if got.shape == want.shape else None
                    return model, f"off (optimized copy differs: max |diff| {worst})"
    except Exception as exc:  # not traceable, an op without a oneDNN kernel, ...
        return model, f"off ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return fast, "optimized copy (fx optimize_for_inference: BatchNorm folded, oneDNN layout)"


def find_batch_size(
    try_batch: Callable[[int], object],
    *,
    start: int = 8,
    limit: int = 1024,
    margin: float = 0.85,
    refine: int = 3,
) -> int:
    """The largest batch size for which ``try_batch(size)`` runs without running out of memory.

    Doubles from ``start`` while it fits (up to ``limit``), halves below ``start`` when even that
    fails, bisects ``refine`` times between the last fit and the first failure, and returns
    ``margin`` times the result (at least 1): other allocations (DataLoader pinned buffers, the
    allocator's fragmentation, a bigger image later) need headroom. Errors other than OOM
    propagate; OOM at batch size 1 raises ``torch.OutOfMemoryError``.
    """
    if start < 1 or limit < 1 or not 0 < margin <= 1:
        raise ValueError(f"need start, limit >= 1 and 0 < margin <= 1, got {start}, {limit}, {margin}")

    def fits(size: int) -> bool:
        try:
            try_batch(size)
        except Exception as exc:
            if not is_oom(exc):
                raise
            _release_memory()
            return False
        return True

    size = min(start, limit)
    if fits(size):
        good, bad = size, None
        while good < limit:
            size = min(good * 2, limit)
            if not fits(size):
                bad = size
                break
            good = size
    else:
        bad, good = size, 0
        while size > 1:
            size //= 2
            if fits(size):
                good = size
                break
            bad = size
        if good == 0:
            raise torch.OutOfMemoryError("even a batch of 1 does not fit in device memory")
    for _ in range(refine if bad is not None else 0):
        if bad - good <= 1:
            break
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return max(1, int(good * margin))


def auto_batch_size(
    key: tuple[Any, ...],
    device: torch.device,
    run: Callable[[int], object],
    *,
    limit: int,
    fallback: int = CPU_BATCH_SIZE,
) -> int:
    """Batch size for ``runtime.batch_size: auto``: searched once per key on CUDA, else fallback.

    ``run(size)`` does one full attribution of ``size`` inputs. The result is cached per process
    (a Dask worker searches once per model, method and input shape).
    """
    if device.type != "cuda":
        return max(1, min(fallback, limit))
    cache_key = (*key, str(device), limit)
    with _BATCH_LOCK:
        if cache_key in _BATCH_CACHE:
            return _BATCH_CACHE[cache_key]

        def probe(size: int) -> None:
            run(size)
            torch.cuda.synchronize(device)  # surface asynchronous failures inside the probe

        size = find_batch_size(probe, start=min(8, limit), limit=limit)
        _release_memory()
        _BATCH_CACHE[cache_key] = size
        log.info("batch_size auto: %d on %s (limit %d)", size, device, limit)
        return size


def resolve_batch_size(value: int | str) -> int | None:
    """An integer batch size as is; ``"auto"`` gives None (search per model in the loop)."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return value


def metric_batch_size(value: int | str, device: torch.device) -> int:
    """Batch size of the forward-only metric passes (``auto``: 256 on CUDA, 64 elsewhere)."""
    if value == "auto":
        return CUDA_METRIC_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
    return int(value)


def worker_device(requested: str | torch.device) -> torch.device:
    """The device for this process; on a Dask worker that sees several GPUs, pick one per worker.

    A ``LocalCluster`` on a multi-GPU machine gives every worker all GPUs: worker ``k`` (an integer
    name) uses ``cuda:k % count`` so that the workers do not all share ``cuda:0``. Workers started
    one per GPU (``CUDA_VISIBLE_DEVICES``, dask-cuda) see one GPU and keep ``cuda:0``.
    """
    device = resolve_device(requested)
    if device.type != "cuda" or device.index is not None:
        return device
    count = torch.cuda.device_count()
    if count <= 1:
        return device
    try:
        name = distributed.get_worker().name
    except ValueError:  # not in a Dask worker
        return device
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        return torch.device("cuda", int(name) % count)
    return device


def loader_workers(requested: int) -> int:
    """DataLoader workers; 0 inside a daemonic process (Dask workers), which may not fork children."""
    if requested > 0 and multiprocessing.current_process().daemon:
        log.warning(
            "runtime.num_workers=%d ignored: this process is daemonic (a Dask worker); set the "
            "Dask config distributed.worker.daemon: false to allow DataLoader workers", requested,
        )
        return 0
    return requested


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
