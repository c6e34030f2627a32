"""flows.config: defaults, round trip, and errors that name the file and the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.config import Params, ParamsError, load_params


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_round_trip(tmp_path: Path) -> None:
    params = load_params(_write(tmp_path, {"train": {"epochs": 3}}))
    assert params.train.epochs == 3 and params.train.lr == Params().train.lr
    again = load_params(_write(tmp_path, params.to_dict()))
    assert again == params
    flat = params.to_flat_dict()
    assert flat["train.epochs"] == 3 and flat["model.architectures"] == "small_resnet,lrn_cnn"
    assert all(v is None or isinstance(v, str | int | float | bool) for v in flat.values())


def test_float_written_without_dot_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 0\n")  # YAML 1.1 reads 1e-3 as a string
    params = load_params(path)
    assert params.train.lr == 1e-3 and params.train.weight_decay == 0.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trian": {}}, "params.yaml: unknown section 'trian'"),
        ({"train": {"lrr": 0.1}}, r"params.yaml: train.lrr: unknown key"),
        ({"train": {"epochs": "ten"}}, r"train.epochs: must be an integer"),
        ({"train": {"epochs": -1}}, r"train.epochs: -1 is below the minimum 0"),
        ({"explain": {"output": "softmax"}}, r"explain.output: 'softmax' is not one of"),
        ({"explain": {"composite": "foo"}}, r"explain.composite: 'foo' is not one of \["),
        ({"explain": {"channel_sum": "yes"}}, r"explain.channel_sum: must be true or false"),
        ({"model": {"architectures": "small_resnet"}}, r"model.architectures: must be a list"),
        ({"runtime": {"subset": None, "batch_size": None}}, r"runtime.batch_size: must not be"),
        ({"runtime": {"optimize_inference": "yes"}}, r"runtime.optimize_inference"),
        ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, r"val_fraction \+ data.test"),
        ({"evaluate": {"quantize_levels": [0, 1]}}, r"evaluate.quantize_levels\[1\]"),
        ([1, 2], "top level must be a mapping"),
    ],
)
def test_bad_params_name_the_key(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        load_params(_write(tmp_path, data))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: invalid YAML"):
        load_params(bad)


def test_choices_come_from_the_engine(tmp_path: Path) -> None:
    """Every residual mode and alias of lrp is accepted; relevance is stored as float32 by default."""
    from lrp.rules.residual import ALIASES, MODES

    for mode in (*MODES, *ALIASES):
        assert Params.from_dict({"explain": {"residual": mode}}).explain.residual == mode
    assert Params().explain.relevance_dtype == "float32"
    with pytest.raises(ParamsError, match=r"explain: lrn="):
        Params.from_dict({"explain": {"lrn": "magic"}})
    with pytest.raises(ParamsError, match=r"explain\.compare\[1\].*no-such"):
        Params.from_dict({"explain": {"compare": ["grad-cam", "no-such"]}})
    with pytest.raises(ParamsError, match=r"explain\.compare\[0\].*residual"):
        Params.from_dict({"explain": {"compare": ["otsuki2024:residual=sideways"]}})


def test_architectures_are_any_torchvision_classifier() -> None:
    names = ["small_resnet", "mobilenet_v3_small", "resnet18"]
    assert Params.from_dict({"model": {"architectures": names}}).model.architectures == names
    with pytest.raises(ParamsError, match=r"model\.architectures\[1\].*list_models"):
        Params.from_dict({"model": {"architectures": ["small_resnet", "resnet9000"]}})


def test_explicit_train_override_wins_over_per_model(tmp_path: Path) -> None:
    from flows.context import load_context

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"architectures": ["small_resnet", "lrn_cnn"]},
        "train": {"epochs": 30, "per_model": {"lrn_cnn": {"epochs": 60, "lr": 0.01}}},
    }))
    assert load_context(params).params.train_for("lrn_cnn").epochs == 60
    p = load_context(params, {"train.epochs": 1}).params
    assert p.train_for("lrn_cnn").epochs == 1 and p.train_for("small_resnet").epochs == 1
    assert p.train_for("lrn_cnn").lr == 0.01  # keys not overridden keep their per-model value
    assert load_context(params, {"train": {"epochs": 2}}).params.train_for("lrn_cnn").epochs == 2
