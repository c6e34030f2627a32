"""Trained-like activation scales for random-weight models (nothing is downloaded), for the
benchmarks: random initialisations with default or random normalisation statistics let
activations grow or shrink by orders of magnitude from block to block (torchvision's random
EfficientNet-B0 gives logits of 1e-14), which no trained network does."""

from __future__ import annotations

import torch
from torch import Tensor, nn

_LAYER_NORMS = (nn.LayerNorm, nn.GroupNorm)  # invariant to one factor on their input
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # weight (out, in / groups, *kernel)


def batchnorm_statistics(model: nn.Module, x: Tensor) -> None:
    """Every BatchNorm's running statistics := those of ``x`` (one train-mode pass, cumulative
    average); only BatchNorms switch to train mode (no dropout, no stochastic depth)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        model(x)
    for m, (momentum, training) in zip(norms, saved, strict=True):
        m.momentum = momentum
        m.train(training)


def calibrate_activations(model: nn.Module, size: int, n: int = 64, seed: int = 2) -> nn.Module:
    """Give a random-weight model the activation scales of a trained one, without changing what
    its normalisations compute: every convolution whose output goes straight into a norm gets its
    weights (and bias) rescaled to unit RMS output on ``n`` random inputs of ``size`` px
    (standard normal, clamped to [-3, 3]), per output channel before a BatchNorm, by one factor
    before a LayerNorm/GroupNorm (ConvNeXt's depthwise convs, also through a permute); then every
    BatchNorm's running statistics are set to those of the same inputs (cumulative average).

    Why: the otsuki2024 preset's published stabiliser (1e-5) is absolute and sits on the raw
    convolution outputs (BatchNorm is not folded, relevance passes it unchanged), so the share it
    absorbs with ``stabilizer_share="absorb"``, 1e-5 / (z+ + 1e-5) per output, depends on a scale
    the network's function does not fix (the norm after a convolution cancels it). Random
    initialisations leave it far from 1: kaiming fan-out gives depthwise kernels a std of 0.012
    in EfficientNet-V2's last stage, ConvNeXt's are drawn with std 0.02; fixed BatchNorm
    statistics (the defaults, or any drawn without the data) let activations grow or shrink by orders of magnitude from block to block.
    Unit scale is the choice made here for both, as for data a trained network's statistics were
    computed on (no trained weights are measured: nothing is downloaded). The rescale is exact up
    to the norms' own eps (a train-mode BatchNorm and a LayerNorm are invariant to it, so the
    second pass sees the activations of the first) as long as the conv's output feeds nothing but
    the norm (the usual conv -> norm layout; not checked here); only BatchNorms switch to train
    mode (no dropout, no stochastic depth); affine parameters drawn at random before (the zoo
    tests' ``randomize_statistics``) keep the normalisation non-trivial.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(n, 3, size, size, generator=g, dtype=dtype).clamp(-3.0, 3.0)
    outputs: dict[int, tuple[nn.Module, Tensor]] = {}  # storage -> conv, output (kept alive)
    scales: dict[nn.Module, Tensor] = {}

    def conv_out(conv: nn.Module, args: object, out: Tensor) -> None:
        outputs[out.untyped_storage().data_ptr()] = (conv, out)

    def norm_in(norm: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        conv, out = outputs.get(x.untyped_storage().data_ptr(), (None, None))
        if out is x and isinstance(norm, nn.modules.batchnorm._BatchNorm):
            scales[conv] = x.pow(2).mean([d for d in range(x.ndim) if d != 1]).sqrt()
        elif out is not None and out.numel() == x.numel() and isinstance(norm, _LAYER_NORMS):
            scales[conv] = x.pow(2).mean().sqrt()  # a view of the conv's output: one factor

    handles = [
        m.register_forward_hook(conv_out)
        if isinstance(m, _CONVS)
        else m.register_forward_pre_hook(norm_in)
        for m in model.modules()
        if isinstance(m, (*_CONVS, nn.modules.batchnorm._BatchNorm, *_LAYER_NORMS))
    ]
    try:
        batchnorm_statistics(model, x)
    finally:
        for h in handles:
            h.remove()
    outputs.clear()
    with torch.no_grad():
        for conv, rms in scales.items():
            factor = 1.0 / rms.clamp(min=torch.finfo(rms.dtype).tiny)
            conv.weight.mul_(factor.view(-1, *([1] * (conv.weight.ndim - 1))))
            if conv.bias is not None:
                conv.bias.mul_(factor)
    batchnorm_statistics(model, x)
    return model
