"""Base-model training for the scale pipeline (plain SGD + momentum, recorded
seed and batch order), with an atomic checkpoint reused on the next run."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..atomic_io import atomic_save_tensor, load_tensor

__all__ = ["train_model", "load_or_train"]


def train_model(model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor, *, epochs: float = 1.0,
                batch_size: int = 128, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0,
                seed: int = 0, progress: bool = False) -> dict:
    """Train in place for ``epochs`` (fractions allowed) passes; returns a small log."""
    gen = torch.Generator().manual_seed(int(seed))
    steps = max(0, math.ceil(epochs * len(x) / batch_size))
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    order = torch.empty(0, dtype=torch.long)
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="train", leave=False)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(x), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        out = model(x[idx])
        value = loss.value(out.reshape(len(idx), -1), y[idx]).mean()
        optimiser.zero_grad(set_to_none=True)
        value.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(value.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return {"steps": steps, "final_loss": losses[-1] if losses else None}


def load_or_train(path, model: nn.Module, loss, x, y, **train_kwargs) -> dict:
    """Load ``path`` into ``model`` if it exists, else train and save it atomically."""
    path = Path(path)
    if path.exists():
        state = load_tensor(path)
        model.load_state_dict(state["model"])
        model.eval()
        return dict(state["log"], loaded=True)
    log = train_model(model, loss, x, y, **train_kwargs)
    from ..scale.distributed import rank
    if rank() == 0:
        atomic_save_tensor(path, {"model": model.state_dict(), "log": log})
    return dict(log, loaded=False)
