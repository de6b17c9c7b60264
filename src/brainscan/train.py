"""Training: :func:`train` runs one experiment into a run directory in named stages — set up, one epoch of
fitting, validation, checkpoints, and the final scoring — in the manner of torchvision's reference script."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from .backends import TorchBackend, fast_backend, forward_batches, resolve_device
from .box_attention import BoxAttention, box_masks
from .checkpoint import TRAINING_PRINTS, checkpoint_payload, load_checkpoint, save_checkpoint
from .config import RunConfig, TrainConfig
from .data.boxes import check_has_boxes, index_boxes, slice_boxes
from .data.fingerprint import save_fingerprints
from .data.ingest import find_index
from .data.prepare import SKIPPED_FILE, PreparedData, prepare_data, write_skipped_file
from .data.sources import check_has_sources, index_sources, source_balanced_weights
from .data.splits import write_split_file
from .data.transforms import BatchAugment, BatchMix, Preprocess, resize_batch, to_model_input, to_model_input_with_masks
from .distributed import RankBatches, Ranks, barrier, from_main, gather, same_on_every_rank, start, stop, sync_buffers
from .distributed import wrap as wrap_distributed
from .errors import BrainscanError
from .evaluate import Split, score_split
from .figures import confusion_matrix_figure, curves_figure, examples_figure, save_png
from .files import write_csv, write_json
from .hardware import available_cpus, release_free_memory, set_torch_threads
from .head_features import dropout_rate, extract_head_inputs, fit_head_epoch, head_epoch_order
from .metrics import compute_metrics
from .models import (
    ModelSpec,
    backbone_parameters,
    check_weights,
    create_model,
    freeze_early_layers,
    get_spec,
    head_parameters,
    set_backbone_frozen,
    weights_origin,
)
from .predict import Predictor
from .progress import Progress, no_progress
from .rundir import check_output, check_outside_data, claim_output, write_identity

log = logging.getLogger(__name__)

BN_RECALIBRATION_IMAGES = 512  # enough for stable statistics; a forward pass over them costs seconds on a CPU
VAL_BATCH = 64
ONE_PROCESS = Ranks()
PLOTS = ("curves.png", "confusion_matrix.png", "examples.png")
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
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
# scheduler by name, from (optimizer, train config, total optimizer steps); plateau steps once per epoch
SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, TrainConfig, int], Any]] = {
    "cosine": lambda opt, t, steps: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
    "onecycle": lambda opt, t, steps: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps
    ),
    "plateau": lambda opt, t, steps: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min" if t.monitor == "val_loss" else "max", factor=0.3, patience=1
    ),
    "none": lambda opt, t, steps: None,
}


class SliceDataset(Dataset):
    """Cached ``uint8`` slices → (1×S×S uint8 tensor, label[, box]); augmentation happens later, on whole batches.

    ``indices`` selects a split without copying the image array (on the 7,023-image set a copy of the training
    split alone is ~250 MB of resident memory); ``images`` may be a tensor already on the GPU (:func:`slice_cache`).
    ``boxes`` (one row ``x0, y0, x1, y1`` per selected image, in slice pixels, NaN for none) adds each image's
    tumour box, for the box-attention loss.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        targets: np.ndarray,
        indices: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
    ) -> None:
        self.images = images if isinstance(images, torch.Tensor) else torch.from_numpy(images)
        self.indices = torch.from_numpy(np.arange(len(targets)) if indices is None else np.asarray(indices)).long()
        self.targets = torch.from_numpy(np.asarray(targets)[self.indices.numpy()]).long()
        self.boxes = torch.from_numpy(boxes).float() if boxes is not None else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        item = self.images[self.indices[i]].unsqueeze(0), self.targets[i]
        return item if self.boxes is None else (*item, self.boxes[i])


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


@dataclass(frozen=True)
class Amp:
    """Mixed precision for the training passes: autocast to ``dtype``; fp16 also scales the loss (``scaler``)."""

    dtype: torch.dtype
    scaler: Any = None  # torch.amp.GradScaler, fp16 only

    @classmethod
    def resolve(cls, precision: str, device: torch.device) -> Amp | None:
        """``auto``: bf16 on CUDA (fp16 where the GPU has no bf16), none on a CPU; ``fp32``: none.

        Raises:
            BrainscanError: fp16 on a CPU (no CPU kernels worth having; bf16 or fp32 there).
        """
        if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
            return None
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision == "fp16":
            if device.type != "cuda":
                raise BrainscanError("--precision fp16 needs a CUDA device; on a CPU use bf16 or fp32.")
            return cls(torch.float16, torch.amp.GradScaler("cuda"))
        return cls(torch.bfloat16)


