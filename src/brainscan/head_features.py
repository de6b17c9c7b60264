"""Fast head-only training: while the backbone is frozen its features do not change, so compute them once.

A frozen epoch through the whole network costs a forward pass per image and epoch; here one forward pass (no
augmentation, BatchNorm in eval mode) feeds every head-only epoch, and each of those costs only the linear head.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backends import fast_backend, forward_batches
from .data.transforms import Preprocess
from .hardware import release_free_memory
from .models import ModelSpec


def extract_head_inputs(
    model: nn.Module,
    spec: ModelSpec,
    images: np.ndarray,
    indices: np.ndarray | None = None,
    *,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 32,
) -> torch.Tensor:
    """What the classifier layer receives for each image (N×F), or for ``images[indices]`` without copying them.

    The network up to the classifier runs once, in eval mode, through :func:`~brainscan.backends.fast_backend`
    (ONNX Runtime on a CPU); ``model`` itself is left untouched.
    """
    trunk = copy.deepcopy(model).eval()
    trunk.set_submodule(spec.classifier, nn.Identity())
    backend = fast_backend(trunk, preprocess, device)
    features = forward_batches(backend, images, indices, batch_size=batch_size)
    del backend, trunk
    release_free_memory()
    return torch.from_numpy(features).float()


def dropout_rate(model: nn.Module, spec: ModelSpec) -> float:
    """The dropout applied before the classifier, so head-only training on cached features regularises alike."""
    if spec.dropout_module is None:
        return 0.0
    module = model.get_submodule(spec.dropout_module)
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def head_epoch_order(
    n: int, *, batch_size: int, drop_last: bool, generator: torch.Generator, weights: torch.Tensor | None
) -> list[torch.Tensor]:
    """Batches of indices: shuffled, or drawn with replacement by ``weights`` (the balanced sampler)."""
    order = (
        torch.multinomial(weights, n, replacement=True, generator=generator)
        if weights is not None
        else torch.randperm(n, generator=generator)
    )
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: object | None) -> None:
    """Backpropagate ``loss``, step the optimizer and a per-step scheduler (shared by every training loop)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def fit_head_epoch(
    head: nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor,
    batches: list[torch.Tensor],
    *,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: object | None,
    dropout: float,
    device: torch.device,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One head-only epoch on cached features; returns (mean loss, logits, targets) in visiting order."""
    head.train()
    total, seen_logits, seen_targets = 0.0, [], []
    for idx in batches:
        x = F.dropout(features[idx].to(device), p=dropout, training=True)
        y = targets[idx].to(device)
        logits = head(x)
        loss = criterion(logits, y)
        optimizer_step(loss, optimizer, scheduler)
        total += float(loss.detach()) * len(idx)
        seen_logits.append(logits.detach().cpu())
        seen_targets.append(y.cpu())
    n = sum(len(i) for i in batches)
    return total / max(n, 1), torch.cat(seen_logits), torch.cat(seen_targets)
