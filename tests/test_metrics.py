"""Metrics against slow, obviously-correct reference loops and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lrp.errors import InvalidInputError
from lrp.metrics import (
    boxes_to_masks,
    conservation_error,
    insertion_deletion,
    perturbation_curve,
    pointing_game,
    relevance_mass,
)
from lrp.metrics._core import (
    gaussian_blur,
    make_baseline,
    perturbed_scores,
    step_counts,
    step_positions,
)
from lrp.postprocess import heat_quantization

H = W = 8


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * (H // 2) * (W // 2), 5),
    )
    return m.double().eval()


def data(n: int = 3, quantized: bool = False) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, H, W, generator=g, dtype=torch.float64)
    heat = torch.randn(n, 3, H, W, generator=g, dtype=torch.float64)
    if quantized:  # many ties
        heat = torch.round(heat * 2) / 2
    return x, heat


class OnePixel(nn.Module):
    """Class 0's logit is the value of pixel (channel 0, row 3, column 5); class 1's is 0."""

    def forward(self, x: Tensor) -> Tensor:
        v = x[:, 0, 3, 5]
        return torch.stack([v, torch.zeros_like(v)], dim=1)


class PixelSum(nn.Module):
    """Class 0's logit is the sum of channel 0: it counts the pixels left in an all-ones image."""

    def forward(self, x: Tensor) -> Tensor:
        s = x[:, 0].flatten(1).sum(1)
        return torch.stack([s, -s], dim=1)


# ----------------------------------------------------------------------------- references


def ref_counts(p: int, steps: int | None, pps: int | None) -> list[int]:
    if pps is not None:
        return [min(i * pps, p) for i in range(math.ceil(p / pps) + 1)]
    return [round(i * p / steps) for i in range(steps + 1)]


def ref_moved(values: list[float], k: int, ties: str, descending: bool = True) -> set[int]:
    """Indices moved after k units: the k first in a stable sort, or all at/above the k-th value."""
    sign = -1 if descending else 1
    order = sorted(range(len(values)), key=lambda i: (sign * values[i], i))
    if k == 0:
        return set()
    if ties == "rank":
        return set(order[:k])
    kth = values[order[k - 1]]
    return {i for i, v in enumerate(values) if (v >= kth if descending else v <= kth)}


def ref_score(model: nn.Module, img: Tensor, cls: int, score: str) -> float:
    with torch.no_grad():
        out = model(img[None])[0]
    if score == "softmax":
        out = torch.softmax(out, 0)
    return float(out[cls])


def ref_trapezoid(ys: list[float], xs: list[float]) -> float:
    return sum((ys[i] + ys[i + 1]) / 2 * (xs[i + 1] - xs[i]) for i in range(len(ys) - 1))


def ref_insertion_deletion(model, x, heat, baseline, target, steps, pps, score, ties):
    """One image, one step, one forward at a time; pixels set one by one."""
    results = []
    for n in range(x.shape[0]):
        img, base = x[n], baseline[n]
        values = heat[n].sum(0).flatten().tolist()
        with torch.no_grad():
            cls = int(model(img[None]).argmax()) if target is None else target
        counts = ref_counts(H * W, steps, pps)
        ins, dele = [], []
        for k in counts:
            moved = ref_moved(values, k, ties)
            d, i = img.clone(), base.clone()
            for p in moved:
                r, c = divmod(p, W)
                d[:, r, c] = base[:, r, c]
                i[:, r, c] = img[:, r, c]
            dele.append(ref_score(model, d, cls, score))
            ins.append(ref_score(model, i, cls, score))
        xs = [k / (H * W) for k in counts]
        results.append((ins, dele, ref_trapezoid(ins, xs), ref_trapezoid(dele, xs)))
    return results


# ----------------------------------------------------------------------------- insertion/deletion