@dataclass
class Session:
    """What one run holds while it trains: its data, model, optimisation and random streams."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    spec: ModelSpec
    data: PreparedData
    model: nn.Module
    preprocess: Preprocess
    pretrained: bool
    train_idx: np.ndarray
    val_idx: np.ndarray
    train_loader: DataLoader
    sample_weights: torch.Tensor | None  # per training image, for the balanced sampler
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader_rng: torch.Generator
    augment: BatchAugment | None
    augment_rng: torch.Generator
    ranks: Ranks = field(default_factory=Ranks)
    amp: Amp | None = None  # mixed precision of the training passes (None: fp32)
    attention: BoxAttention | None = None  # the box-attention loss (--box-loss)
    mix: BatchMix | None = None  # mixup or cutmix (--mix)
    head_inputs: torch.Tensor | None = None  # backbone features of the training images, for head-only epochs
    _wrapped: tuple[tuple[str, ...], nn.Module] | None = None

    def training_model(self) -> nn.Module:
        """The model the training passes run: under torchrun, in DistributedDataParallel over the parameters that
        train now (built again when that set changes, e.g. once the backbone unfreezes)."""
        if not self.ranks.enabled:
            return self.model
        trainable = tuple(n for n, p in self.model.named_parameters() if p.requires_grad)
        if self._wrapped is None or self._wrapped[0] != trainable:
            self._wrapped = (trainable, wrap_distributed(self.model, self.ranks, self.device))
        return self._wrapped[1]

    @cached_property
    def bn_sample(self) -> np.ndarray:
        """A fixed, class-mixed sample of training images (records are stored class by class) on which BatchNorm
        statistics are re-estimated before each validation at the served size."""
        order = np.random.default_rng(self.config.train.seed).permutation(self.train_idx)
        return np.sort(order[:BN_RECALIBRATION_IMAGES])

    @property
    def per_step_scheduler(self) -> Any:
        return self.scheduler if self.config.train.schedule != "plateau" else None


@dataclass
class Tracker:
    """Model selection and early stopping: the monitored score's best epoch and the epochs since."""

    sign: float  # +1 when higher is better
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record a served-resolution epoch; True when it becomes ``best.pt``. Patience counts epochs without a
        strict improvement; a tie still takes the later, more annealed epoch."""
        score *= self.sign
        self.bad_epochs = 0 if score > self.best_score else self.bad_epochs + 1
        if score >= self.best_score:
            self.best_score, self.best_epoch = score, epoch
            return True
        return False

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("history", "best_score", "best_epoch", "bad_epochs")}


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress = no_progress,
) -> RunResult:
    """Train a model as ``config`` says, writing a self-describing run directory at ``config.out``.

    The run directory holds ``config.yaml``, ``split.csv``, ``history.csv``, ``best.pt``, ``last.pt``,
    ``metrics.json`` (held-out test split), ``skipped.csv`` (files left out, with reasons), ``run.json`` (digests
    of config and data) and PNG plots; it is created once the data are read and the model is built, so a run that
    fails before training leaves nothing behind. ``--out`` must be new or empty: ``resume=True`` continues the run
    there from ``last.pt``; ``overwrite=True`` moves what is there aside (never deletes). Data paths are recorded
    absolute.
    ``on_epoch_end`` receives each epoch's history row once ``last.pt`` is written (live plots, custom stopping);
    ``progress`` reports reading and epochs (:mod:`brainscan.progress`).

    Example:
        >>> cfg = RunConfig(DataConfig(root="../shared/data/brain-mri-yes-no"), out="runs/yesno")  # doctest: +SKIP
        >>> result = train(cfg)  # doctest: +SKIP
        >>> result.metrics["accuracy"]  # doctest: +SKIP
    """
    device = resolve_device(config.train.device)
    Amp.resolve(config.train.precision, device)  # a precision the device cannot run: refused before any work
    ranks = start(device.type)
    joined = ranks.enabled
    try:
        return _train(config, ranks, resume=resume, overwrite=overwrite, on_epoch_end=on_epoch_end, progress=progress)
    finally:
        if joined:
            stop(ranks)


def _train(
    config: RunConfig,
    ranks: Ranks,
    *,
    resume: bool,
    overwrite: bool,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
    progress: Progress,
) -> RunResult:
    run_dir = Path(config.out)
    config, last = _resume_state(run_dir, config) if resume else (config.resolved(), None)
    if last is None:
        check_new_run(config, run_dir, overwrite=overwrite)
    check_index_columns(config)  # a resumed run too: its index may have changed since
    barrier(ranks)  # every rank has checked --out before rank 0 writes into it
    s = _set_up(config, run_dir, resumed=last is not None, overwrite=overwrite, progress=progress, ranks=ranks)
    tracker = Tracker(sign=-1.0 if config.train.monitor == "val_loss" else 1.0)
    start_epoch = _restore(s, tracker, last) if last is not None else 1
    started = time.time()
    for epoch in range(start_epoch, config.train.epochs + 1):
        epoch_start = time.time()
        frozen, size = _prepare_epoch(s, epoch)
        fit = _gathered(s, _fit_epoch(s, epoch, frozen=frozen, size=size, progress=progress))
        sync_buffers(ranks, s.model)  # rank 0's BatchNorm statistics everywhere: one model to validate and save
        # Only epochs at the served resolution are candidates for best.pt; a low-resolution epoch is validated at
        # its own size, as a progress figure, which spares a BatchNorm recalibration and a full-size pass per epoch.
        served = frozen or size == s.preprocess.image_size
        val = _validate_epoch(s, recalibrate=served and not frozen, size=s.preprocess.image_size if served else size)
        row = from_main(ranks, _history_row(s, epoch, frozen, size, fit, val, time.time() - epoch_start))
        tracker.history.append(row)
        if config.train.schedule == "plateau":
            s.scheduler.step(row[config.train.monitor])
        # a final model has no held-out figures to choose by: it keeps its last epoch, as its recipe was chosen
        is_best = served and (tracker.update(row[config.train.monitor], epoch) or config.data.final)
        if ranks.is_main:  # the only rank that writes
            if is_best:
                save_checkpoint(_payload(s, epoch), run_dir / "best.pt")
            save_checkpoint(_payload(s, epoch, resume=_resume_payload(s, tracker)), run_dir / "last.pt")
            # after last.pt, so that history.csv never runs ahead of what --resume continues from
            write_csv(run_dir / "history.csv", HISTORY_FIELDS, tracker.history)
            if on_epoch_end is not None:
                on_epoch_end(row)
        if config.train.patience and tracker.bad_epochs >= config.train.patience:
            log.info("Early stopping: no %s improvement for %d epochs.", config.train.monitor, config.train.patience)
            break
    train_seconds = time.time() - started
    best_epoch = int(tracker.history[-1]["epoch"]) if config.data.final else tracker.best_epoch
    if not ranks.is_main:  # rank 0 scores the best model and writes the metrics
        return RunResult(run_dir, run_dir / "best.pt", {}, tracker.history)
    return _finish(run_dir, s.data, s.preprocess, s.device, tracker.history, train_seconds, best_epoch,
                   config.train.target_sensitivity, progress=progress)  # fmt: skip


def check_new_run(config: RunConfig, run_dir: Path, *, overwrite: bool = False) -> None:
    """What a new run can check before any image is read: the output folder is new or empty (or
    ``overwrite``) and outside the data, and a pretrained architecture has weights (or was asked to start from
    random ones)."""
    index = Path(config.data.index) if config.data.index else None
    own_index = index.name if index is not None and index.parent.resolve() == run_dir.resolve() else None
    check_output(run_dir, own=lambda name: name == own_index, overwrite=overwrite, wanted=config)
    check_outside_data(run_dir, config)
    check_model_weights(config)


def check_index_columns(config: RunConfig) -> None:
    """The index CSV has the columns the training options read: tumour boxes for ``--box-loss``, sources for
    ``--balance source`` (checked before any image is read)."""
    index = find_index(config.data.root, config.data.index)
    if config.train.box_loss:
        check_has_boxes(index, why="--box-loss")
    if config.train.balance == "source":
        check_has_sources(index, why="--balance source")


def check_model_weights(config: RunConfig) -> None:
    """A pretrained architecture has weights, or was asked to start from random ones."""
    spec = get_spec(config.model.name)
    if config.model.weights:
        check_weights(spec, config.model.weights)
    elif spec.has_pretrained and not config.model.random_init:
        raise BrainscanError(
            f"{spec.name} is an ImageNet architecture and no --weights were given: pass --weights pretrained "
            "(offline weights when installed, else a download), --weights FILE (a state_dict) or --weights DEFAULT "
            "(torchvision download), or --random-init to train it from random weights (far less accurate on small "
            "data)."
        )


def _set_up(
    config: RunConfig, run_dir: Path, *, resumed: bool, overwrite: bool, progress: Progress, ranks: Ranks = ONE_PROCESS
) -> Session:
    """Seeds, data, model, loaders, loss and optimisation, in the order that fixes every random draw; then the
    run directory, once nothing before training can fail (rank 0 only, under torchrun)."""
    t = config.train
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)  # noqa: NPY002 - third-party code may draw from numpy's global RNG
    set_torch_threads(t.threads or max(1, available_cpus() // ranks.local_world_size))  # the cores are shared
    device = resolve_device(t.device)
    if device.type == "cuda" and ranks.enabled:
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    amp = Amp.resolve(t.precision, device)
    spec = get_spec(config.model.name)
    preprocess = Preprocess(
        config.data.image_size, spec.mean, spec.std, config.data.crop_background, standardise=config.data.standardise
    )
    split_file = run_dir / "split.csv" if resumed else None
    data = prepare_data(config.data, seed=t.seed, split_file=split_file, progress=progress)
    same_on_every_rank(ranks, data.rows, "split")
    log.info(_describe_data(data))

    pretrained = bool(config.model.weights)
    model = create_model(spec.name, len(data.class_names), config.model.weights, dropout=config.model.dropout)
    model = model.to(device).to(memory_format=torch.channels_last)
    train_idx, val_idx = data.subset("train"), data.subset("val")
    loader_rng = torch.Generator().manual_seed(t.seed)
    boxes = _training_boxes(data, train_idx, preprocess, config) if t.box_loss else None
    cache = slice_cache(data.images, device)
    train_set = SliceDataset(cache, data.targets, train_idx, boxes)
    pin = device.type == "cuda" and cache.device.type == "cpu"  # pinned host memory: faster, asynchronous copies
    weights = _class_weights(data.targets[train_idx], len(data.class_names))
    sample_weights = _sample_weights(data, train_idx, weights, config)
    sampler = WeightedRandomSampler(sample_weights, len(train_idx), replacement=True, generator=loader_rng) \
        if sample_weights is not None else None  # fmt: skip
    drop_last = len(train_idx) > t.batch_size
    if ranks.enabled:  # the same seeded order on every rank, each global batch shared out among them
        order = sampler if sampler is not None else RandomSampler(train_set, generator=loader_rng)
        batches = RankBatches(order, t.batch_size, drop_last, ranks)
        train_loader = DataLoader(train_set, batch_sampler=batches, pin_memory=pin)
    else:
        train_loader = DataLoader(
            train_set,
            batch_size=t.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=loader_rng,
            drop_last=drop_last,
            pin_memory=pin,
        )
    criterion = nn.CrossEntropyLoss(
        weight=weights.to(device) if t.balance == "loss" else None, label_smoothing=t.label_smoothing
    )
    optimizer = _build_optimizer(model, spec, t, pretrained)
    scheduler = SCHEDULES[t.schedule](optimizer, t, t.epochs * len(train_loader))
    attention = BoxAttention(model, spec, t.box_loss) if t.box_loss else None

    if ranks.is_main:
        if overwrite and not resumed:
            index = Path(config.data.index) if config.data.index else None
            claim_output(run_dir, own=lambda name: index is not None and run_dir / name == index)
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
        write_split_file(run_dir / "split.csv", data.rows)
        write_skipped_file(run_dir / SKIPPED_FILE, data.skipped)
        write_identity(run_dir, config, data.rows)
        if data.fingerprints is not None:
            save_fingerprints(run_dir / TRAINING_PRINTS, data.seen_fingerprints())
    return Session(
        config, run_dir, device, spec, data, model, preprocess, pretrained, train_idx, val_idx, train_loader,
        sample_weights, criterion, optimizer, scheduler, loader_rng,
        BatchAugment(acquisition=t.augment_acquisition) if t.augment else None,
        torch.Generator().manual_seed(t.seed + 1), ranks, amp, attention,
        BatchMix(t.mix, t.mix_alpha) if t.mix != "none" else None,
    )  # fmt: skip


def slice_cache(images: np.ndarray, device: torch.device, *, share: float = 0.25) -> torch.Tensor:
    """The ``uint8`` slices the training batches are drawn from: on a CUDA device when they take at most ``share``
    of its free memory (no host-to-device copy per batch; augmentation then runs there too), else in host memory
    (shared with ``images``, not copied)."""
    cache = torch.from_numpy(images)
    if device.type != "cuda":
        return cache
    free, _ = torch.cuda.mem_get_info(device)
    if images.nbytes > share * free:
        log.info("Slice cache in host memory: %.1f GB is over %d%% of the GPU's free memory.", images.nbytes / 1e9,
                 round(share * 100))  # fmt: skip
        return cache
    return cache.to(device)


def _training_boxes(data: PreparedData, train_idx: np.ndarray, preprocess: Preprocess, config: RunConfig) -> np.ndarray:
    """The training images' tumour boxes in slice pixels (NaN where an image has none).

    Raises:
        BrainscanError: no training image has a box.
    """
    index = find_index(config.data.root, config.data.index)
    assert index is not None  # check_index_columns refused data without one
    paths = [data.rows[i]["path"] for i in train_idx]
    boxes = slice_boxes(data.root, paths, index_boxes(index), preprocess.slice_format)
    boxed = int(np.isfinite(boxes[:, 0]).sum())
    if not boxed:
        raise BrainscanError(f"--box-loss: none of the {len(paths)} training images has a box in {index}.")
    log.info("Box attention: %d of %d training images have a tumour box (weight %g).", boxed, len(paths),
             config.train.box_loss)  # fmt: skip
    return boxes


def _sample_weights(
    data: PreparedData, train_idx: np.ndarray, class_weights: torch.Tensor, config: RunConfig
) -> torch.Tensor | None:
    """Per training image, its weight in the sampler's draws (None: no sampler, each epoch a permutation)."""
    if config.train.balance == "sampler":
        return class_weights[data.targets[train_idx]].double()
    if config.train.balance != "source":
        return None
    index = find_index(config.data.root, config.data.index)
    assert index is not None  # check_index_columns refused data without one
    sources = index_sources(index, [data.rows[i]["path"] for i in train_idx])
    weights, cells = source_balanced_weights(data.targets[train_idx], sources)
    log.info("Draws balanced by class, then by source within each class: %s.", "; ".join(
        f"{name} " + ", ".join(f"{src} {n:,}" for (c, src), n in sorted(cells.items()) if c == k)
        for k, name in enumerate(data.class_names) if any(c == k for c, _ in cells)
    ))  # fmt: skip
    return torch.from_numpy(weights)


