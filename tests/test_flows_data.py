"""flows.data: synthetic generation, ImageFolder reading, splits and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows.data import DatasetError, ImageDataset, collate, make_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    return make_synthetic_dataset(root, classes=["circle", "cross", "ring"], per_class=6, size=16)


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_synthetic_layout_and_determinism(synthetic: Path, tmp_path: Path) -> None:
    manifest = json.loads((synthetic / "manifest.json").read_text())
    assert manifest["classes"] == ["circle", "cross", "ring"]
    assert len(manifest["items"]) == 18
    for item in manifest["items"]:
        mask = Image.open(synthetic / item["mask"])
        assert Image.open(synthetic / item["image"]).size == (16, 16)
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= {0, 255} and 255 in values  # binary and the object is visible
    again = make_synthetic_dataset(
        tmp_path, classes=["circle", "cross", "ring"], per_class=6, size=16
    )
    for item in manifest["items"]:
        assert (again / item["image"]).read_bytes() == (synthetic / item["image"]).read_bytes()
    # complete and identical: a second call rewrites nothing
    before = (synthetic / manifest["items"][0]["image"]).stat().st_mtime_ns
    make_synthetic_dataset(synthetic, classes=["circle", "cross", "ring"], per_class=6, size=16)
    assert (synthetic / manifest["items"][0]["image"]).stat().st_mtime_ns == before


def test_synthetic_rejects_unknown_class(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hexagon"):
        make_synthetic_dataset(tmp_path, classes=["circle", "hexagon"], per_class=1, size=16)


def test_items_splits_and_subset(synthetic: Path) -> None:
    full = ImageDataset(synthetic, size=16)
    assert full.classes == ["circle", "cross", "ring"] and len(full) == 18 and full.has_masks
    item = full[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (16, 16) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["index"] == 0 and item["path"].endswith(".png") and isinstance(item["label"], int)
    parts = [
        ImageDataset(synthetic, size=16, split=s, val_fraction=0.3, test_fraction=0.3)
        for s in ("train", "val", "test")
    ]
    paths = [{p for p, *_ in d.samples} for d in parts]
    assert sum(map(len, paths)) == 18 and set.union(*paths) == {p for p, *_ in full.samples}
    again = ImageDataset(synthetic, size=16, split="val", val_fraction=0.3, test_fraction=0.3)
    assert [s[0] for s in again.samples] == [s[0] for s in parts[1].samples]
    subset = ImageDataset(synthetic, size=16, subset=3)
    assert sorted(subset.labels) == [0, 1, 2]  # a subset covers every class
    low, high = full.input_bounds()
    assert low.shape == (3,) and torch.all(low < high)
    assert torch.all(item["image"] >= low.view(3, 1, 1) - 1e-5)
    batch = collate([full[0], full[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 16, 16)


def test_plain_imagefolder_without_masks(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (20, 12), (10, 200, 30)).save(tmp_path / name / "x.jpg")
    ds = ImageDataset(tmp_path, size=8)
    assert ds.classes == ["a", "b"] and not ds.has_masks
    item = ds[1]
    assert item["image"].shape == (3, 8, 8) and item["mask"].numel() == 0 and item["label"] == 1


def test_corrupt_png_is_named(synthetic: Path, tmp_path: Path) -> None:
    root = _copy_tree(synthetic, tmp_path / "d")
    bad = root / "images" / "cross" / "cross_0002.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DatasetError, match=r"cross_0002\.png"):
        ImageDataset(root, size=16)


def test_text_file_in_class_folder_is_named(synthetic: Path, tmp_path: Path) -> None:
    root = _copy_tree(synthetic, tmp_path / "d")
    (root / "images" / "ring" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"notes\.txt.*not an image"):
        ImageDataset(root, size=16)


def test_missing_and_empty_class_folders_are_named(synthetic: Path, tmp_path: Path) -> None:
    import shutil

    root = _copy_tree(synthetic, tmp_path / "d")
    shutil.rmtree(root / "images" / "cross")  # the manifest still lists it
    with pytest.raises(DatasetError, match=r"cross: class folder missing"):
        ImageDataset(root, size=16)
    (root / "images" / "cross").mkdir()
    with pytest.raises(DatasetError, match=r"cross: class folder is empty"):
        ImageDataset(root, size=16)
    with pytest.raises(DatasetError, match="not found"):
        ImageDataset(tmp_path / "nowhere", size=16)


def test_regenerating_with_other_settings_drops_stale_images(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, classes=["star", "ring"], per_class=3, size=16)
    (tmp_path / "images" / "star" / "mine.png").write_bytes(
        (tmp_path / "images" / "star" / "star_0000.png").read_bytes()
    )
    make_synthetic_dataset(tmp_path, classes=["star", "ring"], per_class=2, size=16)
    ds = ImageDataset(tmp_path, size=16)
    assert len(ds) == 5  # 2 + 2 generated, and the user's own file is kept
    assert (tmp_path / "images" / "star" / "mine.png").is_file()
