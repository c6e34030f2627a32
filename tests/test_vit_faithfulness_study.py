"""flows.studies.vit_faithfulness on the tiny config: trains, scores, prints the report table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_helpers import tiny_params, write_params

from flows.context import load_context
from flows.studies.vit_faithfulness import main

METHODS = [
    "epsilon-transformer:attention=cp",
    "epsilon-transformer:attention=attnlrp",
    "attention-rollout",
]


def test_study_trains_scores_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params(tmp_path))
    args = [
        "--params",
        str(params),
        "--epochs",
        "1",
        "--train-per-class",
        "12",
        "--images",
        "3",
        "--steps",
        "2",
        "--methods",
        *METHODS,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| model | method | insertion | deletion | id |" in out
    assert "| small_vit | attention-rollout |" in out
    assert "epsilon-transformer_attention-attnlrp - epsilon-transformer_attention-cp" in out
    studies = load_context(params).layout.studies()
    result = json.loads((studies / "vit_faithfulness.json").read_text())
    assert result["test_images"] == 3 and result["training"]["epochs"] == 1
    for label in ("epsilon-transformer_attention-cp", "attention-rollout"):
        assert 0.0 <= result["summary"][label]["relevance_mass"] <= 1.0
    assert (studies / "small_vit.pt").is_file()
