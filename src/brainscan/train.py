"""Training: :func:`train` runs a whole experiment into a run directory; :func:`run_epoch` is the one loop
used for training, validation and testing."""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from .backends import fast_backend, forward_batches, resolve_device
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig
from .console import info, progress
from .data.prepare import PreparedData, prepare_data
from .data.splits import write_split_file
from .data.transforms import BatchAugment, Preprocess, to_model_input
from .errors import BrainscanError
from .evaluate import Split, score_split
from .figures import confusion_matrix_figure, curves_figure, examples_figure, save_png
from .files import write_json
from .hardware import release_free_memory, set_torch_threads
from .head_features import dropout_rate, extract_head_inputs, fit_head_epoch, head_epoch_order
from .metrics import compute_metrics
from .models import (
    ModelSpec,
    backbone_parameters,
    create_model,
    freeze_early_layers,
    get_spec,
    head_parameters,
    set_backbone_frozen,
)
from .predict import Predictor
from .progress import Progress, no_progress

log = logging.getLogger(__name__)

BN_RECALIBRATION_IMAGES = 512  # enough for stable statistics; a forward pass over them costs seconds on a CPU
HISTORY_FIELDS = [
    "epoch",
    "stage",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_macro_f1",
    "lr",
    "seconds",
]


class SliceDataset(Dataset):
    """Cached ``uint8`` slices → (1×S×S uint8 tensor, label); augmentation happens later, on whole batches.

    ``indices`` selects a split without copying the image array (on the 7,023-image set a copy of the training
    split alone is ~250 MB of resident memory).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, indices: np.ndarray | None = None) -> None:
        self.images = torch.from_numpy(images)
        self.indices = torch.from_numpy(np.arange(len(targets)) if indices is None else np.asarray(indices)).long()
        self.targets = torch.from_numpy(np.asarray(targets)[self.indices.numpy()]).long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[self.indices[i]].unsqueeze(0), self.targets[i]


@dataclass
class EpochOutput:
    loss: float
    logits: torch.Tensor
    targets: torch.Tensor

    @property
    def accuracy(self) -> float:
        return float((self.logits.argmax(1) == self.targets).float().mean()) if len(self.targets) else float("nan")


@dataclass
class RunResult:
    """What :func:`train` produced: the run directory, its best checkpoint and the held-out test metrics."""

    run_dir: Path
    best_checkpoint: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def run_epoch(
    model: nn.Module,
    loader: DataLoader,
    *,
    preprocess: Preprocess,
    criterion: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    frozen_spec: ModelSpec | None = None,
    input_size: int | None = None,
    augment: BatchAugment | None = None,
    generator: torch.Generator | None = None,
    pass_pixels: int = 0,
    on_batch: Any = None,
) -> EpochOutput:
    """One pass over ``loader``: trains when an optimizer is given, else evaluates without gradients.

    ``scheduler`` (stepped per batch) is for per-step schedules; ``frozen_spec`` keeps the backbone's BatchNorm
    statistics fixed during head-only epochs; ``input_size`` resizes batches (progressive resizing); ``augment``
    draws from ``generator``; ``pass_pixels`` (0: off) bounds a training forward/backward pass, see
    :func:`accumulated_step`.
    """
    training = optimizer is not None
    model.train(training)
    if training and frozen_spec is not None:
        set_backbone_frozen(model, frozen_spec, True)
    use_amp = device.type == "cuda"
    total_loss, all_logits, all_targets = 0.0, [], []
    with torch.set_grad_enabled(training):
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            x = to_model_input(images, preprocess, augment=augment, generator=generator)
            if input_size is not None and input_size != x.shape[-1]:
                x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True)
                x = x.contiguous(memory_format=torch.channels_last)
            if training:
                passes = math.ceil(x.shape[0] * x.shape[-1] * x.shape[-2] / pass_pixels) if pass_pixels else 1
                loss, logits = accumulated_step(
                    model, x, targets, criterion=criterion, optimizer=optimizer, scheduler=scheduler, passes=passes
                )
            else:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(x)
                    loss = criterion(logits.float(), targets)
            total_loss += float(loss.detach()) * len(targets)
            all_logits.append(logits.detach().float().cpu())
            all_targets.append(targets.cpu())
            if on_batch:
                on_batch(1)
    release_free_memory()
    n = sum(len(t) for t in all_targets)
    return EpochOutput(total_loss / max(n, 1), torch.cat(all_logits), torch.cat(all_targets))


def accumulated_step(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    passes: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch fed through the model in ``passes`` slices; returns (loss, logits).

    Activations are held for one slice at a time, so peak memory falls with the slice size. Each slice's loss is
    weighted by its share of the batch (of the class weights, for a weighted loss), so the accumulated gradient is
    the whole batch's; only BatchNorm, which normalises over what it sees, works per slice.
    """
    passes = max(1, min(passes, len(x)))
    weight = getattr(criterion, "weight", None)
    shares = weight[targets] if weight is not None else torch.ones(len(targets), device=targets.device)
    total_share = shares.sum()
    use_amp = x.device.type == "cuda"
    optimizer.zero_grad(set_to_none=True)
    loss_sum, all_logits = torch.zeros((), device=x.device), []
    slices = zip(x.tensor_split(passes), targets.tensor_split(passes), shares.tensor_split(passes), strict=True)
    for xs, ys, ws in slices:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(xs)
            loss = criterion(logits.float(), ys) * (ws.sum() / total_share)
        loss.backward()
        loss_sum += loss.detach()
        all_logits.append(logits.detach())
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss_sum, torch.cat(all_logits)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, images: np.ndarray, *, preprocess: Preprocess, device: torch.device, batch_size: int = 32
) -> None:
    """Re-estimate BatchNorm running statistics on un-augmented training slices at the served resolution.

    Running statistics are a moving average over augmented, possibly low-resolution batches (and, on small data,
    still partly the pretrained model's); evaluation then sees other statistics than training did. An exact
    average over a fixed set of clean slices removes that mismatch (as in FixRes, Touvron et al. 2019).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(images) == 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[i : i + batch_size]).unsqueeze(1).to(device)
        model(to_model_input(batch, preprocess))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    release_free_memory()


def _validate_served(
    model: nn.Module,
    images: np.ndarray,
    indices: np.ndarray,
    targets: np.ndarray,
    *,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 32,
) -> EpochOutput:
    """Validation at the served resolution through :func:`~brainscan.backends.fast_backend` (ONNX Runtime on a
    CPU: a few times quicker than an eager pass, even with the export it needs first)."""
    backend = fast_backend(model, preprocess, device)
    logits = torch.from_numpy(forward_batches(backend, images, indices, batch_size=batch_size)).float()
    labels = torch.from_numpy(targets[indices]).long()
    del backend
    release_free_memory()
    return EpochOutput(float(F.cross_entropy(logits, labels)), logits, labels)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - third-party code may draw from numpy's global RNG


def _build_optimizer(model: nn.Module, spec: ModelSpec, config: RunConfig, pretrained: bool) -> torch.optim.Optimizer:
    t = config.train
    backbone_lr = t.lr * (t.backbone_lr_scale if pretrained else 1.0)
    groups = [
        {"params": head_parameters(model, spec), "lr": t.lr},
        {"params": backbone_parameters(model, spec), "lr": backbone_lr},
    ]
    kind = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=t.lr, weight_decay=t.weight_decay)


def _build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig, steps_per_epoch: int) -> Any:
    t = config.train
    total = t.epochs * steps_per_epoch
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if t.schedule == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total)
    if t.schedule == "plateau":
        mode = "min" if t.monitor == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.3, patience=1)
    return None


def epoch_image_size(epoch: int, config: RunConfig) -> int:
    """Progressive resizing: ``low_res`` until the last ``full_res_epochs`` epochs, then ``image_size``."""
    t, full = config.train, config.data.image_size
    if t.low_res <= 0 or t.low_res >= full or epoch > t.epochs - t.full_resolution_epochs:
        return full
    return t.low_res


def _class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def _resume_state(run_dir: Path, config: RunConfig) -> tuple[RunConfig, dict[str, Any]]:
    last = run_dir / "last.pt"
    if not last.is_file():
        raise BrainscanError(f"{run_dir}: nothing to resume (no last.pt).")
    ckpt = load_checkpoint(last)
    saved = RunConfig.from_dict(ckpt["config"])
    # Only the epoch budget and verbosity may change on resume: the rest defines the experiment.
    return replace(saved, train=replace(saved.train, epochs=config.train.epochs), quiet=config.quiet), ckpt


def train(
    config: RunConfig, *, resume: bool = False, on_epoch_end: Callable[[dict[str, Any]], None] | None = None
) -> RunResult:
    """Train a model as ``config`` says, writing a self-describing run directory at ``config.out``.

    The run directory holds ``config.yaml``, ``split.csv``, ``history.csv``, ``best.pt``, ``last.pt``,
    ``metrics.json`` (held-out test split) and PNG plots. ``resume=True`` continues from ``last.pt``.
    ``on_epoch_end`` receives each epoch's history row once ``last.pt`` is written (live plots, custom stopping).

    Example:
        >>> cfg = RunConfig(DataConfig(root="../shared/data/brain-mri-yes-no"), out="runs/yesno")  # doctest: +SKIP
        >>> result = train(cfg)  # doctest: +SKIP
        >>> result.metrics["accuracy"]  # doctest: +SKIP
    """
    run_dir = Path(config.out)
    resume_ckpt = None
    if resume:
        config, resume_ckpt = _resume_state(run_dir, config)
    elif (run_dir / "last.pt").exists():
        raise BrainscanError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out.")
    run_dir.mkdir(parents=True, exist_ok=True)
    quiet = config.quiet
    t = config.train
    _seed_everything(t.seed)
    set_torch_threads(t.threads)
    device = resolve_device(t.device)
    spec = get_spec(config.model.name)

    data = prepare_data(config.data, seed=t.seed, split_file=run_dir / "split.csv" if resume else None, quiet=quiet)
    config.save(run_dir / "config.yaml")
    write_split_file(run_dir / "split.csv", data.rows)
    info(_describe_data(data), quiet=quiet)

    pretrained = bool(config.model.weights)
    model = create_model(spec.name, len(data.class_names), config.model.weights, dropout=config.model.dropout)
    model = model.to(device).to(memory_format=torch.channels_last)
    preprocess = Preprocess(config.data.image_size, spec.mean, spec.std, config.data.crop_background)

    train_idx, val_idx = data.subset("train"), data.subset("val")
    generator = torch.Generator().manual_seed(t.seed)
    train_set = SliceDataset(data.images, data.targets, train_idx)
    augment = BatchAugment() if t.augment else None
    augment_rng = torch.Generator().manual_seed(t.seed + 1)
    sampler, sample_weights = None, None
    if t.balance == "sampler":
        sample_weights = _class_weights(data.targets[train_idx], len(data.class_names))[
            data.targets[train_idx]
        ].double()
        sampler = WeightedRandomSampler(sample_weights, len(train_idx), replacement=True, generator=generator)
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_set,
        batch_size=t.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=len(train_idx) > t.batch_size,
        pin_memory=pin,
    )
    val_loader = DataLoader(SliceDataset(data.images, data.targets, val_idx), batch_size=64, pin_memory=pin)

    class_weights = _class_weights(data.targets[train_idx], len(data.class_names)) if t.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(
        weight=class_weights.to(device) if class_weights is not None else None, label_smoothing=t.label_smoothing
    )
    plain_loss = nn.CrossEntropyLoss()
    optimizer = _build_optimizer(model, spec, config, pretrained)
    scheduler = _build_scheduler(optimizer, config, len(train_loader))
    per_step = scheduler is not None and t.schedule != "plateau"

    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch, bad_epochs = 1, -math.inf, 0, 0
    if resume_ckpt is not None:
        state = resume_ckpt["resume"]
        model.load_state_dict(resume_ckpt["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["loader_rng"])
        augment_rng.set_state(state["augment_rng"])
        history = list(state["history"])
        best_score, best_epoch, bad_epochs = state["best_score"], state["best_epoch"], state["bad_epochs"]
        start_epoch = int(resume_ckpt["epoch"]) + 1
        data.protocol = resume_ckpt.get("data", data.protocol)
        info(f"Resuming {run_dir} after epoch {start_epoch - 1}.", quiet=quiet)

    common = {  # everything a checkpoint needs to predict and to describe itself
        "arch": spec.name,
        "class_names": data.class_names,
        "preprocess": preprocess.to_dict(),
        "config": config.to_dict(),
        "data": data.protocol,
        "pretrained": config.model.weights or "none",
    }
    sign = -1.0 if t.monitor == "val_loss" else 1.0
    started = time.time()
    head_inputs: torch.Tensor | None = None
    # a fixed, class-mixed sample (records are stored class by class) for BatchNorm recalibration
    bn_sample = np.sort(np.random.default_rng(t.seed).permutation(train_idx)[:BN_RECALIBRATION_IMAGES])
    for epoch in range(start_epoch, t.epochs + 1):
        frozen = pretrained and epoch <= t.freeze_epochs
        set_backbone_frozen(model, spec, frozen)
        if pretrained and t.freeze_early and not frozen:
            freeze_early_layers(model, spec)
        epoch_start = time.time()
        size = epoch_image_size(epoch, config)
        label = f"Epoch {epoch}/{t.epochs}" + (" (head only)" if frozen else f" ({size} px)")
        if frozen and t.cache_head_features:
            if head_inputs is None:
                with progress("Backbone features (once)", 1, quiet=quiet) as advance:
                    head_inputs = extract_head_inputs(
                        model, spec, data.images, train_idx, preprocess=preprocess, device=device
                    )
                    advance(1)
            batches = head_epoch_order(
                len(train_idx),
                batch_size=t.batch_size,
                drop_last=train_loader.drop_last,
                generator=generator,
                weights=sample_weights,
            )
            loss, logits, seen = fit_head_epoch(
                model.get_submodule(spec.classifier),
                head_inputs,
                train_set.targets,
                batches,
                criterion=criterion,
                optimizer=optimizer,
                scheduler=scheduler if per_step else None,
                dropout=dropout_rate(model, spec),
                device=device,
            )
            fit = EpochOutput(loss, logits, seen)
        else:
            with progress(label, len(train_loader), quiet=quiet) as advance:
                fit = run_epoch(
                    model,
                    train_loader,
                    preprocess=preprocess,
                    criterion=criterion,
                    device=device,
                    optimizer=optimizer,
                    scheduler=scheduler if per_step else None,
                    frozen_spec=spec if frozen else None,
                    input_size=size,
                    augment=augment,
                    generator=augment_rng,
                    pass_pixels=t.cpu_pass_pixels if device.type == "cpu" else 0,
                    on_batch=advance,
                )
        # Only epochs at the served resolution are candidates for best.pt; a low-resolution epoch is validated at
        # its own size, as a progress figure, which spares a BatchNorm recalibration and a full-size pass per epoch.
        served = frozen or size == config.data.image_size
        if served:
            if not frozen:
                recalibrate_batchnorm(model, data.images[bn_sample], preprocess=preprocess, device=device)
            val = _validate_served(model, data.images, val_idx, data.targets, preprocess=preprocess, device=device)
        else:
            val = run_epoch(
                model, val_loader, preprocess=preprocess, criterion=plain_loss, device=device, input_size=size
            )
        val_metrics = compute_metrics(val.targets.numpy(), val.logits.softmax(1).numpy(), data.class_names, protocol={})
        row = {
            "epoch": epoch,
            "stage": "head" if frozen else f"full@{size}px",
            "train_loss": round(fit.loss, 5),
            "train_accuracy": round(fit.accuracy, 5),
            "val_loss": round(val.loss, 5),
            "val_accuracy": round(val_metrics["accuracy"], 5),
            "val_balanced_accuracy": round(val_metrics["balanced_accuracy"], 5),
            "val_macro_f1": round(val_metrics["macro_f1"], 5),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.time() - epoch_start, 1),
        }
        history.append(row)
        _write_history(run_dir / "history.csv", history)
        info(
            f"epoch {epoch}: train loss {fit.loss:.4f} acc {fit.accuracy:.3f} | val loss {val.loss:.4f} "
            f"acc {val_metrics['accuracy']:.3f} bal-acc {val_metrics['balanced_accuracy']:.3f} ({row['seconds']}s)",
            quiet=quiet,
        )
        if t.schedule == "plateau":
            scheduler.step(row[t.monitor])
        score = sign * row[t.monitor]
        if served:
            # patience counts epochs without a strict improvement; a tie still takes the later, more annealed epoch
            bad_epochs = 0 if score > best_score else bad_epochs + 1
            if score >= best_score:
                best_score, best_epoch = score, epoch
                save_checkpoint({**common, "model_state": model.state_dict(), "epoch": epoch}, run_dir / "best.pt")
        resume_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "torch_rng": torch.get_rng_state(),
            "loader_rng": generator.get_state(),
            "augment_rng": augment_rng.get_state(),
            "history": history,
            "best_score": best_score,
            "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
        }
        save_checkpoint(
            {**common, "model_state": model.state_dict(), "epoch": epoch, "resume": resume_state}, run_dir / "last.pt"
        )
        if on_epoch_end is not None:
            on_epoch_end(row)
        if t.patience and bad_epochs >= t.patience:
            info(f"Early stopping: no {t.monitor} improvement for {t.patience} epochs.", quiet=quiet)
            break
    train_seconds = time.time() - started

    return _finish(run_dir, data, preprocess, device, history, train_seconds, best_epoch, t.target_sensitivity)


def _finish(
    run_dir: Path,
    data: PreparedData,
    preprocess: Preprocess,
    device: torch.device,
    history: list[dict[str, Any]],
    train_seconds: float,
    best_epoch: int,
    target_sensitivity: float | None = None,
    *,
    progress: Progress = no_progress,
) -> RunResult:
    """Score the best model (:func:`~brainscan.evaluate.score_split`: temperature and operating point from val,
    metrics on test), write metrics.json, plots and the final best.pt."""
    best = load_checkpoint(run_dir / "best.pt")
    model = create_model(best["arch"], len(data.class_names))
    model.load_state_dict(best["model_state"])
    predictor = Predictor(
        fast_backend(model, preprocess, device), class_names=data.class_names, preprocess=preprocess, arch=best["arch"]
    )
    val_idx, test_idx = data.subset("val"), data.subset("test")
    test = Split(
        data.images[test_idx],
        data.targets[test_idx],
        groups=[data.rows[i]["group"] for i in test_idx],
        seen_groups={row["group"] for row in data.rows if row["split"] in ("train", "val")},
        protocol={**data.protocol, "split": "test", "n_evaluated": len(test_idx)},
    )
    val = Split(data.images[val_idx], data.targets[val_idx])
    scores = score_split(
        predictor, test, val=val, batch_size=32, target_sensitivity=target_sensitivity, progress=progress
    )
    metrics = scores.metrics
    metrics["best_epoch"] = best_epoch
    metrics["train_seconds"] = round(train_seconds, 1)
    write_json(run_dir / "metrics.json", metrics)
    best["calibration"] = {k: metrics["calibration"][k] for k in ("temperature", "method")}
    best["operating_point"] = metrics.get("operating_point", {})
    best["metrics"] = metrics
    save_checkpoint(best, run_dir / "best.pt")

    save_png(curves_figure(history), run_dir / "curves.png")
    save_png(confusion_matrix_figure(metrics["confusion_matrix"], data.class_names), run_dir / "confusion_matrix.png")
    save_png(
        examples_figure(test.images, test.targets, scores.probs, data.class_names, seed=0),
        run_dir / "examples.png",
        dpi=80,
    )
    roc_auc = metrics["roc_auc"]
    log.info(
        "Test (%d images): accuracy %.3f, balanced accuracy %.3f, macro F1 %.3f, ROC-AUC %s",
        len(test_idx),
        metrics["accuracy"],
        metrics["balanced_accuracy"],
        metrics["macro_f1"],
        roc_auc if roc_auc is None else round(roc_auc, 3),
    )
    return RunResult(run_dir, run_dir / "best.pt", metrics, history)


def _describe_data(data: PreparedData) -> str:
    p = data.protocol
    n = p["n_images"]
    return (
        f"{p['dataset']} ({p['layout']}): {len(data.targets)} images, classes {', '.join(data.class_names)}; "
        f"train {n['train']} / val {n['val']} / test {n['test']} — {p['split_method']}; grouping: {p['grouping']}"
    )
