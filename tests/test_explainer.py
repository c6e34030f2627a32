"""The Explainer's contract (docs/ENGINE_API.md): user model untouched, batching, targets, output
modes, caching of the prepared copy, recorded layer sums, dtypes, and errors on bad input."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import lrp

F64 = torch.float64


def small_cnn(dtype: torch.dtype = F64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(16, 5),
    ).to(dtype)
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.normal_(1, 0.2)
        bn.bias.normal_(0, 0.2)
    return model.eval()


def relu_net(dtype: torch.dtype = F64, seed: int = 1) -> nn.Sequential:
    """No BatchNorm, max-pools: LRP-0 = gradient x input, and layer relevance = act x grad."""
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Linear(16, 5),
        )
        .to(dtype)
        .eval()
    )


def inputs(n: int = 4, dtype: torch.dtype = F64, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=dtype)


COMPOSITE_KW = {
    "lrp-0": {},
    "epsilon": {"epsilon": 0.01},
    "epsilon-plus": {},
    "epsilon-plus-flat": {},
    "epsilon-gamma-box": {"input_bounds": (-3.0, 3.0)},
    "epsilon-alpha2-beta1": {},
    "epsilon-alpha2-beta1-flat": {},
    "otsuki2024": {},
}


def hook_free(model: nn.Module) -> bool:
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
    )
    return all(not getattr(m, n, {}) for m in model.modules() for n in names)


# ----------------------------------------------------------------------------------------------
# the user's model is never touched
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "lrp-0", "otsuki2024"])
@pytest.mark.parametrize("record", [False, True])
def test_model_unchanged(composite: str, record: bool) -> None:
    model = small_cnn()
    model[8].weight.requires_grad_(False)  # a mixed requires_grad pattern must survive
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    modes = {k: m.training for k, m in model.named_modules()}
    inplace = model[2].inplace
    types = [type(m) for m in model.modules()]
    x = inputs()
    with torch.no_grad():
        before = model(x)
    explainer = lrp.Explainer(model, composite=composite, **COMPOSITE_KW[composite])
    explainer(x, record_layers=record)
    explainer(x, target=1)
    assert set(model.state_dict()) == set(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert {k: m.training for k, m in model.named_modules()} == modes
    assert [type(m) for m in model.modules()] == types
    assert model[2].inplace is inplace
    assert all(p.grad is None for p in model.parameters())
    assert hook_free(model)
    assert explainer.prepared_model() is not model
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_training_mode_warns_and_stays_training() -> None:
    model = small_cnn().train()
    x = inputs()
    with pytest.warns(UserWarning, match="training mode"):
        e = lrp.Explainer(model, composite="lrp-0")(x)
    assert model.training and all(m.training for m in model.modules())
    # it explains the eval-mode behaviour (dropout off, running stats)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(e.logits, ref, rtol=1e-10, atol=1e-12)


def test_inference_mode_is_a_clear_error() -> None:
    model = small_cnn()
    explainer = lrp.Explainer(model)
    with torch.inference_mode(), pytest.raises(lrp.LRPError, match="inference_mode"):
        explainer(inputs())


# ----------------------------------------------------------------------------------------------
# batching, targets, output modes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("composite", list(COMPOSITE_KW))
def test_batch_equals_per_sample(composite: str) -> None:
    model = small_cnn()
    x = inputs(4)
    explainer = lrp.Explainer(model, composite=composite, **COMPOSITE_KW[composite])
    batch = explainer(x)
    for i in range(4):
        single = explainer(x[i : i + 1])
        assert torch.equal(single.target, batch.target[i : i + 1])
        assert torch.allclose(single.relevance, batch.relevance[i : i + 1], rtol=1e-9, atol=1e-12)
        assert torch.allclose(single.logits, batch.logits[i : i + 1], rtol=1e-10, atol=1e-12)
        assert torch.allclose(single.initial, batch.initial[i : i + 1], rtol=1e-10, atol=1e-12)


def test_targets() -> None:
    model = relu_net()
    x = inputs(4)
    explainer = lrp.Explainer(model, composite="lrp-0")
    with torch.no_grad():
        logits = model(x)

    def grad_x_input(t: torch.Tensor) -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        (g,) = torch.autograd.grad(out.gather(1, t.view(-1, 1)).sum(), xg)
        return g * x

    e = explainer(x)
    assert torch.equal(e.target, logits.argmax(1))
    assert e.target.dtype == torch.long
    assert torch.allclose(e.initial, logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1))
    assert torch.allclose(e.relevance, grad_x_input(logits.argmax(1)), rtol=1e-9, atol=1e-12)

    e = explainer(x, target=3)
    assert torch.equal(e.target, torch.full((4,), 3))
    assert torch.allclose(e.initial, logits[:, 3], rtol=1e-12)
    assert torch.allclose(e.relevance, grad_x_input(torch.full((4,), 3)), rtol=1e-9, atol=1e-12)

    t = torch.tensor([0, 4, 2, 1])
    assert torch.equal(explainer(x, target=t.tolist()).relevance, explainer(x, target=t).relevance)
    e = explainer(x, target=t)
    assert torch.equal(e.target, t)
    assert torch.allclose(e.initial, logits.gather(1, t.view(-1, 1)).squeeze(1), rtol=1e-12)
    assert torch.allclose(e.relevance, grad_x_input(t), rtol=1e-9, atol=1e-12)

    # output_relevance is linear: the sum of two one-hot maps gives the sum of the explanations
    R = torch.zeros(4, 5, dtype=F64)
    R[torch.arange(4), t] = logits.gather(1, t.view(-1, 1)).squeeze(1)
    e_r = explainer(x, output_relevance=R)
    assert torch.allclose(e_r.relevance, e.relevance, rtol=1e-12, atol=1e-14)
    assert torch.allclose(e_r.initial, R.sum(1))


def test_probability_output() -> None:
    model = small_cnn()
    x = inputs(3)
    explainer = lrp.Explainer(model, composite="lrp-0", output="probability")
    e = explainer(x, target=torch.tensor([1, 2, 0]))
    with torch.no_grad():
        logits = model(x)
    z = logits - logits.max(1, keepdim=True).values
    prob = z.exp() / z.exp().sum(1, keepdim=True)
    expected = prob[torch.arange(3), torch.tensor([1, 2, 0])]
    assert torch.allclose(e.initial, expected, rtol=1e-6)
    # relevance scales with the initial value: prob-explanation = logit-explanation * p / z
    e_logit = lrp.Explainer(model, composite="lrp-0")(x, target=torch.tensor([1, 2, 0]))
    scale = (expected / e_logit.initial).view(-1, 1, 1, 1)
    assert torch.allclose(e.relevance, e_logit.relevance * scale, rtol=1e-6, atol=1e-12)
    with pytest.raises(lrp.InvalidInputError):
        lrp.Explainer(model, output="log-prob")


# ----------------------------------------------------------------------------------------------
# the prepared copy
# ----------------------------------------------------------------------------------------------


def test_prepared_copy_is_reused() -> None:
    model = small_cnn()
    explainer = lrp.Explainer(model, composite="epsilon-plus")
    x = inputs()
    explainer(x)
    first = explainer.prepared_model()
    explainer(x)
    explainer(x, target=2)
    assert explainer.prepared_model() is first
    assert explainer.prepared_model() is explainer.prepared_model()


def test_an_explainer_that_has_run_pickles() -> None:
    """A used explainer goes to a worker process (Dask) as a new one does: without its prepared
    copy, which the copy rebuilds on its first call (the same relevance, bit for bit)."""
    explainer = lrp.Explainer(small_cnn(), composite="epsilon-plus-flat")
    x = inputs()
    expected = explainer(x).relevance
    first = explainer.prepared_model()
    for clone in (pickle.loads(pickle.dumps(explainer)), copy.deepcopy(explainer)):
        assert torch.equal(clone(x).relevance, expected)
    assert explainer.prepared_model() is first  # the original keeps its copy


@pytest.mark.parametrize("composite", sorted(COMPOSITE_KW))
def test_prepared_copy_holds_no_weight_copies(composite: str) -> None:
    """The copy uses the user's weight tensors (BatchNorm applied as a per-channel scale) and keeps
    no modified weights between calls unless ``cache_weights``; both give the same relevance."""
    from lrp.layers import LinearRuleLayer

    model = small_cnn()
    user = {t.untyped_storage().data_ptr() for t in model.parameters()}
    x = inputs()
    lean = lrp.Explainer(model, composite=composite, **COMPOSITE_KW[composite])
    cached = lrp.Explainer(model, composite=composite, cache_weights=True, **COMPOSITE_KW[composite])
    r_lean, r_cached = lean(x, target=1).relevance, cached(x, target=1).relevance
    torch.testing.assert_close(r_lean, r_cached, rtol=1e-12, atol=1e-14)
    layers = [m for m in lean.prepared_model().modules() if isinstance(m, LinearRuleLayer)]
    assert layers and all(m.weight.untyped_storage().data_ptr() in user for m in layers)
    assert all(m._rule_params is None for m in layers)
    cached_layers = [m for m in cached.prepared_model().modules() if isinstance(m, LinearRuleLayer)]
    assert all(m._rule_params is not None for m in cached_layers)
    if lean.composite.fold_batchnorm:  # the BatchNorm after the first conv became a scale
        assert layers[0].scale is not None


@pytest.mark.parametrize("how", ["data_mul", "no_grad_add", "load_state_dict", "bn_stats"])
def test_weight_change_is_picked_up(how: str) -> None:
    model = small_cnn()
    explainer = lrp.Explainer(model, composite="lrp-0")
    x = inputs()
    e0 = explainer(x)
    if how == "data_mul":
        # .data edits bypass autograd's version counters: documented, refresh() picks them up
        # (BatchNorm statistics are folded into per-channel scales when the copy is prepared)
        model[1].running_var.data.mul_(2)
        assert not torch.allclose(explainer(x).logits, model(x).detach())
        explainer.refresh()
    elif how == "no_grad_add":
        with torch.no_grad():
            model[8].bias.add_(0.5)
    elif how == "load_state_dict":
        sd = model.state_dict()
        sd["11.weight"] = sd["11.weight"] * -1.5
        model.load_state_dict(sd)
    else:
        with torch.no_grad():
            model[1].running_mean.add_(0.7)
    e1 = explainer(x)
    with torch.no_grad():
        expected = model(x)
    assert not torch.allclose(e0.logits, expected)
    assert torch.allclose(e1.logits, expected, rtol=1e-10, atol=1e-12)
    # and the relevance is that of a fresh explainer on the changed model
    fresh = lrp.Explainer(model, composite="lrp-0")(x, target=e1.target)
    assert torch.allclose(e1.relevance, fresh.relevance, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# recorded layer relevance
# ----------------------------------------------------------------------------------------------


def test_record_layers_sums() -> None:
    """LRP-0 on a ReLU/max-pool net: relevance at a module's output = activation x gradient."""
    model = relu_net()
    x = inputs(3)
    e = lrp.Explainer(model, composite="lrp-0")(x, record_layers=True)
    assert e.layer_relevance is not None
    # independent: activations and their gradients on the user's model via temporary hooks
    acts: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, n=n: acts.__setitem__(n, out))
        for n, m in model.named_modules()
        if n
    ]
    try:
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        sel = out.gather(1, e.target.view(-1, 1)).sum()
        names = list(acts)
        grads = torch.autograd.grad(sel, [acts[n] for n in names])
    finally:
        for h in handles:
            h.remove()
    assert set(e.layer_relevance) == set(names)
    for n, g in zip(names, grads, strict=True):
        expected = (acts[n] * g).flatten(1).sum(1).detach()
        got = e.layer_relevance[n]
        assert got.shape == (3,), n
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), n
    # the last layer's output holds the initial relevance
    assert torch.allclose(e.layer_relevance["9"], e.initial, rtol=1e-12)
    assert lrp.Explainer(model, composite="lrp-0")(x).layer_relevance is None


