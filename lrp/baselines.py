"""Attribution methods behind one call shape: the engine's LRP composites and the papers' baselines.

``attribute(model, x, target, method=...)`` returns (N, C, H, W) relevance for every method, so the
metrics and the table treat them alike. Gradient methods come from Captum, CAM methods from
``pytorch_grad_cam`` (optional dependencies, imported on first use), LRP from ``lrp.Explainer``,
attention rollout (transformers with ``nn.MultiheadAttention``) from this module.
The caller's model is never modified: hooks are removed, the training flags, ``requires_grad``
flags and ``.grad`` of parameters are restored, and methods that need a changed model (guided
backprop with in-place ReLUs) run on a deep copy.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrp.errors import InvalidInputError

Attributor = Callable[[Tensor, Tensor | None], Tensor]

BASELINES = (
    "gradient",
    "input-x-gradient",
    "integrated-gradients",
    "guided-backprop",
    "grad-cam",
    "score-cam",
    "random",
)
# Baselines that need a transformer: ``nn.MultiheadAttention`` layers and a class token.
ATTENTION_BASELINES = ("attention-rollout",)


def lrp_methods() -> list[str]:
    """Composite names of the engine (empty if the engine cannot be imported)."""
    try:
        import lrp

        return list(lrp.composites.names())
    except (ImportError, AttributeError):
        return []


def methods() -> list[str]:
    """Every name :func:`attribute` accepts: the baselines, then the engine's composites."""
    return [*BASELINES, *ATTENTION_BASELINES, *lrp_methods()]


def attribute(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    method: str = "epsilon-plus-flat",
    **options: Any,
) -> Tensor:
    """(N, C, H, W) relevance of ``target`` (None: the predicted class) for input ``x``.

    For repeated calls on one model use :func:`make_attributor` (LRP prepares its model copy once).
    Options per method: LRP composites forward everything to ``lrp.Explainer`` (``residual=``,
    ``output=``, ``epsilon=`` ...); ``integrated-gradients``: ``n_steps`` (50),
    ``internal_batch_size``; ``grad-cam`` / ``score-cam``: ``target_layer`` (module or dotted
    path; default the last 4-D feature map before global pooling), ``batch_size`` (score-cam);
    ``random``: ``seed`` (0). ``attention-rollout`` takes no options and ignores ``target``.
    """
    return make_attributor(model, method, **options)(x, target)


def make_attributor(model: nn.Module, method: str, **options: Any) -> Attributor:
    """A reusable ``f(x, target) -> relevance`` for ``method`` (see :func:`attribute`)."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be an nn.Module, got {type(model).__name__}")
    if method in _FACTORIES:
        return _FACTORIES[method](model, **options)
    if method in lrp_methods():
        return _lrp(model, method, **options)
    raise InvalidInputError(f"unknown method={method!r}; choose one of {methods()}")


# ----------------------------------------------------------------------------- helpers


def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InvalidInputError(f"x must be a floating (N, C, H, W) tensor, got {shape}")


def _device(model: nn.Module, x: Tensor) -> torch.device:
    for p in model.parameters():
        return p.device
    return x.device


def _targets(model: nn.Module, x: Tensor, target: Tensor | int | None) -> Tensor:
    """(N,) long targets on x's device; None -> argmax of the model's output."""
    n = x.shape[0]
    if target is None:
        with torch.no_grad():
            return model(x).argmax(dim=1)
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=x.device)
    if isinstance(target, Tensor) and not target.is_floating_point() and target.dim() <= 1:
        t = target.to(device=x.device, dtype=torch.long).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n).clone()
        if t.numel() == n:
            return t
    raise InvalidInputError("target must be None, an int or a (N,) integer tensor")


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run a third-party method in eval mode and restore everything it may change.

    Parameters stop requiring grad during the call (only input gradients are needed), which also
    keeps their ``.grad`` intact; training flags and any hooks the library leaves are restored.
    """
    training = {m: m.training for m in model.modules()}
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    hooks = {
        m: {name: dict(getattr(m, name)) for name in _HOOK_DICTS if hasattr(m, name)}
        for m in model.modules()
    }
    try:
        for p, _, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, req, grad in flags:
            p.requires_grad_(req)
            p.grad = grad
        for m, flag in training.items():
            m.training = flag
        for m, saved in hooks.items():
            for name, before in saved.items():
                current = getattr(m, name)
                for key in [k for k in current if k not in before]:
                    del current[key]


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