def _restore(s: Session, tracker: Tracker, last: dict[str, Any]) -> int:
    """Load ``last.pt``'s model, optimisation, random streams and selection state; returns the next epoch."""
    state = last["resume"]
    s.model.load_state_dict(last["model_state"])
    s.optimizer.load_state_dict(state["optimizer"])
    if s.scheduler is not None and state.get("scheduler"):
        s.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    s.loader_rng.set_state(state["loader_rng"])
    s.augment_rng.set_state(state["augment_rng"])
    tracker.history = list(state["history"])
    tracker.best_score, tracker.best_epoch, tracker.bad_epochs = (
        state["best_score"], state["best_epoch"], state["bad_epochs"]
    )  # fmt: skip
    s.data.protocol = last.get("data", s.data.protocol)
    log.info("Resuming %s after epoch %d.", s.run_dir, int(last["epoch"]))
    return int(last["epoch"]) + 1


def _prepare_epoch(s: Session, epoch: int) -> tuple[bool, int]:
    """Which layers train this epoch and at what size: (head only?, input size)."""
    t = s.config.train
    frozen = s.pretrained and epoch <= t.freeze_epochs
    set_backbone_frozen(s.model, s.spec, frozen)
    if s.pretrained and t.freeze_early and not frozen:
        freeze_early_layers(s.model, s.spec)
    return frozen, epoch_image_size(epoch, s.config)


