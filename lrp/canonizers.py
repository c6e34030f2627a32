"""Canonizers: rewrite the explainer's private copy of a model into a form the rules apply to.

- residual blocks (torchvision BasicBlock/Bottleneck) become :class:`ResidualBlock`, whose merge is
  an explicit module, so relevance can be split where skip and branch meet;
- BatchNorm following a Linear/Conv is folded into it (the rules then see one affine layer);
- in-place activations are made out-of-place (autograd needs the saved tensors intact).

Only structures whose forward the engine can follow are accepted; anything else raises
:class:`~lrp.errors.UnresolvedStructureError` naming the module.
"""

from __future__ import annotations

import itertools
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VGG, AlexNet, ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from .errors import UnresolvedStructureError
from .rules.residual import ResidualMerge

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ResidualBlock(nn.Module):
    """A torchvision BasicBlock/Bottleneck with the residual addition as a :class:`ResidualMerge`.

    Child names (conv1, bn1, ..., downsample) are kept, so module paths match the user's model.
    """

    def __init__(self, block: BasicBlock | Bottleneck, mode: str) -> None:
        super().__init__()
        depth = 3 if isinstance(block, Bottleneck) else 2
        self.depth = depth
        for i in range(1, depth + 1):
            setattr(self, f"conv{i}", getattr(block, f"conv{i}"))
            setattr(self, f"bn{i}", getattr(block, f"bn{i}"))
        self.relu = nn.ReLU()
        self.downsample = block.downsample
        self.merge = ResidualMerge(mode, projection=block.downsample is not None)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i in range(1, self.depth + 1):
            h = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h))
            if i < self.depth:
                h = self.relu(h)
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(self.merge(h, skip))

    def linear_bn_pairs(self) -> list[tuple[str, str]]:
        return [(f"conv{i}", f"bn{i}") for i in range(1, self.depth + 1)]


# Containers whose forward runs their children in registration order (or, for ResidualBlock, in a
# way this module knows), with nothing but shape changes in between.
_ORDERED_CONTAINERS: tuple[type[nn.Module], ...] = (VGG, AlexNet, ResNet)
_USER_CONTAINERS: list[type[nn.Module]] = []


