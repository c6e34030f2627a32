"""The explain stage's shards (flows.stages.explain, flows.shards): sharded, verifiable, resumable dataset explanation with the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_helpers import explain_dataset

from flows.data import ImageDataset, make_synthetic_dataset
from flows.models import build_model
from flows.shards import ShardError, load_shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ImageDataset:
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("syn"), classes=["star", "square", "ring"], per_class=4, size=32
    )
    return ImageDataset(root, size=32)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lrn_cnn", 3).eval()


def _run(model, dataset, out: Path, **kw):
    args = dict(
        method="epsilon-plus-flat",
        options={},
        batch_size=5,
        device="cpu",
        shard_size=4,
        progress=False,
    )
    return explain_dataset(model, dataset, out_dir=out, **{**args, **kw})


def test_explain_writes_shards_and_index(model, dataset, tmp_path: Path) -> None:
    index = _run(model, dataset, tmp_path)
    assert index.num_items == 12 and [s.file for s in index.shards] == [
        "shard-00000.npz",
        "shard-00001.npz",
        "shard-00002.npz",
    ]
    assert (tmp_path / "index.json").is_file()
    data = load_shards(tmp_path)
    assert data["relevance"].shape == (12, 3, 32, 32) and data["relevance"].dtype == np.float32
    assert data["logits"].shape == (12, 3)
    np.testing.assert_array_equal(data["index"], np.arange(12))
    np.testing.assert_array_equal(data["target"], data["label"])  # default: ground truth
    # stored conservation error is the engine's |sum R - initial| / |initial| (biases absorb some)
    total = data["relevance"].astype(np.float64).sum((1, 2, 3))
    expected = np.abs(total - data["initial"]) / np.abs(data["initial"])
    np.testing.assert_allclose(data["conservation"], expected, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(
        data["initial"], data["logits"][np.arange(12), data["target"]], rtol=1e-5
    )


def test_interrupted_run_resumes_and_equals_uninterrupted(model, dataset, tmp_path: Path) -> None:
    reference = _run(model, dataset, tmp_path / "ref")

    def crash(info):
        raise KeyboardInterrupt(f"simulated interruption after {info.file}")

    with pytest.raises(KeyboardInterrupt):
        _run(model, dataset, tmp_path / "run", on_shard=crash)
    assert not (tmp_path / "run" / "index.json").exists()
    with pytest.raises(ShardError, match=r"index\.json: missing"):
        load_shards(tmp_path / "run")

    resumed = _run(model, dataset, tmp_path / "run")
    assert resumed.skipped == ["shard-00000.npz"]
    assert resumed.written == ["shard-00001.npz", "shard-00002.npz"]
    assert resumed.content_hash == reference.content_hash
    got, want = load_shards(tmp_path / "run"), load_shards(tmp_path / "ref")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])

    again = _run(model, dataset, tmp_path / "run")  # complete: nothing recomputed
    assert again.written == [] and len(again.skipped) == 3


def test_truncated_shard_is_detected_and_recomputed(model, dataset, tmp_path: Path) -> None:
    _run(model, dataset, tmp_path)
    shard = tmp_path / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(ShardError, match=r"shard-00001.npz: checksum mismatch"):
        load_shards(tmp_path)
    repaired = _run(model, dataset, tmp_path)
    assert repaired.written == ["shard-00001.npz"]
    assert load_shards(tmp_path)["relevance"].shape[0] == 12


def test_changed_options_recompute_everything(model, dataset, tmp_path: Path) -> None:
    _run(model, dataset, tmp_path)
    index = _run(
        model,
        dataset,
        tmp_path,
        shard_size=8,
        options={"relevance_dtype": "float16", "channel_sum": True, "target": "predicted"},
    )
    assert index.skipped == [] and len(index.written) == 2
    assert sorted(p.name for p in tmp_path.glob("shard-*.npz")) == [
        "shard-00000.npz",
        "shard-00001.npz",
    ]
    data = load_shards(tmp_path)
    assert data["relevance"].shape == (12, 32, 32) and data["relevance"].dtype == np.float16
    np.testing.assert_array_equal(data["target"], data["logits"].argmax(1))


def test_bad_engine_option_fails_before_touching_results(model, dataset, tmp_path: Path) -> None:
    _run(model, dataset, tmp_path)
    with pytest.raises(Exception, match="epsilonn"):
        _run(model, dataset, tmp_path, options={"epsilonn": 1.0})
    assert load_shards(tmp_path)["relevance"].shape[0] == 12  # the earlier result is intact


def test_baseline_method(model, dataset, tmp_path: Path) -> None:
    _run(model, dataset, tmp_path, method="random")
    data = load_shards(tmp_path)
    assert data["relevance"].shape == (12, 3, 32, 32) and np.all(np.isnan(data["conservation"]))
    with pytest.raises(Exception, match="unknown method"):
        _run(model, dataset, tmp_path / "x", method="no-such-method")


def test_changed_engine_source_recomputes(model, dataset, tmp_path: Path, monkeypatch) -> None:
    """Shards made by other engine code are stale, as DVC's ``lrp`` dependency says."""
    import flows.stages.explain as ex
    from flows.shards import engine_version

    version = engine_version()
    assert "+" in version and len(version.split("+")[1]) == 12  # version + source hash
    _run(model, dataset, tmp_path)
    monkeypatch.setattr(ex, "engine_version", lambda: version + "-edited")
    index = _run(model, dataset, tmp_path)
    assert index.skipped == [] and len(index.written) == 3
