"""The train stage: check the engine can explain the architecture, then train (resumable).

The check comes first, on the untrained model and one dummy batch, so an architecture the engine
cannot explain fails in a second instead of after training.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.context import (
    Context,
    device,
    engine_options,
    fingerprint,
    load_context,
    log,
    methods,
    require_arch,
    require_data,
)
from flows.context import dataset as load_dataset
from flows.io import write_json
from flows.layout import resolve
from flows.methods import make_attributor
from flows.models import build_model, save_trained
from flows.tracking import check_reachable, target_for
from flows.training import train_model


def check_explainable(ctx: Context, model: torch.nn.Module, image_shape: tuple[int, ...]) -> None:
    """Explain one dummy batch with every compared method (fails fast, naming the method)."""
    x = torch.zeros(2, *image_shape)
    target = torch.zeros(2, dtype=torch.long)
    model.eval()
    for method in methods(ctx.params):
        try:
            make_attributor(model, method, engine_options(ctx.params, method))(x, target)
        except Exception as exc:
            raise RuntimeError(
                f"explain.{'composite' if method is methods(ctx.params)[0] else 'compare'}: "
                f"{method.spec!r} cannot explain this {type(model).__name__} "
                f"({type(exc).__name__}: {exc})"
            ) from exc


@task(name="train", cache_policy=NO_CACHE)
def train_task(ctx: Context, arch: str) -> dict[str, Any]:
    """Train ``arch`` (or fine-tune it); resumable from the last epoch checkpoint."""
    p = ctx.params
    train_ds = load_dataset(ctx, "train", p.runtime.subset)
    val_ds = load_dataset(ctx, "val", p.runtime.subset)
    ckpt = resolve(p.model.checkpoint, ctx.base) if p.model.checkpoint else None
    # the initial weights too: unseeded, every run (and every fork of the stage server, which
    # share one RNG state) trained another initialisation (lrn_cnn has reached val 0.61 and 0.99)
    t = p.train_for(arch)
    torch.manual_seed(t.seed)
    model = build_model(arch, len(train_ds.classes), weights=p.model.weights, checkpoint=ckpt,
                        image_size=p.data.image_size)
    check_explainable(ctx, model, tuple(train_ds[0]["image"].shape))
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]  # architecture edits
    # this model's effective settings only: adding a model to model.architectures or changing
    # another model's train.per_model entry keeps its resumable checkpoints
    fp = fingerprint(arch, shapes, p.model.weights, p.model.checkpoint, t, p.data,
                     p.runtime.subset, train_ds.fingerprint())
    ckpt_root = ctx.layout.checkpoints(arch)
    if ckpt_root.is_dir():  # checkpoints from other settings would refuse to resume
        for old in ckpt_root.iterdir():
            if old.name != fp:
                shutil.rmtree(old, ignore_errors=True)
    effective = {k: v for k, v in dataclasses.asdict(t).items() if k != "per_model"}
    beaten = {k: v for k, v in (p.train.per_model.get(arch) or {}).items()
              if getattr(p.train, k) != v}
    log("%s: training with %s%s", arch, effective,
        f" (train.per_model.{arch} sets {beaten})" if beaten else "")
    result = train_model(
        model, train_ds, val_ds, epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay,
        momentum=t.momentum, batch_size=t.batch_size, patience=t.patience, device=device(ctx),
        seed=t.seed, num_workers=p.runtime.num_workers, progress=True,
        checkpoint_dir=ckpt_root / fp, augment=t.augment, schedule=t.schedule,
    )
    save_trained(result.model, arch, ctx.layout.model(arch))
    write_json(ctx.layout.train_history(arch), {"history": result.history})
    write_json(ctx.layout.train_metrics(arch), {
        "val_accuracy": result.val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "effective": {k: v for k, v in effective.items() if isinstance(v, int | float)},
    })
    log("%s: val accuracy %.3f", arch, result.val_accuracy)
    return {"model": str(ctx.layout.model(arch)), "val_accuracy": result.val_accuracy}


@flow(name="train", log_prints=True)
def train_flow(params_path: str = "params.yaml", model: str = "small_resnet") -> dict[str, Any]:
    """DVC stage ``train@<model>``."""
    ctx = load_context(params_path)
    require_arch(ctx, model)
    check_reachable(target_for(ctx.params.mlflow, ctx.base))  # fail before training, not after
    require_data(ctx)
    return train_task(ctx, model)