def _fit_epoch(s: Session, epoch: int, *, frozen: bool, size: int, progress: Progress) -> EpochOutput:
    """One epoch of fitting: the head alone on cached backbone features, or the network on augmented batches."""
    t = s.config.train
    if frozen and t.cache_head_features:
        if s.head_inputs is None:
            with progress("Backbone features (once)", 1) as advance:
                s.head_inputs = extract_head_inputs(
                    s.model, s.spec, s.data.images, s.train_idx, preprocess=s.preprocess, device=s.device
                )
                advance(1)
        batches = head_epoch_order(
            len(s.train_idx),
            batch_size=t.batch_size,
            drop_last=s.train_loader.drop_last,
            generator=s.loader_rng,
            weights=s.sample_weights,
        )
        targets = s.train_loader.dataset.targets
        loss, logits, seen = fit_head_epoch(
            s.model.get_submodule(s.spec.classifier), s.head_inputs, targets, batches, criterion=s.criterion,
            optimizer=s.optimizer, scheduler=s.per_step_scheduler, dropout=dropout_rate(s.model, s.spec),
            device=s.device,
        )  # fmt: skip
        return EpochOutput(loss, logits, seen)
    label = f"Epoch {epoch}/{t.epochs}" + (" (head only)" if frozen else f" ({size} px)")
    with progress(label, len(s.train_loader)) as advance:
        return train_one_epoch(
            s.training_model(),
            s.train_loader,
            preprocess=s.preprocess,
            criterion=s.criterion,
            device=s.device,
            optimizer=s.optimizer,
            scheduler=s.per_step_scheduler,
            frozen_spec=s.spec if frozen else None,
            input_size=size,
            augment=s.augment,
            generator=s.augment_rng,
            pass_pixels=t.cpu_pass_pixels if s.device.type == "cpu" else 0,
            amp=s.amp,
            attention=s.attention,
            mix=s.mix,
            on_batch=advance,
        )