def test_record_layers_reports_user_paths() -> None:
    model = small_cnn()
    e = lrp.Explainer(model, composite="epsilon-plus-flat")(inputs(2), record_layers=True)
    user_paths = {n for n, _ in model.named_modules() if n}
    assert set(e.layer_relevance) <= user_paths
    assert {"0", "4", "8", "11"} <= set(e.layer_relevance)
    assert not any(k.endswith(".module") for k in e.layer_relevance)


def test_layer_maps_are_activation_times_gradient() -> None:
    """LRP-0 on a ReLU/max-pool net: the relevance tensor at a module's output is activation x
    gradient there, element by element (independent: hooks on the user's model)."""
    model = relu_net()
    x = inputs(3)
    paths = ["1", "3", "7"]
    e = lrp.Explainer(model, composite="lrp-0")(x, layer_maps=paths, record_layers=True)
    assert list(e.layer_maps) == paths
    acts: dict[str, torch.Tensor] = {}
    handles = [model[int(p)].register_forward_hook(
        lambda mod, a, out, p=p: acts.__setitem__(p, out)) for p in paths]
    try:
        out = model(x.clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    sel = out.gather(1, e.target.view(-1, 1)).sum()
    grads = torch.autograd.grad(sel, [acts[p] for p in paths])
    for path, g in zip(paths, grads, strict=True):
        expected = (acts[path] * g).detach()
        torch.testing.assert_close(e.layer_maps[path], expected, rtol=1e-9, atol=1e-12)
    for path in paths:
        assert e.layer_maps[path].shape[0] == 3
        torch.testing.assert_close(e.layer_maps[path].flatten(1).sum(1), e.layer_relevance[path])
    assert lrp.Explainer(model, composite="lrp-0")(x).layer_maps is None


def test_layer_map_equals_explaining_the_rest_of_the_model() -> None:
    """With rules fixed per layer type, the relevance at an inner module's output is what the
    explainer gives for the model after it, fed with that module's output."""
    model = small_cnn()
    rules = {nn.Conv2d: lrp.rules.ZPlus(), nn.Linear: lrp.rules.Epsilon(1e-3)}
    x = inputs(3)
    e = lrp.Explainer(model, composite=rules)(x, layer_maps=["3"])
    with torch.no_grad():
        inner = model[:4](x)
    tail = lrp.Explainer(model[4:].eval(), composite=rules)(inner, target=e.target)
    torch.testing.assert_close(e.layer_maps["3"], tail.relevance, rtol=1e-10, atol=1e-12)


def test_layer_maps_bad_paths() -> None:
    explainer = lrp.Explainer(small_cnn())
    with pytest.raises(lrp.InvalidInputError, match=r"no module 'linear'"):
        explainer(inputs(2), layer_maps=["linear"])
    with pytest.raises(lrp.InvalidInputError, match="did you mean"):
        explainer(inputs(2), layer_maps=["111"])
    with pytest.raises(lrp.InvalidInputError, match="list of module paths"):
        explainer(inputs(2), layer_maps="8")


# ----------------------------------------------------------------------------------------------
# dtypes and devices
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_dtype", [torch.float32, F64])
@pytest.mark.parametrize("x_dtype", [torch.float32, F64])
def test_output_dtype_follows_model(model_dtype: torch.dtype, x_dtype: torch.dtype) -> None:
    model = small_cnn(model_dtype)
    x = inputs(2, x_dtype)
    e = lrp.Explainer(model, composite="epsilon-plus-flat")(x)
    for t in (e.relevance, e.logits, e.initial):
        assert t.dtype == model_dtype
        assert t.device == next(model.parameters()).device
        assert not t.requires_grad
    assert e.target.dtype == torch.long
    assert e.relevance.shape == x.shape
    assert e.logits.shape == (2, 5)
    assert torch.isfinite(e.relevance).all()


def test_float32_close_to_float64() -> None:
    m64 = relu_net(F64)
    m32 = relu_net(torch.float32)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x = inputs(2)
    e64 = lrp.Explainer(m64, composite="epsilon-plus-flat")(x)
    e32 = lrp.Explainer(m32, composite="epsilon-plus-flat")(x.float(), target=e64.target)
    scale = e64.relevance.abs().max()
    assert (e32.relevance.double() - e64.relevance).abs().max() < 1e-4 * scale


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(2, 3, 8, 8, dtype=torch.long),
        torch.zeros(2, 3, 8, 8, dtype=torch.bool),
        torch.zeros(3, 8, 8, dtype=F64),
        torch.zeros(2, 1, 3, 8, 8, dtype=F64),
        torch.zeros(0, 3, 8, 8, dtype=F64),
        torch.full((2, 3, 8, 8), float("nan"), dtype=F64),
        torch.zeros(2, 3, 8, 8, dtype=F64).index_put_(
            (torch.tensor([1]),), torch.tensor(float("inf"), dtype=F64)
        ),
        [[1.0, 2.0]],
    ],
    ids=["long", "bool", "3d", "5d", "empty", "nan", "inf", "list"],
)
def test_bad_x(x) -> None:
    explainer = lrp.Explainer(small_cnn())
    with pytest.raises(lrp.InvalidInputError):
        explainer(x)


