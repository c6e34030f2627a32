"""The data stage: generate the offline synthetic dataset (then ``dvc add data``) or check user data."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.context import Context, data_root, dataset, load_context, log
from flows.data import make_synthetic_dataset


@task(name="make-data", cache_policy=NO_CACHE)
def data_task(ctx: Context, force: bool = False) -> str:
    """Generate the synthetic dataset (deterministic, skipped when complete) or check user data."""
    d = ctx.params.data
    root = data_root(ctx)
    if d.synthetic and (force or not root.exists() or (root / "manifest.json").is_file()):
        make_synthetic_dataset(
            root, classes=d.classes, per_class=d.per_class, size=d.image_size, seed=d.seed
        )
    ds = dataset(ctx, "all")
    log("dataset %s: %d images, classes %s", root, len(ds), ds.classes)
    return str(root)


@flow(name="data", log_prints=True)
def data_flow(params_path: str = "params.yaml", force: bool = False) -> str:
    """Create the synthetic dataset (then ``dvc add data``)."""
    return data_task(load_context(params_path), force=force)