def _validate_epoch(s: Session, *, recalibrate: bool, size: int) -> EpochOutput:
    """Validation logits through the one inference pass (:func:`~brainscan.backends.forward_batches`): at the
    served size on the fastest backend (ONNX Runtime on a CPU), after re-estimating BatchNorm statistics when the
    backbone trained; at a low-resolution epoch's own size on the model itself."""
    if recalibrate:
        recalibrate_batchnorm(s.model, s.data.images[s.bn_sample], preprocess=s.preprocess, device=s.device)
    if size == s.preprocess.image_size:
        backend = fast_backend(s.model, s.preprocess, s.device)
    else:
        backend = TorchBackend(s.model, s.preprocess, s.device, input_size=size)
        # Up to 0.1 this pass iterated a DataLoader, whose iterator draws one number from the global RNG; drawing
        # it still keeps dropout's stream, and so every seeded figure measured before, unchanged.
        torch.empty((), dtype=torch.int64).random_()
    logits = torch.from_numpy(forward_batches(backend, s.data.images, s.val_idx, batch_size=VAL_BATCH)).float()
    labels = torch.from_numpy(s.data.targets[s.val_idx]).long()
    del backend
    release_free_memory()
    return EpochOutput(float(F.cross_entropy(logits, labels)), logits, labels)