@pytest.mark.parametrize(
    "target",
    [
        5,
        -1,
        100,
        1.0,
        torch.tensor([0.0, 1.0]),
        torch.tensor([0, 1, 2]),
        torch.tensor([[0], [1]]),
        torch.tensor([0, 5]),
        torch.tensor([-1, 0]),
        True,
        "1",
        [0, 1, 2],
        [0.0, 1.0],
    ],
    ids=[
        "int-high",
        "int-neg",
        "int-far",
        "float",
        "float-tensor",
        "wrong-len",
        "wrong-rank",
        "tensor-high",
        "tensor-neg",
        "bool",
        "str",
        "list-wrong-len",
        "list-of-floats",
    ],
)
def test_bad_target(target) -> None:
    explainer = lrp.Explainer(small_cnn())
    with pytest.raises(lrp.InvalidInputError):
        explainer(inputs(2), target=target)


def test_wrong_channel_count_names_the_first_layer() -> None:
    explainer = lrp.Explainer(small_cnn())
    with pytest.raises(lrp.InvalidInputError, match=r"1 channels .*first layer '0' .* takes 3"):
        explainer(torch.zeros(2, 1, 8, 8, dtype=F64))


def test_channel_check_only_where_the_first_layer_reads_the_input() -> None:
    """A model that makes its own channels (grayscale to RGB) takes what its forward takes."""

    class Gray(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_cnn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.expand(-1, 3, -1, -1))

    result = lrp.Explainer(Gray().eval())(inputs(2)[:, :1])
    assert result.relevance.shape == (2, 1, 8, 8)