@pytest.mark.parametrize(
    ("baseline", "steps", "pps", "score", "ties", "quantized"),
    [
        ("zero", 10, None, "softmax", "rank", False),
        ("blur", None, 5, "logit", "rank", False),
        ("mean", 7, None, "softmax", "threshold", True),
        ("uniform", None, 9, "logit", "threshold", False),
        ("zero", 16, None, "softmax", "rank", True),
    ],
)
def test_insertion_deletion_matches_reference(baseline, steps, pps, score, ties, quantized):
    model = tiny_model()
    x, heat = data(quantized=quantized)
    res = insertion_deletion(
        model,
        x,
        heat,
        steps=steps or 100,
        pixels_per_step=pps,
        baseline=baseline,
        score=score,
        ties=ties,
        batch_size=7,
    )
    base, _ = make_baseline("t", x, baseline, seed=0, noise_range=None)
    ref = ref_insertion_deletion(model, x, heat, base, None, steps, pps, score, ties)
    for n, (ins, dele, ins_auc, del_auc) in enumerate(ref):
        assert res.insertion_curve[n].tolist() == pytest.approx(ins, abs=1e-6)
        assert res.deletion_curve[n].tolist() == pytest.approx(dele, abs=1e-6)
        assert res.insertion[n].item() == pytest.approx(ins_auc, abs=1e-6)
        assert res.deletion[n].item() == pytest.approx(del_auc, abs=1e-6)
    assert torch.allclose(res.id, res.insertion - res.deletion)
    assert res.params["baseline"] == baseline and res.params["ties"] == ties
    assert res.params["score"] == score


def test_target_and_predicted_class() -> None:
    model = tiny_model()
    x, heat = data()
    res = insertion_deletion(model, x, heat, target=2, steps=8)
    ref = ref_insertion_deletion(model, x, heat, torch.zeros_like(x), 2, 8, None, "softmax", "rank")
    for n in range(3):
        assert res.deletion_curve[n].tolist() == pytest.approx(ref[n][1], abs=1e-6)
    assert res.target.tolist() == [2, 2, 2]
    pred = insertion_deletion(model, x, heat, target=2, steps=8, score_class="predicted")
    assert pred.target.tolist() == model(x).argmax(1).tolist()


def test_one_pixel_model_known_curve() -> None:
    model = OnePixel()
    x = torch.rand(1, 3, H, W, dtype=torch.float64) + 0.5
    heat = torch.arange(H * W, dtype=torch.float64).flip(0).view(1, H, W)  # row-major ranking
    rank = 3 * W + 5  # pixel (3, 5) is moved at step rank + 1
    res = insertion_deletion(model, x, heat, target=0, pixels_per_step=1, score="logit")
    value = x[0, 0, 3, 5].item()
    expected_del = [value] * (rank + 1) + [0.0] * (H * W - rank)
    expected_ins = [0.0] * (rank + 1) + [value] * (H * W - rank)
    assert res.deletion_curve[0].tolist() == expected_del
    assert res.insertion_curve[0].tolist() == expected_ins
    assert res.fractions.numel() == H * W + 1
    # AUC by the trapezoid rule: the drop happens between fractions rank/P and (rank+1)/P
    p = H * W
    assert res.deletion[0].item() == pytest.approx(value * (rank + 0.5) / p)
    assert res.insertion[0].item() == pytest.approx(value * (p - rank - 0.5) / p)


def test_monotone_curves_for_monotone_model() -> None:
    model = PixelSum()
    x = torch.rand(2, 3, H, W, dtype=torch.float64)
    heat = torch.randn(2, H, W, dtype=torch.float64)
    res = insertion_deletion(model, x, heat, target=0, score="logit", steps=13)
    assert (res.deletion_curve.diff(dim=1) <= 1e-12).all()
    assert (res.insertion_curve.diff(dim=1) >= -1e-12).all()
    assert res.deletion_curve[:, -1].abs().max() < 1e-12
    assert torch.allclose(res.insertion_curve[:, -1], x[:, 0].sum((1, 2)))


