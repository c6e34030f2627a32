"""The stages, once: the command line (``python -m flows.stages``), the deployments
(``python -m flows.serve``) and dvc.yaml's commands all iterate over :data:`STAGES`."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import Flow

from flows.stages.data import data_flow
from flows.stages.evaluate import evaluate_flow
from flows.stages.explain import explain_flow
from flows.stages.pipeline import lrp_pipeline
from flows.stages.report import report_flow
from flows.stages.train import train_flow


@dataclass(frozen=True)
class Stage:
    """A DVC stage: its Prefect flow, whether it runs per model, and whether it is deployed."""

    name: str
    flow: Flow
    per_model: bool
    deployed: bool = True


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("data", data_flow, per_model=False, deployed=False),  # DVC-tracked: `dvc add data`
        Stage("train", train_flow, per_model=True),
        Stage("explain", explain_flow, per_model=True),
        Stage("evaluate", evaluate_flow, per_model=True),
        Stage("report", report_flow, per_model=False),
    )
}
PIPELINE = lrp_pipeline  # every stage in one flow run (the `lrp-pipeline/default` deployment)
