"""Baseline attribution methods: shapes, exact values where known, and an untouched model."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lrp.baselines import BASELINES, attribute, find_target_layer, make_attributor, methods
from lrp.errors import InvalidInputError

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


class TinyNet(nn.Module):
    """conv-bn-relu(inplace) x2, global pool, linear: enough for CAMs and guided backprop."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 8, 3, padding=1, stride=2),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def tiny() -> TinyNet:
    torch.manual_seed(0)
    m = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (m.features[1], m.features[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def images(n: int = 2) -> Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def hook_count(model: nn.Module) -> int:
    return sum(len(getattr(m, d, {})) for m in model.modules() for d in HOOK_DICTS)


def input_gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    x = x.clone().requires_grad_(True)
    out = model(x).gather(1, target[:, None]).sum()
    (g,) = torch.autograd.grad(out, x)
    return g


@pytest.mark.parametrize("method", BASELINES)
def test_shape_and_model_untouched(method: str) -> None:
    model = tiny()
    model.train()  # CAM libraries switch to eval: the flag must come back
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.grad for p in model.parameters()]
    x = images()
    with torch.no_grad():
        model.eval()
        target = model(x).argmax(1)
        model.train()
    r = attribute(model, x, target=target, method=method)
    assert r.shape == x.shape and r.dtype == x.dtype
    assert torch.isfinite(r).all()
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert hook_count(model) == 0
    assert all(p.requires_grad for p in model.parameters())
    assert [p.grad for p in model.parameters()] == grads_before
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_gradient_equals_autograd() -> None:
    model = tiny()
    x = images(3)
    target = torch.tensor([0, 3, 1])
    g = input_gradient(model, x, target)
    assert torch.allclose(attribute(model, x, target, method="gradient"), g, atol=1e-6)
    ixg = attribute(model, x, target, method="input-x-gradient")
    assert torch.allclose(ixg, x * g, atol=1e-6)


def test_default_target_is_prediction() -> None:
    model = tiny()
    x = images(3)
    pred = model(x).argmax(1)
    assert torch.allclose(
        attribute(model, x, method="gradient"), input_gradient(model, x, pred), atol=1e-6
    )


def test_integrated_gradients_linear_model_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    x = torch.rand(2, 3, 4, 4)
    r = attribute(model, x, target=1, method="integrated-gradients", n_steps=8)
    expected = x * model[1].weight[1].view(3, 4, 4)
    assert torch.allclose(r, expected, atol=1e-6)
    # completeness: sum = f(x) - f(0)
    diff = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    assert torch.allclose(r.flatten(1).sum(1), diff, atol=1e-5)


def test_guided_backprop_is_non_negative_through_relu_net() -> None:
    """A ReLU net whose first layer is the identity: guided backprop passes only positive grads."""
    model = tiny()
    x = images(2)
    r = attribute(model, x, target=0, method="guided-backprop")
    assert r.abs().sum() > 0
    assert not torch.allclose(r, attribute(model, x, target=0, method="gradient"))


def test_find_target_layer_and_cams() -> None:
    model = tiny()
    x = images(2)
    assert find_target_layer(model, x) == "features"
    for method in ("grad-cam", "score-cam"):
        r = attribute(model, x, target=1, method=method)
        heat = r.sum(1)
        # CAMs are non-negative, normalised to [0, 1] by the library, equal over channels
        assert heat.min() >= 0 and heat.max() <= 1 + 1e-6
        assert torch.allclose(r[:, 0], r[:, 2])
        explicit = attribute(model, x, target=1, method=method, target_layer="features.5")
        assert torch.allclose(explicit, r, atol=1e-6)


def test_grad_cam_equals_definition() -> None:
    """Grad-CAM = ReLU(sum_c mean(dy/dA_c) A_c), upsampled and min-max scaled per image."""
    model = tiny()
    x = images(2)
    feats = model.features(x).detach().requires_grad_(True)
    y = model.fc(model.pool(feats).flatten(1))[:, 2].sum()
    (g,) = torch.autograd.grad(y, feats)
    cam = torch.relu((g.mean((2, 3), keepdim=True) * feats).sum(1)).detach()
    r = attribute(model, x, target=2, method="grad-cam").sum(1)
    # the library resizes with cv2 (not torch): compare the upsampled map's ranking coarsely
    up = torch.nn.functional.interpolate(cam[:, None], size=(16, 16), mode="nearest")[:, 0]
    for n in range(2):
        assert torch.corrcoef(torch.stack([up[n].flatten(), r[n].flatten()]))[0, 1] > 0.9


def test_random_is_seeded() -> None:
    model = tiny()
    x = images()
    a = attribute(model, x, method="random", seed=1)
    assert torch.equal(a, attribute(model, x, method="random", seed=1))
    assert not torch.equal(a, attribute(model, x, method="random", seed=2))


def test_unknown_method_and_options() -> None:
    model = tiny()
    with pytest.raises(InvalidInputError, match="method"):
        attribute(model, images(), method="lime")
    with pytest.raises(InvalidInputError, match="unknown options"):
        attribute(model, images(), method="gradient", n_step=3)
    with pytest.raises(InvalidInputError, match="x must be"):
        attribute(model, torch.rand(3, 16, 16), method="gradient")


def test_methods_lists_lrp_composites() -> None:
    import lrp

    names = methods()
    assert set(BASELINES) <= set(names)
    assert set(lrp.composites.names()) <= set(names)


def test_lrp_method_through_engine() -> None:
    import lrp

    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(2)
    r = attribute(model, x, target=1, method="epsilon-plus-flat")
    e = lrp.Explainer(model, composite="epsilon-plus-flat")(x, target=1)
    assert r.shape == x.shape
    assert torch.allclose(r, e.relevance)
    f = make_attributor(model, "epsilon", epsilon=1e-9)
    assert f(x, torch.tensor([0, 1])).shape == x.shape
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert hook_count(model) == 0


def test_lrp_residual_option_on_resnet() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.rand(1, 3, 32, 32)
    for residual in ("splitting", "gradient"):
        r = attribute(model, x, target=0, method="epsilon-plus-flat", residual=residual)
        assert r.shape == x.shape and torch.isfinite(r).all()


def test_attention_rollout_by_hand() -> None:
    """Two layers, two tokens: norm(A/2 + I/2) per layer, then their product, computed by hand.

    A1 = [[.8, .2], [.4, .6]] -> [[.9, .1], [.2, .8]]; A2 = [[.2, .8], [1, 0]] -> [[.6, .4],
    [.5, .5]]; class-token row of A2' A1' = [.6*.9 + .4*.2, .6*.1 + .4*.8] = [.62, .38].
    """
    from lrp.baselines import attention_rollout

    a1 = torch.tensor([[[0.8, 0.2], [0.4, 0.6]]], dtype=torch.float64)
    a2 = torch.tensor([[[0.2, 0.8], [1.0, 0.0]]], dtype=torch.float64)
    row = attention_rollout([a1, a2])
    assert torch.allclose(row, torch.tensor([[0.62, 0.38]], dtype=torch.float64), atol=1e-15)


def _tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        16, 8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    with torch.no_grad():
        for p in model.parameters():  # torchvision zero-initialises the head and some biases
            p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


def test_attention_rollout_matches_attention_recomputed_by_hand() -> None:
    """Each layer's softmax(q k^T / sqrt(d)) from its LayerNorm output and in-projection, head
    mean, then the rollout with explicit loops; the map is that row upsampled, C-th per channel."""
    import torch.nn.functional as F

    model = _tiny_vit()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layers = list(model.encoder.layers)
    inputs: list[Tensor] = []
    handles = [blk.ln_1.register_forward_hook(lambda _m, _i, o: inputs.append(o)) for blk in layers]
    with torch.no_grad():
        before = model(x)
    for h in handles:
        h.remove()
    expected = []
    for n in range(2):
        rollout = torch.eye(5, dtype=torch.float64)
        for blk, h in zip(layers, inputs, strict=True):
            mha = blk.self_attention
            q, k, _ = (h[n] @ mha.in_proj_weight.T + mha.in_proj_bias).chunk(3, dim=-1)
            heads = []
            for i in range(2):
                qh, kh = q[:, 4 * i : 4 * i + 4], k[:, 4 * i : 4 * i + 4]
                heads.append(torch.softmax(qh @ kh.T / 2.0, dim=-1))
            a = 0.5 * (heads[0] + heads[1]) / 2 + 0.5 * torch.eye(5, dtype=torch.float64)
            a = a / a.sum(1, keepdim=True)
            rollout = a @ rollout
        expected.append(rollout[0, 1:])
    expected_map = F.interpolate(
        torch.stack(expected).reshape(2, 1, 2, 2),
        size=(16, 16),
        mode="bilinear",
        align_corners=False,
    )[:, 0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = attribute(model, x, target=1, method="attention-rollout")
    assert r.shape == x.shape
    assert torch.allclose(r.sum(1), expected_map, atol=1e-12)
    assert torch.allclose(r[:, 0], r[:, 2])
    assert hook_count(model) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-12)


def test_attention_rollout_refuses_a_cnn() -> None:
    with pytest.raises(InvalidInputError, match=r"no nn\.MultiheadAttention"):
        attribute(tiny(), images(), method="attention-rollout")
