"""Model factory: small offline models for the default run, any torchvision classifier for users.

Models are built from torchvision / ``lrp.models`` building blocks (BasicBlock, Conv2d, LRN, ...)
so that the engine's rules recognise every layer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, ResNet

from flows.io import write_torch
from lrp import models as lrp_models  # the engine's reference models


class ModelError(ValueError):
    """Unknown model name, unusable weights or a checkpoint that does not fit (path named)."""


def small_resnet(num_classes: int) -> ResNet:
    """torchvision ResNet with one BasicBlock per stage (ResNet-10).

    Same module types as ResNet-18/50 (identity and projection skips), so the engine's ResNet
    rules apply, with few enough FLOPs at 64 px to train on a CPU in minutes.
    """
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


PROJECT_MODELS = ("small_resnet", "lrn_cnn", "caffenet", "small_vit")
VIT_PATCH = 8  # small_vit's patch size: the image side must be a multiple of it


def check_name(name: str) -> None:
    """Accept the project's models and every torchvision classification builder (ModelError)."""
    if name in PROJECT_MODELS or name in tvm.list_models(module=tvm):
        return
    raise ModelError(
        f"unknown model {name!r}: use one of {list(PROJECT_MODELS)} or a torchvision "
        "classifier (torchvision.models.list_models(module=torchvision.models), e.g. resnet18, "
        "mobilenet_v3_small)"
    )


def build_model(
    name: str,
    num_classes: int,
    *,
    weights: str | None = None,
    checkpoint: Path | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """Build ``name`` with a ``num_classes`` head, then load ``checkpoint`` if given.

    ``weights`` ("DEFAULT", "IMAGENET1K_V1", ...) applies to torchvision models only and downloads
    on first use (users only: tests and the default pipeline never pass it). ``checkpoint`` is a
    state_dict, a training checkpoint from :func:`flows.training.train_model` (``{"model": ...}``)
    or a pickled ``nn.Module``. ``image_size`` matters only for ``small_vit``, whose position
    embedding fixes the input side (None: 64, or the side a checkpoint was trained at).
    """
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if checkpoint is not None:
        loaded = _load_checkpoint(Path(checkpoint))
        if isinstance(loaded, nn.Module):
            _check_head(loaded, num_classes, Path(checkpoint))
            return loaded
        recorded = _recorded_architecture(Path(checkpoint))
        if recorded is not None and recorded != name:
            raise ModelError(
                f"{checkpoint}: trained as {recorded!r}, not {name!r}; pass {recorded!r} "
                "(or leave the architecture out: it is read from the file)"
            )
        if name == "small_vit" and image_size is None:
            image_size = _vit_image_size(loaded, Path(checkpoint))
        model = _build(name, num_classes, weights=None, image_size=image_size)
        try:
            model.load_state_dict(loaded)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelError(
                f"{checkpoint}: does not fit model {name!r} ({first}); pass the architecture "
                "it was trained as"
            ) from None
        return model
    return _build(name, num_classes, weights=weights, image_size=image_size)


def _build(
    name: str, num_classes: int, *, weights: str | None, image_size: int | None = None
) -> nn.Module:
    if name == "small_resnet":
        if weights is not None:
            raise ModelError("model 'small_resnet' has no pretrained weights; use weights=None")
        return small_resnet(num_classes)
    if name in ("lrn_cnn", "caffenet"):
        if weights is not None:
            raise ModelError(f"model {name!r} has no pretrained weights; use weights=None")
        if name == "lrn_cnn":
            return lrp_models.lrn_cnn(num_classes, in_channels=3)
        return lrp_models.caffenet(num_classes)
    if name == "small_vit":
        if weights is not None:
            raise ModelError("model 'small_vit' has no pretrained weights; use weights=None")
        side = 64 if image_size is None else int(image_size)
        if side < VIT_PATCH or side % VIT_PATCH:
            raise ModelError(
                f"model 'small_vit': image size {side} must be a positive multiple of its patch "
                f"size {VIT_PATCH} (params key data.image_size)"
            )
        return lrp_models.small_vit(num_classes, image_size=side, patch_size=VIT_PATCH)
    check_name(name)
    if weights is None:
        return tvm.get_model(name, weights=None, num_classes=num_classes)
    try:
        model = tvm.get_model(name, weights=weights)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"model {name!r}: unknown weights {weights!r} ({exc})") from exc
    _replace_head(model, num_classes)
    return model


def _vit_image_size(state: dict[str, Any], path: Path) -> int:
    """The input side a small_vit state_dict was trained at, from its position embedding."""
    pos = state.get("encoder.pos_embedding")
    tokens = int(pos.shape[1]) - 1 if isinstance(pos, torch.Tensor) and pos.dim() == 3 else -1
    grid = math.isqrt(max(tokens, 0))
    if tokens < 1 or grid * grid != tokens:
        raise ModelError(f"{path}: not a small_vit state_dict (no square encoder.pos_embedding)")
    return grid * VIT_PATCH


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer for a fresh one with num_classes outputs (fine-tuning head)."""
    last_name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name = module_name
    if last_name is None:
        raise ModelError(f"{type(model).__name__}: no Linear classifier layer to replace")
    old = model.get_submodule(last_name)
    if old.out_features == num_classes:
        return
    parent_name, _, attr = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _check_head(model: nn.Module, num_classes: int, path: Path) -> None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears and linears[-1].out_features != num_classes:
        raise ModelError(
            f"{path}: model has {linears[-1].out_features} outputs, expected {num_classes}"
        )


def save_trained(model: nn.Module, architecture: str, path: Path) -> Path:
    """Write a state_dict that records its architecture and head size (atomically)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_torch(path, {"architecture": architecture, "state_dict": state})
    return path


def load_trained(
    path: Path, num_classes: int | None = None, architecture: str | None = None
) -> nn.Module:
    """A model file, rebuilt as its recorded architecture (or ``architecture``); a pickled
    module as is. ``num_classes`` None: the size of the file's last weight matrix.

    Fails in one line naming the fix when a state_dict records no architecture and none is given.
    """
    path = Path(path)
    loaded = _load_checkpoint(path)
    if isinstance(loaded, nn.Module):
        return loaded
    arch = architecture or _recorded_architecture(path)
    if arch is None:
        raise ModelError(
            f"{path}: records no architecture; name it (e.g. --architecture small_resnet)"
        )
    if num_classes is None:
        heads = [v for v in loaded.values() if getattr(v, "dim", lambda: 0)() == 2]
        if not heads:
            raise ModelError(f"{path}: no classifier weight found; is it a classifier?")
        num_classes = int(heads[-1].shape[0])
    return build_model(arch, num_classes, checkpoint=path)


def _recorded_architecture(path: Path) -> str | None:
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return obj.get("architecture") if isinstance(obj, dict) else None


def _load_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # A pickled nn.Module needs full unpickling: only for local files the user names.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ModelError(
                f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})"
            ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # training checkpoint
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict | nn.Module):
        raise ModelError(f"{path}: expected a state_dict or an nn.Module, got {type(obj).__name__}")
    return obj