def _gathered(s: Session, fit: EpochOutput) -> EpochOutput:
    """The epoch's training figures over every rank's share of the batches (the rank's own with one process)."""
    if not s.ranks.enabled:
        return fit
    parts = gather(s.ranks, (fit.loss * len(fit.targets), fit.logits, fit.targets))
    n = sum(len(targets) for _, _, targets in parts)
    loss = sum(total for total, _, _ in parts) / max(n, 1)
    return EpochOutput(loss, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))


def _history_row(
    s: Session, epoch: int, frozen: bool, size: int, fit: EpochOutput, val: EpochOutput, seconds: float
) -> dict[str, Any]:
    scores = compute_metrics(val.targets.numpy(), val.logits.softmax(1).numpy(), s.data.class_names, protocol={})
    row = {
        "epoch": epoch,
        "stage": "head" if frozen else f"full@{size}px",
        "train_loss": round(fit.loss, 5),
        "train_accuracy": round(fit.accuracy, 5),
        "val_loss": round(val.loss, 5),
        "val_accuracy": round(scores["accuracy"], 5),
        "val_balanced_accuracy": round(scores["balanced_accuracy"], 5),
        "val_macro_f1": round(scores["macro_f1"], 5),
        "lr": s.optimizer.param_groups[0]["lr"],
        "seconds": round(seconds, 1),
    }
    log.info(
        "epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f bal-acc %.3f (%ss)", epoch, fit.loss,
        fit.accuracy, val.loss, scores["accuracy"], scores["balanced_accuracy"], row["seconds"],
    )  # fmt: skip
    return row