def test_bad_output_relevance_shape() -> None:
    explainer = lrp.Explainer(small_cnn())
    with pytest.raises(lrp.InvalidInputError):
        explainer(inputs(2), output_relevance=torch.zeros(2, 4, dtype=F64))


def test_non_finite_output_relevance() -> None:
    explainer = lrp.Explainer(small_cnn())
    r = torch.zeros(2, 5, dtype=F64)
    r[1, 3] = float("nan")
    with pytest.raises(lrp.InvalidInputError, match="output_relevance contains NaN"):
        explainer(inputs(2), output_relevance=r)


def test_nan_logits() -> None:
    model = small_cnn()
    with torch.no_grad():
        model[11].bias[2] = float("nan")
    with pytest.raises(lrp.InvalidInputError, match="NaN"):
        lrp.Explainer(model)(inputs(2))


def test_spatial_output_is_explained_for_the_target_channel() -> None:
    """An (N, K, H, W) output: the initial relevance is the target channel (its sum), and LRP-0
    on a bias-free linear model is gradient x input of that channel's sum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False)).to(F64).eval()
    x = inputs(2)
    e = lrp.Explainer(model, composite="lrp-0")(x, target=torch.tensor([1, 3]))
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    chosen = out[0, 1].sum() + out[1, 3].sum()
    (g,) = torch.autograd.grad(chosen, xg)
    torch.testing.assert_close(e.relevance, g * x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e.initial, torch.stack([out[0, 1].sum(), out[1, 3].sum()]).detach())
    assert (lrp.conservation(e) < 1e-10).all()
    # target None: the channel whose output sums highest
    assert e.target.shape == (2,)
    auto = lrp.Explainer(model, composite="lrp-0")(x)
    torch.testing.assert_close(auto.target, model(x).flatten(2).sum(2).argmax(1))


def test_non_tensor_or_flat_output_is_an_error() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), self.fc(x)

    with pytest.raises(lrp.InvalidInputError, match="one tensor"):
        lrp.Explainer(Pair().double().eval())(torch.randn(2, 6, dtype=F64))
    flat = nn.Sequential(nn.Linear(6, 3), nn.Flatten(0)).double().eval()
    with pytest.raises(lrp.InvalidInputError, match="num_classes"):
        lrp.Explainer(flat)(torch.randn(2, 6, dtype=F64))


class Running(nn.Module):
    """No rule: a running sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, 1)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_unsupported_leaf_module_names_path() -> None:
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), Running()), nn.Flatten(), nn.Linear(144, 3)
        )
        .to(F64)
        .eval()
    )
    with pytest.raises(lrp.UnsupportedLayerError, match=r"Running.*'1\.1'"):
        lrp.Explainer(model)(inputs(2))