def register_container(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare that ``cls.forward`` only chains its children in registration order.

    Usable as a class decorator on user models whose forward cannot be traced.
    """
    _USER_CONTAINERS.append(cls)
    return cls


def is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def is_ordered_container(module: nn.Module) -> bool:
    return (
        is_plain_sequential(module)
        or type(module) in _ORDERED_CONTAINERS
        or any(type(module) is cls for cls in _USER_CONTAINERS)
    )


def replace_residual_blocks(root: nn.Module, mode: str) -> int:
    """Swap every torchvision BasicBlock/Bottleneck below ``root`` for a ResidualBlock."""
    count = 0
    for name, child in list(root.named_children()):
        if isinstance(child, BasicBlock | Bottleneck):
            setattr(root, name, ResidualBlock(child, mode))
            count += 1
        else:
            count += replace_residual_blocks(child, mode)
    return count


def disable_inplace(root: nn.Module) -> None:
    for module in root.modules():
        if getattr(module, "inplace", False):
            module.inplace = False


FOLD_ATTRIBUTE = "lrp_folded_batchnorm"


@torch.no_grad()
def batchnorm_affine(linear: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, bias)`` with ``bn(linear(x)) = linear_nobias(x) * scale + bias``."""
    scale = (
        bn.weight / torch.sqrt(bn.running_var + bn.eps)
        if bn.affine
        else (1.0 / torch.sqrt(bn.running_var + bn.eps))
    )
    shift = bn.bias if bn.affine else torch.zeros_like(scale)
    bias = linear.bias if linear.bias is not None else torch.zeros_like(bn.running_mean)
    return scale, (bias - bn.running_mean) * scale + shift


@torch.no_grad()
def fold_batchnorm_into(linear: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode BatchNorm ``bn`` (which follows ``linear``) into ``linear``'s parameters."""
    _set_folded(linear, *batchnorm_affine(linear, bn))


def _set_folded(linear: nn.Module, scale: Tensor, bias: Tensor) -> None:
    shape = (-1,) + (1,) * (linear.weight.ndim - 1)
    # new Parameters: the explainer's copy shares the user's tensors, which must stay untouched
    linear.weight = nn.Parameter(linear.weight * scale.view(shape), requires_grad=False)
    linear.bias = nn.Parameter(bias, requires_grad=False)


def materialize_folded_batchnorm(linear: nn.Module) -> None:
    """Turn a fold recorded by ``fold_batchnorms(..., materialize=False)`` into folded weights."""
    fold = linear.__dict__.pop(FOLD_ATTRIBUTE, None)
    if fold is not None:
        _set_folded(linear, *fold)


def _can_fold(linear: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(linear, LINEAR_TYPES)
        and isinstance(bn, BATCHNORM_TYPES)
        and bn.track_running_stats
        and bn.running_mean is not None
        and linear.weight.shape[0] == bn.num_features
    )


def fold_batchnorms(root: nn.Module, materialize: bool = True) -> int:
    """Fold every BatchNorm that directly follows a Linear/Conv in a structure the engine knows.

    ``materialize=False`` leaves the weights alone and records ``(scale, bias)`` on the layer (as
    ``lrp_folded_batchnorm``): the explainer's rule layers apply the scale per channel, so no folded
    copy of the weights is kept. Such a layer is incomplete until wrapped (or materialized).
    """
    count = 0
    for _, module in list(root.named_modules()):
        pairs: list[tuple[str, str]] = []
        if is_plain_sequential(module):
            names = [n for n, _ in module.named_children()]
            pairs = list(itertools.pairwise(names))
        elif isinstance(module, ResidualBlock):
            pairs = module.linear_bn_pairs()
        elif isinstance(module, ResNet):
            pairs = [("conv1", "bn1")]
        for lin_name, bn_name in pairs:
            lin, bn = getattr(module, lin_name), getattr(module, bn_name)
            if _can_fold(lin, bn):
                if materialize:
                    fold_batchnorm_into(lin, bn)
                else:
                    setattr(lin, FOLD_ATTRIBUTE, batchnorm_affine(lin, bn))
                setattr(module, bn_name, nn.Identity())
                count += 1
    return count


_SAFE_FUNCTIONS = {torch.flatten, torch.relu, F.relu, torch.reshape, operator.getitem}
_SAFE_METHODS = {"view", "reshape", "flatten", "size", "contiguous", "relu", "squeeze", "unsqueeze"}


def verify_container(path: str, module: nn.Module) -> None:
    """Check that an unknown container's forward only chains its children (via torch.fx).

    Raises UnresolvedStructureError on anything else (an addition such as an unknown residual
    merge, a multiplication, a concatenation), naming the module and the operation.
    """
    import torch.fx

    label = f"{type(module).__name__} at '{path or '<root>'}'"
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as err:  # tracing failures come in many types
        raise UnresolvedStructureError(
            f"cannot follow the forward of {label}: torch.fx could not trace it ({err}). If its "
            "forward only calls its children in registration order, decorate the class with "
            "lrp.register_container."
        ) from err
    for node in graph.nodes:
        if node.op == "call_function" and node.target not in _SAFE_FUNCTIONS:
            name = getattr(node.target, "__name__", str(node.target))
            raise UnresolvedStructureError(
                f"{label} applies '{name}' in its forward, which the engine cannot propagate "
                "relevance through (e.g. an unknown residual addition). Build residual blocks from "
                "torchvision's BasicBlock/Bottleneck or wrap the operation in a module with a rule."
            )
        if node.op == "call_method" and node.target not in _SAFE_METHODS:
            raise UnresolvedStructureError(
                f"{label} calls tensor method '{node.target}' in its forward, which the engine "
                "cannot propagate relevance through."
            )
