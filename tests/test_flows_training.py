"""flows.models and flows.training: model factory, SGD training, checkpoints and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from flows.data import ImageDataset, make_synthetic_dataset
from flows.models import ModelError, build_model, load_trained, save_trained
from flows.training import TrainingError, TrainResult, train_model

SETTINGS = dict(
    lr=0.01,
    weight_decay=1e-4,
    momentum=0.9,
    batch_size=8,
    patience=3,
    device="cpu",
    seed=0,
    progress=False,
)


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageDataset, ImageDataset]:
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("syn"), classes=["circle", "cross"], per_class=8, size=16
    )
    kw = dict(size=16, val_fraction=0.25, test_fraction=0.0)
    return ImageDataset(root, split="train", **kw), ImageDataset(root, split="val", **kw)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small_resnet", 2)


def test_build_models() -> None:
    assert build_model("small_resnet", 4).eval()(torch.zeros(1, 3, 16, 16)).shape == (1, 4)
    assert build_model("lrn_cnn", 3).eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert build_model("resnet18", 5).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ModelError, match="unknown model 'resnet9000'"):
        build_model("resnet9000", 2)
    with pytest.raises(ModelError, match="no pretrained weights"):
        build_model("small_resnet", 2, weights="DEFAULT")


def test_checkpoints_load(tmp_path: Path) -> None:
    model = build_model("small_resnet", 3)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save(model, tmp_path / "whole.pt")
    x = torch.randn(1, 3, 16, 16)
    model.eval()
    for name in ("sd.pt", "whole.pt"):
        loaded = build_model("small_resnet", 3, checkpoint=tmp_path / name).eval()
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ModelError, match="does not fit"):
        build_model("small_resnet", 4, checkpoint=tmp_path / "sd.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"junk\.pt: unreadable checkpoint"):
        build_model("small_resnet", 3, checkpoint=tmp_path / "junk.pt")
    with pytest.raises(ModelError, match=r"missing\.pt: checkpoint not found"):
        build_model("small_resnet", 3, checkpoint=tmp_path / "missing.pt")


def test_checkpoint_bytes_depend_on_the_weights_only(tmp_path: Path) -> None:
    """The same weights give the same file whatever its name or the writing process (torch names
    an archive's records after the file it is given: not the temporary name), so DVC's hash of a
    retrained checkpoint changes only when the weights do."""
    model = _model()
    a = save_trained(model, "small_resnet", tmp_path / "a.pt")
    b = save_trained(model, "small_resnet", tmp_path / "sub" / "b.pt")
    assert a.read_bytes() == b.read_bytes()
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(load_trained(b, 2).eval()(x), model.eval()(x))


def test_train_resume_equals_uninterrupted(splits, tmp_path: Path) -> None:
    train_ds, val_ds = splits
    full = train_model(
        _model(), train_ds, val_ds, epochs=2, **SETTINGS, checkpoint_dir=tmp_path / "full"
    )
    assert isinstance(full, TrainResult) and len(full.history) == 2
    assert 1 <= full.best_epoch <= 2 and 0.0 <= full.val_accuracy <= 1.0
    assert (tmp_path / "full" / "last.pt").is_file() and (tmp_path / "full" / "best.pt").is_file()

    # "interrupted" after epoch 1, then resumed from last.pt with a fresh model object
    train_model(_model(), train_ds, val_ds, epochs=1, **SETTINGS, checkpoint_dir=tmp_path / "r")
    resumed = train_model(
        build_model("small_resnet", 2),
        train_ds,
        val_ds,
        epochs=2,
        **SETTINGS,
        checkpoint_dir=tmp_path / "r",
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.best_epoch == full.best_epoch
    for a, b in zip(
        full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)

    best = build_model("small_resnet", 2, checkpoint=tmp_path / "full" / "best.pt")
    for a, b in zip(best.state_dict().values(), full.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    with pytest.raises(TrainingError, match=r"last.pt: checkpoint was written with different .*lr"):
        train_model(
            _model(),
            train_ds,
            val_ds,
            epochs=2,
            **{**SETTINGS, "lr": 0.5},
            checkpoint_dir=tmp_path / "r",
        )


def test_adamw_option_and_resume_only_with_the_same_optimizer(splits, tmp_path: Path) -> None:
    """The saved optimizer state is AdamW's; an SGD run refuses to resume it, naming the key."""
    train_ds, val_ds = splits
    settings = {**SETTINGS, "lr": 1e-3, "weight_decay": 0.05}
    train_model(
        _model(),
        train_ds,
        val_ds,
        epochs=1,
        **settings,
        optimizer="adamw",
        checkpoint_dir=tmp_path / "a",
    )
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert last["config"]["optimizer"] == "adamw"
    assert all("exp_avg" in s for s in last["optimizer"]["state"].values())
    with pytest.raises(TrainingError, match=r"different settings \(optimizer\)"):
        train_model(_model(), train_ds, val_ds, epochs=2, **settings, checkpoint_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adamw'"):
        train_model(_model(), train_ds, val_ds, epochs=1, **SETTINGS, optimizer="adam")