@pytest.mark.parametrize("ties", ["rank", "threshold"])
def test_ties(ties: str) -> None:
    """PixelSum on an all-ones image counts the pixels still present."""
    model = PixelSum()
    x = torch.ones(1, 3, H, W, dtype=torch.float64)
    heat = (torch.arange(H * W) // 16).flip(0).double().view(1, H, W)  # 4 groups of 16 tied pixels
    res = insertion_deletion(model, x, heat, target=0, score="logit", pixels_per_step=5, ties=ties)
    moved = H * W - res.deletion_curve[0]
    counts = ref_counts(H * W, None, 5)
    if ties == "rank":
        assert moved.tolist() == counts
    else:  # whole groups move together: the next multiple of 16 at or above k
        assert moved.tolist() == [16 * math.ceil(k / 16) for k in counts]
    assert res.params["ties"] == ties


def test_batch_equals_per_sample() -> None:
    model = tiny_model()
    x, heat = data(n=4)
    kwargs = dict(steps=9, baseline="uniform", ties="threshold")
    full = insertion_deletion(model, x, heat, **kwargs, batch_size=5)
    for n in range(4):
        one = insertion_deletion(model, x[n : n + 1], heat[n : n + 1], **kwargs, batch_size=64)
        assert torch.allclose(full.insertion_curve[n], one.insertion_curve[0], atol=1e-10)
        assert torch.allclose(full.deletion_curve[n], one.deletion_curve[0], atol=1e-10)
    pert = perturbation_curve(model, x, heat, region=3, batch_size=3)
    for n in range(4):
        one = perturbation_curve(model, x[n : n + 1], heat[n : n + 1], region=3)
        assert torch.allclose(pert.curve[n], one.curve[0], atol=1e-10)


def test_params_are_json_serialisable() -> None:
    import json

    model = tiny_model()
    x, heat = data(n=1)
    json.dumps(insertion_deletion(model, x, heat, steps=4).params)
    json.dumps(perturbation_curve(model, x, heat, steps=4, region=2).params)


def test_baselines() -> None:
    x = torch.rand(2, 3, 20, 20, dtype=torch.float64)
    const = torch.full((1, 2, 20, 20), 0.7, dtype=torch.float64)
    blurred = gaussian_blur(const)
    assert torch.allclose(blurred[..., 5:-5, 5:-5], const[..., 5:-5, 5:-5])  # kernel sums to 1
    assert (blurred[..., 0, 0] < 0.7).all()  # zero padding at the border, as RISE
    mean, _ = make_baseline("t", x, "mean", seed=0, noise_range=None)
    assert torch.allclose(mean[:, :, 4, 7], x.mean((2, 3)))
    noise, _ = make_baseline("t", x, "uniform", seed=3, noise_range=(-1.0, 2.0))
    assert noise.min() >= -1 and noise.max() <= 2
    again, _ = make_baseline("t", x, "uniform", seed=3, noise_range=(-1.0, 2.0))
    assert torch.equal(noise, again)
    own, _ = make_baseline("t", x, "uniform", seed=3, noise_range=None)
    assert (own.flatten(1).min(1).values >= x.flatten(1).min(1).values).all()
    assert (own.flatten(1).max(1).values <= x.flatten(1).max(1).values).all()


def test_errors_name_the_parameter() -> None:
    model = tiny_model()
    x, heat = data()
    with pytest.raises(InvalidInputError, match="baseline"):
        insertion_deletion(model, x, heat, baseline="black")
    with pytest.raises(InvalidInputError, match="heatmaps"):
        insertion_deletion(model, x, heat[:, :, :4])
    bad = heat.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        insertion_deletion(model, x, bad)
    with pytest.raises(InvalidInputError, match="images"):
        insertion_deletion(model, x[0], heat)
    with pytest.raises(InvalidInputError, match="ties"):
        insertion_deletion(model, x, heat, ties="random")
    with pytest.raises(InvalidInputError, match="score"):
        insertion_deletion(model, x, heat, score="prob")
    with pytest.raises(InvalidInputError, match="pixels_per_step"):
        insertion_deletion(model, x, heat, pixels_per_step=0)
    with pytest.raises(InvalidInputError, match="target"):
        insertion_deletion(model, x, heat, target=torch.tensor([0, 1]))
    with pytest.raises(InvalidInputError, match="order"):
        perturbation_curve(model, x, heat, order="up")
    with pytest.raises(InvalidInputError, match="reduce"):
        insertion_deletion(model, x, heat, reduce="mean")


# ----------------------------------------------------------------------------- deduplication


def naive_perturbed_scores(model, images, alt, positions, counts, classes, invert, score, bs):
    """Every (track, image, step) forwarded, in that order (perturbed_scores before dedup)."""
    n, _, h, w = images.shape
    s1 = counts.numel()
    inv = torch.tensor(invert)
    total = len(invert) * n * s1
    out = torch.empty(total, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, total, bs):
            job = torch.arange(start, min(start + bs, total))
            track, rest = job // (n * s1), job % (n * s1)
            img, step = rest // s1, rest % s1
            mask = ((positions[img] < counts[step, None]) != inv[track, None]).view(-1, 1, h, w)
            logits = model(torch.where(mask, alt[img], images[img])).double()
            if score == "softmax":
                logits = logits.softmax(1)
            out[start : start + job.numel()] = logits.gather(1, classes[img, None]).squeeze(1)
    return out.view(len(invert), n, s1)


class Counting(nn.Module):
    """Counts the inputs it is run on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.inner(x)


def dedup_heat(kind: str, n: int) -> Tensor:
    g = torch.Generator().manual_seed(3)
    heat = torch.randn(n, H, W, generator=g, dtype=torch.float64)
    if kind == "q8":
        return heat_quantization(heat, 8)
    if kind == "relu":  # most pixels tied at 0 (a ReLU'd map, Grad-CAM)
        return heat.clamp(min=1.0)
    if kind == "const":  # every pixel tied: only the two ends
        return torch.zeros_like(heat)
    return heat


@pytest.mark.parametrize("kind", ["raw", "q8", "relu", "const"])
@pytest.mark.parametrize("ties", ["rank", "threshold"])
@pytest.mark.parametrize("invert", [(False, True), (True,), (False, True, False, True)])
@pytest.mark.parametrize("bs", [1, 5, 64])
@pytest.mark.parametrize("clean", [False, True])
def test_dedup_equals_every_job(kind, ties, invert, bs, clean) -> None:
    """Only distinct inputs run, and the scores equal forwarding every (track, image, step)."""
    model = Counting(tiny_model())
    x, _ = data(n=3)
    heat = dedup_heat(kind, 3)
    alt, _ = make_baseline("t", x, "uniform", seed=0, noise_range=None)
    pos = step_positions(heat.reshape(3, -1), ties)
    counts = torch.cat([step_counts(H * W, 10, None, "t"), torch.tensor([7, 64, 0])])  # repeats
    classes = torch.tensor([0, 3, 4])
    logits = model.inner(x) if clean else None
    got = perturbed_scores(
        model, x, alt, pos, counts, classes, invert=invert, score="softmax", batch_size=bs,
        clean_logits=logits,
    )
    ref = naive_perturbed_scores(model.inner, x, alt, pos, counts, classes, invert, "softmax", 7)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # distinct inputs per image: the image itself, alt, and each other moved-pixel count per side
    expected = 0
    for i in range(3):
        moved = {int((pos[i] < k).sum()) for k in counts}
        inner = moved - {0, H * W}
        sides = len(set(invert))
        expected += len(inner) * sides + 1 + (0 if clean else 1)
    assert model.rows == expected
    if ties == "rank" and kind != "const":
        assert len(inner) == len(set(counts.tolist()) - {0, H * W})  # nothing merged but repeats


@pytest.mark.parametrize("ties", ["rank", "threshold"])
def test_dedup_float32_batch_composition(ties) -> None:
    """A float32 model: equal to the naive order up to the roundoff of other batch mixes."""
    model = tiny_model().float()
    x, _ = data(n=5)
    x = x.float()
    heat = dedup_heat("q8", 5).float()
    pos = step_positions(heat.reshape(5, -1), ties)
    counts = step_counts(H * W, 12, None, "t")
    classes = torch.tensor([0, 1, 2, 3, 4])
    alt = torch.zeros_like(x)
    got = perturbed_scores(
        model, x, alt, pos, counts, classes, invert=(False, True), score="logit", batch_size=6
    )
    ref = naive_perturbed_scores(model, x, alt, pos, counts, classes, (False, True), "logit", 9)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_metrics_forward_only_distinct_inputs() -> None:
    """Heat-quantized insertion/deletion: at most levels + 1 inputs per curve, ends shared."""
    model = Counting(tiny_model())
    x, _ = data(n=2)
    heat = dedup_heat("q8", 2)
    res = insertion_deletion(model, x, heat, steps=32, ties="threshold", batch_size=7)
    # the clean forward of resolve_classes, alt once, then at most 7 inner inputs per curve
    assert model.rows <= 2 + 2 + 2 * 2 * 7
    ref = ref_insertion_deletion(model.inner, x, heat[:, None], torch.zeros_like(x), None, 32,
                                 None, "softmax", "threshold")
    for n, (ins, dele, _, _) in enumerate(ref):
        assert res.insertion_curve[n].tolist() == pytest.approx(ins, abs=1e-12)
        assert res.deletion_curve[n].tolist() == pytest.approx(dele, abs=1e-12)
    model.rows = 0
    pert = perturbation_curve(model, x, heat, region=2, steps=100, batch_size=5)
    assert model.rows == 2 + 2 * 16  # clean once, then each of the 16 tiles' steps
    assert pert.params["steps"] == 16


def test_perturbed_scores_checks_clean_logits() -> None:
    model = tiny_model()
    x, heat = data(n=2)
    pos = step_positions(heat.sum(1).reshape(2, -1), "rank")
    with pytest.raises(InvalidInputError, match="clean_logits"):
        perturbed_scores(
            model, x, x, pos, torch.tensor([0, 64]), torch.tensor([0, 1]), invert=(False,),
            score="logit", batch_size=4, clean_logits=torch.zeros(3, 5),
        )


# ----------------------------------------------------------------------------- MoRF / LeRF


def ref_perturbation(model, x, heat, noise, region, steps, order, score):
    out = []
    th, tw = math.ceil(H / region), math.ceil(W / region)
    for n in range(x.shape[0]):
        hm = heat[n].sum(0)
        tiles = [(i, j) for i in range(th) for j in range(tw)]
        sums = [
            float(hm[i * region : (i + 1) * region, j * region : (j + 1) * region].sum())
            for i, j in tiles
        ]
        with torch.no_grad():
            cls = int(model(x[n][None]).argmax())
        curve = []
        for k in range(min(steps, len(tiles)) + 1):
            img = x[n].clone()
            for t in ref_moved(sums, k, "rank", descending=(order == "morf")):
                i, j = tiles[t]
                sl = (
                    slice(None),
                    slice(i * region, (i + 1) * region),
                    slice(j * region, (j + 1) * region),
                )
                img[sl] = noise[n][sl]
            curve.append(ref_score(model, img, cls, score))
        aopc = sum(curve[0] - c for c in curve) / len(curve)
        out.append((curve, aopc))
    return out


@pytest.mark.parametrize(
    ("order", "region", "steps", "score"),
    [("morf", 3, 100, "logit"), ("lerf", 3, 5, "softmax"), ("morf", 2, 7, "softmax")],
)
def test_perturbation_matches_reference(order, region, steps, score):
    model = tiny_model()
    x, heat = data()
    res = perturbation_curve(
        model, x, heat, order=order, region=region, steps=steps, score=score, batch_size=4
    )
    noise, _ = make_baseline("t", x, "uniform", seed=0, noise_range=None)
    ref = ref_perturbation(model, x, heat, noise, region, steps, order, score)
    for n, (curve, aopc) in enumerate(ref):
        assert res.curve[n].tolist() == pytest.approx(curve, abs=1e-6)
        assert res.aopc[n].item() == pytest.approx(aopc, abs=1e-6)
    assert res.params["steps"] == min(steps, math.ceil(H / region) ** 2)


def test_morf_one_pixel_model() -> None:
    """The tile holding pixel (3, 5) is perturbed at the step given by its rank."""
    model = OnePixel()
    x = torch.rand(1, 3, H, W, dtype=torch.float64) + 2.0
    heat = torch.zeros(1, H, W, dtype=torch.float64)
    heat[0, 0:2, 0:2] = 3.0  # tile 0 first
    heat[0, 2:4, 4:6] = 2.0  # the tile with pixel (3, 5) second
    res = perturbation_curve(model, x, heat, target=0, region=2, steps=16, perturbation="zero")
    v = x[0, 0, 3, 5].item()
    assert res.curve[0].tolist() == [v, v] + [0.0] * 15
    assert res.aopc[0].item() == pytest.approx(15 * v / 17)
    lerf = perturbation_curve(
        model, x, heat, target=0, region=2, steps=16, perturbation="zero", order="lerf"
    )
    assert lerf.curve[0].tolist() == [v] * 15 + [0.0] * 2


# ----------------------------------------------------------------------------- localisation


def test_relevance_mass_and_pointing_game() -> None:
    heat = torch.zeros(2, 4, 4)
    heat[0, 1, 1] = 3.0
    heat[0, 3, 3] = 1.0
    heat[0, 0, 3] = -5.0
    heat[1, 0, 0] = 2.0
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    assert relevance_mass(heat, mask).tolist() == pytest.approx([0.75, 0.0])
    assert relevance_mass(heat, mask, positive_only=False).tolist() == pytest.approx([-3.0, 0.0])
    assert pointing_game(heat, mask).tolist() == [True, False]
    assert pointing_game(heat, mask, tolerance=1.0).tolist() == [True, False]
    assert pointing_game(heat, mask, tolerance=1.5).tolist() == [True, True]  # sqrt(2) to (1,1)
    assert relevance_mass(torch.zeros(1, 4, 4), mask[:1]).tolist() == [0.0]
    with pytest.raises(InvalidInputError, match="mask"):
        relevance_mass(heat, mask[:, :2])


def test_boxes_to_masks() -> None:
    m = boxes_to_masks(torch.tensor([[1, 0, 3, 2], [0, 0, 0, 0]]), (3, 4))
    expected = torch.zeros(2, 3, 4, dtype=torch.bool)
    expected[0, 0:2, 1:3] = True
    assert torch.equal(m, expected)
    union = boxes_to_masks([torch.tensor([[0, 0, 1, 1], [3, 2, 4, 3]])], (3, 4))
    assert union.sum().item() == 2 and union[0, 0, 0] and union[0, 2, 3]
    with pytest.raises(InvalidInputError, match="x1 < x0"):
        boxes_to_masks([torch.tensor([[3, 0, 1, 1]])], (3, 4))


# ----------------------------------------------------------------------------- conservation


def test_conservation_error() -> None:
    r = torch.tensor([[[1.0, 2.0]], [[0.5, 0.5]], [[0.0, 0.0]], [[1.0, 0.0]]])
    err = conservation_error(r, torch.tensor([3.0, 2.0, 0.0, 0.0]))
    assert err[:3].tolist() == pytest.approx([0.0, 0.5, 0.0])
    assert math.isinf(err[3].item())
    assert conservation_error(r[:2], 3.0).tolist() == pytest.approx([0.0, 2 / 3])
    with pytest.raises(InvalidInputError, match="initial"):
        conservation_error(r, torch.ones(3))
    nan = r.clone()
    nan[1, 0, 0] = float("nan")
    err = conservation_error(nan, torch.tensor([3.0, 2.0, 0.0, 0.0]))
    assert math.isnan(err[1].item()) and err[0].item() == 0.0  # NaN is reported, not raised