def _broadcast_map(cam: Tensor, x: Tensor) -> Tensor:
    """(N, h, w) map -> (N, C, H, W): bilinear upsampling, each channel gets map / C.

    Dividing by C makes the channel sum (the metrics' default reduction) equal to the map.
    """
    cam = cam.to(device=x.device, dtype=x.dtype)
    if tuple(cam.shape[-2:]) != tuple(x.shape[-2:]):
        cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
        cam = cam[:, 0]
    c = x.shape[1]
    return (cam / c)[:, None].expand(-1, c, -1, -1).contiguous()


# ----------------------------------------------------------------------------- LRP


def _lrp(model: nn.Module, method: str, **options: Any) -> Attributor:
    import lrp

    explainer = lrp.Explainer(model, composite=method, **options)

    def run(x: Tensor, target: Tensor | int | None) -> Tensor:
        _check_x(x)
        return explainer(x, target=target).relevance

    return run


# ----------------------------------------------------------------------------- Captum


def _captum(model: nn.Module, kind: str, **options: Any) -> Attributor:
    try:
        from captum import attr
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"method {kind!r} needs captum: pip install '.[baselines]'") from err
    n_steps = int(options.pop("n_steps", 50))
    internal_batch_size = options.pop("internal_batch_size", None)
    if options:
        raise InvalidInputError(f"method {kind!r}: unknown options {sorted(options)}")

    def run(x: Tensor, target: Tensor | int | None) -> Tensor:
        _check_x(x)
        net = model
        if kind == "guided-backprop" and any(
            getattr(m, "inplace", False) for m in model.modules() if isinstance(m, nn.ReLU)
        ):
            # Captum's ReLU backward hooks fail on in-place ReLUs: run on a non-in-place copy.
            net = copy.deepcopy(model)
            for m in net.modules():
                if isinstance(m, nn.ReLU):
                    m.inplace = False
        x = x.to(_device(net, x))
        with _untouched(net):
            t = _targets(net, x, target)
            inp = x.detach().clone().requires_grad_(True)
            if kind == "gradient":
                out = attr.Saliency(net).attribute(inp, target=t, abs=False)
            elif kind == "input-x-gradient":
                out = attr.InputXGradient(net).attribute(inp, target=t)
            elif kind == "integrated-gradients":
                out = attr.IntegratedGradients(net).attribute(
                    inp,
                    baselines=torch.zeros_like(inp),
                    target=t,
                    n_steps=n_steps,
                    internal_batch_size=internal_batch_size,
                )
            else:
                with warnings.catch_warnings():  # "Setting backward hooks on ReLU": expected
                    warnings.simplefilter("ignore", UserWarning)
                    out = attr.GuidedBackprop(net).attribute(inp, target=t)
        return out.detach()

    return run


# ----------------------------------------------------------------------------- CAM


def find_target_layer(model: nn.Module, x: Tensor) -> str:
    """Dotted path of the last module (in execution order) with a 4-D output before pooling.

    Candidates are called exactly once per forward and are not global / adaptive pools; the last
    one to finish is the outermost module producing the final feature map (``layer4`` in a ResNet).
    """
    order: list[str] = []
    calls: dict[str, int] = {}
    handles = []
    names = {m: n for n, m in model.named_modules() if n}
    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

    def hook(module: nn.Module, _inp: Any, out: Any) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(out, Tensor) and out.dim() == 4 and not isinstance(module, pools):
            pooled = isinstance(module, nn.AvgPool2d | nn.MaxPool2d) and out.shape[-2:] == (1, 1)
            if not pooled:
                order.append(name)

    try:
        for m in names:
            handles.append(m.register_forward_hook(hook))
        with torch.no_grad(), _untouched(model):
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    for name in reversed(order):
        if calls[name] == 1:
            return name
    raise InvalidInputError(
        "grad-cam/score-cam: no module with a 4-D output found; pass target_layer="
    )


def _cam(model: nn.Module, kind: str, **options: Any) -> Attributor:
    try:
        from pytorch_grad_cam import GradCAM, ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"method {kind!r} needs grad-cam: pip install '.[baselines]'") from err
    layer_opt = options.pop("target_layer", None)
    batch_size = int(options.pop("batch_size", 32))
    if options:
        raise InvalidInputError(f"method {kind!r}: unknown options {sorted(options)}")

    def run(x: Tensor, target: Tensor | int | None) -> Tensor:
        _check_x(x)
        x = x.to(_device(model, x))
        if layer_opt is None:
            layer = model.get_submodule(find_target_layer(model, x))
        elif isinstance(layer_opt, str):
            try:
                layer = model.get_submodule(layer_opt)
            except AttributeError:
                raise InvalidInputError(f"target_layer={layer_opt!r} is not in the model") from None
        else:
            layer = layer_opt
        with _untouched(model):
            t = _targets(model, x, target)
            targets = [ClassifierOutputTarget(int(c)) for c in t.tolist()]
            cls = GradCAM if kind == "grad-cam" else ScoreCAM
            cam = cls(model=model, target_layers=[layer])
            try:
                cam.batch_size = batch_size
                # Score-CAM needs the input to need grad for nothing; Grad-CAM needs the feature
                # map to require grad, which a grad-requiring input gives with frozen parameters.
                inp = x.detach().clone().requires_grad_(kind == "grad-cam")
                with contextlib.redirect_stderr(io.StringIO()):  # score-cam's progress bars
                    maps = cam(input_tensor=inp, targets=targets)
            finally:
                cam.activations_and_grads.release()
        return _broadcast_map(torch.from_numpy(maps), x)

    return run