def _payload(s: Session, epoch: int, *, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    origin = weights_origin(s.model)
    return checkpoint_payload(
        arch=s.spec.name,
        class_names=s.data.class_names,
        preprocess=s.preprocess,
        config=s.config.to_dict(),
        protocol=s.data.protocol,
        pretrained=s.config.model.weights or "none",
        weights_origin=origin.to_dict() if origin else None,
        model_state=s.model.state_dict(),
        epoch=epoch,
        resume=resume,
    )


def _resume_payload(s: Session, tracker: Tracker) -> dict[str, Any]:
    """What ``last.pt`` needs beyond the model to continue exactly where the run stopped."""
    return {
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict() if s.scheduler is not None else {},
        "torch_rng": torch.get_rng_state(),
        "loader_rng": s.loader_rng.get_state(),
        "augment_rng": s.augment_rng.get_state(),
        **tracker.state(),
    }


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    *,
    preprocess: Preprocess,
    criterion: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    frozen_spec: ModelSpec | None = None,
    input_size: int | None = None,
    augment: BatchAugment | None = None,
    generator: torch.Generator | None = None,
    pass_pixels: int = 0,
    amp: Amp | None = None,
    attention: BoxAttention | None = None,
    mix: BatchMix | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> EpochOutput:
    """One training pass over ``loader``.

    ``scheduler`` (stepped per batch) is for per-step schedules; ``frozen_spec`` keeps the backbone's BatchNorm
    statistics fixed during head-only epochs; ``input_size`` resizes batches (progressive resizing); ``augment``
    draws from ``generator``; ``pass_pixels`` (0: off) bounds a forward/backward pass, see
    :func:`accumulated_step`; ``amp`` sets mixed precision; ``attention`` adds the box-attention loss for loaders
    that yield boxes; ``mix`` mixes each batch with a shuffled copy (drawing from ``generator``).
    """
    model.train()
    if frozen_spec is not None:  # on the model itself, inside a DistributedDataParallel wrapper
        set_backbone_frozen(getattr(model, "module", model), frozen_spec, True)
    total_loss, all_logits, all_targets = 0.0, [], []
    for images, targets, *boxes in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        masks = box_masks(boxes[0].to(device), images.shape[-1]) if boxes and attention is not None else None
        x, masks = to_model_input_with_masks(images, masks, preprocess, augment=augment, generator=generator)
        mixed = None
        if mix is not None:
            x, partner, lam = mix(x, generator)
            mixed = targets[partner.to(device)], lam
        x = resize_batch(x, input_size)
        passes = math.ceil(x.shape[0] * x.shape[-1] * x.shape[-2] / pass_pixels) if pass_pixels else 1
        loss, logits = accumulated_step(
            model, x, targets, criterion=criterion, optimizer=optimizer, scheduler=scheduler, passes=passes,
            amp=amp, attention=attention if masks is not None else None, masks=masks, mixed=mixed,
        )  # fmt: skip
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
    amp: Amp | None = None,
    attention: BoxAttention | None = None,
    masks: torch.Tensor | None = None,
    mixed: tuple[torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch fed through the model in ``passes`` slices; returns (loss, logits).

    Activations are held for one slice at a time, so peak memory falls with the slice size. Each slice's loss is
    weighted by its share of the batch (of the class weights, for a weighted loss), so the accumulated gradient is
    the whole batch's; only BatchNorm, which normalises over what it sees, works per slice. Under
    DistributedDataParallel the gradients are averaged across processes once, after the last slice. With
    ``attention``, each slice adds its share of the box-attention loss on ``masks``. ``mixed`` (each image's
    partner label and the share ``lam`` of its own, from :class:`~brainscan.data.transforms.BatchMix`) weighs the
    two labels' losses by ``lam`` and ``1 - lam``.
    """
    passes = max(1, min(passes, len(x)))
    weight = getattr(criterion, "weight", None)
    partners, lam = mixed if mixed is not None else (targets, 1.0)
    shares, partner_shares = (
        (weight[t] if weight is not None else torch.ones(len(t), device=t.device)) for t in (targets, partners)
    )
    total_share, total_partner_share = shares.sum(), partner_shares.sum()
    scaler = amp.scaler if amp is not None else None
    optimizer.zero_grad(set_to_none=True)
    loss_sum, all_logits = torch.zeros((), device=x.device), []
    mask_slices = masks.tensor_split(passes) if masks is not None else [None] * passes
    slices = zip(*(t.tensor_split(passes) for t in (x, targets, shares, partners, partner_shares)), mask_slices,
                 strict=True)  # fmt: skip
    for i, (xs, ys, ws, ps, pws, ms) in enumerate(slices):
        last = i == passes - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        watching = attention.watching() if attention is not None else contextlib.nullcontext()
        with sync, watching:
            dtype = amp.dtype if amp is not None else torch.float32
            with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=amp is not None):
                logits = model(xs)
                loss = criterion(logits.float(), ys) * (ws.sum() / total_share)
                if mixed is not None:
                    loss = lam * loss + (1 - lam) * criterion(logits.float(), ps) * (pws.sum() / total_partner_share)
                if attention is not None and ms is not None:
                    loss = loss + attention.loss(ms, ys) * (len(ys) / len(targets))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
        all_logits.append(logits.detach())
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
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
    average over a fixed set of clean slices removes that mismatch (as in FixRes, Touvron et al. 2019). A
    training-mode pass, so not the inference pass: its outputs are discarded, only the statistics matter.
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


def _build_optimizer(model: nn.Module, spec: ModelSpec, t: TrainConfig, pretrained: bool) -> torch.optim.Optimizer:
    """The head at ``lr``; a pretrained backbone slower, at ``lr × backbone_lr_scale``."""
    backbone_lr = t.lr * (t.backbone_lr_scale if pretrained else 1.0)
    groups = [
        {"params": head_parameters(model, spec), "lr": t.lr},
        {"params": backbone_parameters(model, spec), "lr": backbone_lr},
    ]
    return OPTIMIZERS[t.optimizer](groups, lr=t.lr, weight_decay=t.weight_decay)


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


def _resume_state(run_dir: Path, config: RunConfig) -> tuple[RunConfig, dict[str, Any]]:
    last = run_dir / "last.pt"
    if not last.is_file():
        raise BrainscanError(f"{run_dir}: nothing to resume (no last.pt).")
    ckpt = load_checkpoint(last)
    saved = RunConfig.from_dict(ckpt["config"])
    # Only the epoch budget may change on resume: the rest defines the experiment.
    return replace(saved, train=replace(saved.train, epochs=config.train.epochs)), ckpt


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
    val = Split(data.images[val_idx], data.targets[val_idx])
    if len(test_idx):
        test = Split(
            data.images[test_idx],
            data.targets[test_idx],
            groups=[data.rows[i]["group"] for i in test_idx],
            seen_groups={row["group"] for row in data.rows if row["split"] in ("train", "val")},
            protocol={**data.protocol, "split": "test", "n_evaluated": len(test_idx)},
        )
    else:  # a final model: its only held-out images chose the checkpoint and calibrate it
        test_idx = val_idx
        test = replace(val, protocol={**data.protocol, "split": "val (no test split)", "n_evaluated": len(val_idx)})
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

    curves, confusion, examples = PLOTS
    save_png(curves_figure(history), run_dir / curves)
    save_png(confusion_matrix_figure(metrics["confusion_matrix"], data.class_names), run_dir / confusion)
    save_png(
        examples_figure(test.images, test.targets, scores.probs, data.class_names, seed=0), run_dir / examples, dpi=80
    )
    roc_auc = metrics["roc_auc"]
    log.info(
        "%s (%d images): accuracy %.3f, balanced accuracy %.3f, macro F1 %.3f, ROC-AUC %s",
        "Test" if test.protocol["split"] == "test" else "Val (final model: no test split)",
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