def test_lstm_is_unsupported() -> None:
    class WithLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.lstm = nn.LSTM(4, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(self.fc(x).unsqueeze(1))[0][:, 0]

    model = nn.Sequential(nn.Linear(6, 4), nn.LSTM(4, 3)).to(F64).eval()
    with pytest.raises(lrp.UnsupportedLayerError, match=r"LSTM.*'1'"):
        lrp.Explainer(model)(torch.randn(2, 6, dtype=F64))
    with pytest.raises(lrp.LRPError, match=r"lstm|LSTM|WithLSTM"):
        lrp.Explainer(WithLSTM().double().eval())(torch.randn(2, 4, dtype=F64))


def test_hand_written_residual_is_a_split_merge() -> None:
    """``x + self.conv(x)`` inside a container: found in the graph and split, so relevance is
    conserved (the gradient would double it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), Residual(), nn.Flatten(),
                          nn.Linear(192, 3, bias=False))
    with torch.no_grad():
        model[1].conv.bias.zero_()
    model = model.to(F64).eval()
    e = lrp.Explainer(model, composite="lrp-0")(inputs(2))
    assert (lrp.conservation(e) < 1e-10).all(), lrp.conservation(e)
    copied = lrp.Explainer(model, composite="lrp-0", residual="gradient")(inputs(2))
    assert (lrp.conservation(copied) > 1e-3).all()


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x)
        return x


def test_untraceable_container_names_module_and_line() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.ReLU(), Branchy())),
        nn.Flatten(),
        nn.Linear(192, 3),
    ).to(F64).eval()
    with pytest.raises(lrp.UnresolvedStructureError, match=r"'0\.1\.1'.*register_container") as err:
        lrp.Explainer(model)(inputs(2))
    assert "if x.sum() > 0" in str(err.value)  # the source line


def test_unsupported_operation_names_op_path_and_line() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), Running()), nn.Flatten(),
                          nn.Linear(144, 3)).to(F64).eval()
    with pytest.raises(lrp.UnsupportedOperationError, match=r"'cumsum' at Running at '1\.1'") as err:
        lrp.Explainer(model)(inputs(2))
    assert "torch.cumsum(x, 1)" in str(err.value)


def test_registered_container_is_followed() -> None:
    @lrp.register_container
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.conv(x))

    torch.manual_seed(3)
    model = nn.Sequential(Chain(), nn.Flatten(), nn.Linear(144, 3)).to(F64).eval()
    x = inputs(2)
    e = lrp.Explainer(model, composite="lrp-0")(x)
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    (g,) = torch.autograd.grad(out.gather(1, e.target.view(-1, 1)).sum(), xg)
    assert torch.allclose(e.relevance, g * x, rtol=1e-9, atol=1e-12)


def test_bad_composite_and_options() -> None:
    model = small_cnn()
    with pytest.raises(lrp.InvalidInputError):
        lrp.Explainer(model, composite="no-such-composite")
    with pytest.raises(lrp.InvalidInputError):
        lrp.Explainer(model, composite="epsilon", epsilonn=0.1)
    with pytest.raises(lrp.InvalidInputError):
        lrp.Explainer("not a model")  # type: ignore[arg-type]


def test_no_warning_in_normal_use() -> None:
    model = small_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrp.Explainer(model, composite="epsilon-plus-flat")(inputs(2))


def test_validate_false_gives_same_result_and_skips_value_checks() -> None:
    """``validate=False`` (no device waits) changes nothing for good input; NaN flows through."""
    model = small_cnn()
    explainer = lrp.Explainer(model)
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    target = torch.tensor([0, 4, 2])
    checked = explainer(x, target)
    fast = explainer(x, target, validate=False)
    torch.testing.assert_close(fast.relevance, checked.relevance, rtol=0, atol=0)
    torch.testing.assert_close(fast.initial, checked.initial, rtol=0, atol=0)
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(lrp.InvalidInputError, match="NaN"):
        explainer(bad, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor the NaN-relevance warning
        out = explainer(bad, target, validate=False)
    assert torch.isnan(out.relevance[1]).any()
    assert torch.isfinite(out.relevance[[0, 2]]).all()
    with pytest.raises(lrp.InvalidInputError, match="dimensions"):  # shapes are still checked
        explainer(torch.randn(3, 8, 8, dtype=F64), validate=False)


def test_folded_layer_under_a_module_rule_keeps_the_model_function() -> None:
    """A conv whose BatchNorm was folded but that gets a weight-free rule runs its own forward:
    the fold is materialised into its (private) weights, so the copy still computes the model."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)
    ).to(F64).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 1.5)
        model[1].weight.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explainer = lrp.Explainer(model, {"0": lrp.rules.Pass(), nn.Linear: lrp.rules.Epsilon()})
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    torch.testing.assert_close(explainer(x, 0).logits, model(x).detach(), rtol=1e-12, atol=1e-12)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # the user's model is untouched