# ----------------------------------------------------------------------------- attention rollout

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def attention_maps(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Head-averaged attention weights (N, T, T) of every ``nn.MultiheadAttention``, in call order.

    Each call is switched to ``need_weights=True, average_attn_weights=True`` by a pre-hook and its
    weights are returned to the caller as None again, so the model's output does not change
    beyond the explicit-versus-fused attention path (float rounding).
    """
    maps: list[Tensor] = []
    handles = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
        call = dict(bound.arguments)
        call.pop("self")
        module._lrp_rollout_wanted = call.get("need_weights", True)  # type: ignore[assignment]
        call.update(need_weights=True, average_attn_weights=True)
        return (), call

    def post(module: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> Any:
        maps.append(out[1].detach())
        wanted = module.__dict__.pop("_lrp_rollout_wanted", True)
        return out if wanted else (out[0], None)

    layers = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not layers:
        raise InvalidInputError(
            f"attention-rollout: {type(model).__name__} has no nn.MultiheadAttention layer "
            "(supported: torchvision VisionTransformer and models built from that module)"
        )
    try:
        for m in layers:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad(), _untouched(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m in layers:
            m.__dict__.pop("_lrp_rollout_wanted", None)
    return maps


def attention_rollout(maps: list[Tensor]) -> Tensor:
    """Abnar & Zuidema 2020: (N, T) class-token row of prod_l norm(A_l / 2 + I / 2), last first.

    The identity half stands for the residual connection around each attention layer; rows are
    renormalised to sum to one. Token 0 is taken to be the class token.
    """
    if not maps:
        raise InvalidInputError("attention-rollout: no attention maps")
    n, t, _ = maps[0].shape
    eye = torch.eye(t, dtype=maps[0].dtype, device=maps[0].device).expand(n, t, t)
    rollout = eye
    for i, a in enumerate(maps):
        if tuple(a.shape) != (n, t, t):
            raise InvalidInputError(
                f"attention-rollout: attention layer {i} has weights {tuple(a.shape)}, expected "
                f"{(n, t, t)} (self-attention over one token sequence)"
            )
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout[:, 0]


def _rollout(model: nn.Module, **options: Any) -> Attributor:
    if options:
        raise InvalidInputError(f"method 'attention-rollout': unknown options {sorted(options)}")

    def run(x: Tensor, target: Tensor | int | None) -> Tensor:
        _check_x(x)
        del target  # rollout is class-agnostic
        x = x.to(_device(model, x))
        row = attention_rollout(attention_maps(model, x))[:, 1:]
        side = math.isqrt(row.shape[1])
        if side * side != row.shape[1]:
            raise InvalidInputError(
                f"attention-rollout: {row.shape[1]} tokens after the class token do not form a "
                "square patch grid"
            )
        return _broadcast_map(row.reshape(-1, side, side), x)

    return run


# ----------------------------------------------------------------------------- random


def _random(model: nn.Module, **options: Any) -> Attributor:
    seed = int(options.pop("seed", 0))
    if options:
        raise InvalidInputError(f"method 'random': unknown options {sorted(options)}")
    del model

    def run(x: Tensor, target: Tensor | int | None) -> Tensor:
        _check_x(x)
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)

    return run


_FACTORIES: dict[str, Callable[..., Attributor]] = {
    "gradient": lambda m, **o: _captum(m, "gradient", **o),
    "input-x-gradient": lambda m, **o: _captum(m, "input-x-gradient", **o),
    "integrated-gradients": lambda m, **o: _captum(m, "integrated-gradients", **o),
    "guided-backprop": lambda m, **o: _captum(m, "guided-backprop", **o),
    "grad-cam": lambda m, **o: _cam(m, "grad-cam", **o),
    "score-cam": lambda m, **o: _cam(m, "score-cam", **o),
    "random": _random,
    "attention-rollout": _rollout,
}
