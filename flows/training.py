"""Supervised training with SGD and early stopping on validation loss (Otsuki et al. protocol).

Explanations of a model that learned nothing are meaningless, so the pipeline trains (or fine-tunes)
first. Every epoch writes ``last.pt`` atomically; an interrupted run resumes from it and yields the
same weights as an uninterrupted one (per-epoch seeding makes shuffling, augmentation and dropout
independent of where the run stopped).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from flows.data import collate
from flows.io import write_torch
from flows.runtime import resolve_device


class TrainingError(RuntimeError):
    """A checkpoint that does not belong to this run, or no data to train on."""


@dataclass
class TrainResult:
    """The best model (by validation loss), its epoch (1-based) and validation accuracy."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    val_accuracy: float = float("nan")


def train_model(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    momentum: float,
    batch_size: int,
    patience: int,
    device: str | torch.device,
    seed: int,
    num_workers: int = 0,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    augment: bool = True,
    schedule: str = "constant",
    optimizer: str = "sgd",
) -> TrainResult:
    """Train in place with SGD (or AdamW); return the weights of the epoch with the lowest validation loss.

    Stops after ``patience`` epochs without a lower validation loss. With ``checkpoint_dir`` the
    state is saved after each epoch to ``last.pt`` (resume point) and the best weights to
    ``best.pt`` (loadable by :func:`flows.models.build_model`). ``schedule="cosine"`` decays the
    learning rate over ``epochs`` (helps training from scratch; the protocol's fine-tuning uses a
    constant rate). ``optimizer="adamw"`` (``momentum`` unused, decoupled ``weight_decay``) is
    for transformers trained from scratch, which SGD trains poorly on small sets.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise TrainingError("train and validation sets must not be empty")
    device = resolve_device(device)
    model.to(device)
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        if optimizer == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    )
    config = {
        "lr": lr,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "batch_size": batch_size,
        "seed": seed,
        "augment": augment,
        "schedule": schedule,
        "optimizer": optimizer,
        "train_size": len(train_ds),
        "val_size": len(val_ds),
    }
    state: dict[str, Any] = {
        "epoch": 0,
        "history": [],
        "best_val_loss": float("inf"),
        "best_epoch": 0,
        "best_state": None,
        "bad_epochs": 0,
    }
    last = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    if last is not None and last.is_file():
        state = _resume(last, config, model, opt, device)

    val_loader = DataLoader(
        val_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate
    )
    bar = tqdm(
        range(state["epoch"], epochs),
        desc="train",
        disable=not progress,
        initial=state["epoch"],
        total=epochs,
    )
    for epoch in bar:
        if state["bad_epochs"] >= patience:
            break  # resumed after early stopping had already triggered
        start = time.perf_counter()
        torch.manual_seed(seed * 100_003 + epoch)  # shuffling, augmentation, dropout
        epoch_lr = (
            lr if schedule == "constant" else lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        )
        for group in opt.param_groups:
            group["lr"] = epoch_lr
        loader = DataLoader(
            train_ds,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed + epoch),
            drop_last=len(train_ds) > batch_size,  # a batch of 1 breaks BatchNorm
        )
        train_loss, train_acc = _train_epoch(model, loader, opt, device, augment, progress)
        val_loss, val_acc = evaluate(model, val_loader, device)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": epoch_lr,
            "seconds": time.perf_counter() - start,
        }
        state["history"].append(record)
        state["epoch"] = epoch + 1
        if val_loss < state["best_val_loss"]:
            state.update(
                best_val_loss=val_loss,
                best_epoch=epoch + 1,
                bad_epochs=0,
                best_state=_cpu_state(model),
            )
            if checkpoint_dir is not None:
                write_torch(
                    Path(checkpoint_dir) / "best.pt",
                    {"model": state["best_state"], "epoch": epoch + 1},
                )
        else:
            state["bad_epochs"] += 1
        if last is not None:
            write_torch(
                last,
                {
                    "config": config,
                    "model": _cpu_state(model),
                    "optimizer": opt.state_dict(),
                    **state,
                },
            )
        bar.set_postfix(
            loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}"
        )
        if state["bad_epochs"] >= patience:
            break
    bar.close()

    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    model.eval()
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), None)
    if best is None:  # epochs == 0: report the untrained model honestly
        _, acc = evaluate(model, val_loader, device)
    else:
        acc = best["val_accuracy"]
    return TrainResult(
        model=model, history=state["history"], best_epoch=state["best_epoch"], val_accuracy=acc
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a loader (eval mode)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in loader:
        x, y = batch["image"].to(device), batch["label"].to(device)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    return total_loss / count, correct / count


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    augment: bool,
    progress: bool,
) -> tuple[float, float]:
    model.train()
    total_loss, correct, count = 0.0, 0, 0
    for batch in tqdm(loader, desc="batches", leave=False, disable=not progress):
        x, y = batch["image"].to(device), batch["label"].to(device)
        if augment:
            x = _augment(x)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    return total_loss / count, correct / count


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 1/8 of the side (reflect-padded)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, device=x.device) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _resume(
    last: Path,
    config: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> dict[str, Any]:
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(
            f"{last}: unreadable checkpoint ({exc}); delete it to start over"
        ) from exc
    old = {"optimizer": "sgd", **ckpt.get("config", {})}  # written before the option existed
    changed = [k for k in config if old.get(k) != config[k]]
    if changed:
        raise TrainingError(
            f"{last}: checkpoint was written with different settings ({', '.join(changed)}); "
            "delete it or use another checkpoint_dir"
        )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise TrainingError(f"{last}: checkpoint does not fit this model ({exc})") from exc
    optimizer.load_state_dict(ckpt["optimizer"])
    model.to(device)
    keys = ("epoch", "history", "best_val_loss", "best_epoch", "best_state", "bad_epochs")
    return {k: copy.deepcopy(ckpt[k]) for k in keys}
