"""Typed, frozen run configuration: built once (CLI or notebook), saved in the run directory and checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import BrainscanError
from .files import write_text

OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "onecycle", "plateau", "none")
BALANCE = ("none", "sampler", "loss", "source")
MIXES = ("none", "mixup", "cutmix")
MONITORS = ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1")
# auto: bf16 autocast on CUDA (fp16 with a gradient scaler where the GPU lacks bf16), fp32 on a CPU
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise BrainscanError(message)


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they become a split and model inputs."""

    root: str | None = None  # folder of images (class folders, pre-split folders) or the base of an index's paths
    index: str | None = None  # CSV with path,label and optional group/split columns
    group_column: str | None = None  # index column whose values must never straddle splits (patient, cv_fold)
    val_fraction: float = 0.15  # the customary 70/15/15 split when the data bring none
    test_fraction: float = 0.15
    # duplicate sets (exact, pixel and near copies, as the audit finds them) share a group: never in two splits
    group_duplicates: bool = True
    strict: bool = False  # unreadable files are fatal instead of skipped-and-reported
    # the same image (file, or duplicate set) under two labels is an error naming the files; True leaves them out
    drop_conflicts: bool = False
    # served input size. 160 rather than ImageNet's 224: on Figshare's patient-wise folds MobileNetV2 at 160 px
    # (128-px epochs first) scores as well as at 224 (5-fold mean, see README) and trains ~3x faster on a CPU
    image_size: int = 160
    crop_background: bool = True  # crop the black border to the head before resizing: more pixels on the brain
    # window every slice on its own head's intensity percentiles, so that a source's grey levels carry no label
    standardise: bool = False
    # before training, check whether file properties that carry no anatomy predict the label (the audit's confound
    # check); a flag is a warning and goes into the protocol
    confound_check: bool = True
    cache_dir: str | None = None  # on-disk cache of decoded, resized images (None: in memory only)
    # the deployed model: the test split joins train (val stays, for calibration, threshold and checkpoint choice).
    # Choose the recipe first with a held-out split or cv; a final run's own figures are on val, so optimistic
    final: bool = False

    def __post_init__(self) -> None:
        _check(
            self.root is not None or self.index is not None,
            "Give a data folder (--data DIR) or an index (--index FILE).",
        )
        _check(0 < self.val_fraction < 1 and 0 < self.test_fraction < 1, "val/test fractions must lie in (0, 1).")
        _check(self.val_fraction + self.test_fraction < 0.9, "val + test fractions leave too little to train on.")
        _check(32 <= self.image_size <= 1024, f"image_size {self.image_size} is outside 32..1024 px.")


@dataclass(frozen=True)
class ModelConfig:
    """Which architecture, initialised from which weights."""

    name: str = "mobilenet_v2"
    weights: str | None = None  # a state_dict file, or a torchvision weights name such as DEFAULT / IMAGENET1K_V1
    dropout: float = 0.2  # torchvision's MobileNetV2 default
    # an ImageNet architecture without weights is refused unless asked for: from random weights it is far less
    # accurate on datasets of this size, and forgetting --weights should not go unnoticed
    random_init: bool = False

    def __post_init__(self) -> None:
        _check(0 <= self.dropout < 1, "dropout must lie in [0, 1).")


@dataclass(frozen=True)
class TrainConfig:
    """How to fit: schedule, optimiser, stopping, imbalance, reproducibility."""

    epochs: int = 12  # fits the patient-wise Figshare benchmark in under 20 min on 2 CPU cores
    batch_size: int = 32
    lr: float = 1e-3  # head learning rate; AdamW is forgiving around 1e-3 for a fresh linear head
    backbone_lr_scale: float = 0.3  # pretrained layers move slower than the new head once unfrozen
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    freeze_epochs: int = 1  # head-only epochs before the backbone is unfrozen (pretrained models only)
    # pretrained early blocks (stride <= 4) stay frozen while fine-tuning: no backward pass through the largest
    # feature maps, ~1.4x faster epochs on a CPU; at 128/160 px no less accurate (see README)
    freeze_early: bool = True
    cache_head_features: bool = True  # head-only epochs train on backbone features computed once: ~5x cheaper
    # progressive resizing: unfrozen epochs before the last full_res_epochs run at this size. Keep the jump small
    # (FixRes): 128 -> 160 px keeps the training accuracy, 128 -> 224 px lost 5-9 points of it at the switch
    low_res: int = 128
    # final epochs at image_size, so the model ends adapted to the resolution it serves (None: the last quarter)
    full_res_epochs: int | None = None
    # a CPU batch with more pixels than this goes through the model in slices whose gradients add up (BatchNorm
    # sees each slice): 16 images at 160 px, 8 at 224. At 224 px MobileNetV2 on the 7,023-image set peaked at 2.7
    # instead of 3.3 GB and was no slower (0: never split; a GPU never splits)
    cpu_pass_pixels: int = 16 * 160 * 160
    label_smoothing: float = 0.0
    # weight of the box-attention loss (brainscan.box_attention): each tumour slice's activation map pulled into its
    # tumour box from the index's box columns, at training only (0: off)
    box_loss: float = 0.0
    # mix pairs of training images and their labels: mixup (blend) or cutmix (paste a patch), by a Beta(mix_alpha,
    # mix_alpha) share per batch; a lever against shortcuts such as a source's look (see docs/benchmarks.md)
    mix: str = "none"
    mix_alpha: float = 1.0
    patience: int = 0  # early stopping after this many epochs without improvement (0: off)
    # selects best.pt among the epochs at the served resolution; balanced accuracy is robust to class imbalance
    monitor: str = "val_balanced_accuracy"
    target_sensitivity: float | None = None  # tumour decision threshold for this sensitivity on val (None: Youden's J)
    # loss: class-weighted loss, the datasets here are imbalanced (fold 1: 0.935 vs 0.928 plain); sampler: draws
    # balanced by class; source: draws balanced by class, then by the index's source column within each class
    balance: str = "loss"
    augment: bool = True
    # also simulate other scanners and exports (resolution, blur/sharpen, gamma, noise, JPEG quality): for models
    # meant for data from elsewhere
    augment_acquisition: bool = False
    seed: int = 0
    device: str = "auto"  # auto: cuda when present, else cpu
    precision: str = "auto"  # mixed precision of the training passes (PRECISIONS)
    threads: int | None = None  # torch intra-op threads (None: one per physical core)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs must be at least 1.")
        _check(self.batch_size >= 1, "batch_size must be at least 1.")
        _check(self.lr > 0, "lr must be positive.")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}.")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}.")
        _check(self.balance in BALANCE, f"balance must be one of {', '.join(BALANCE)}.")
        _check(self.monitor in MONITORS, f"monitor must be one of {', '.join(MONITORS)}.")
        _check(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}.")
        _check(0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1).")
        _check(self.box_loss >= 0, "box_loss must be >= 0 (0: off).")
        _check(self.mix in MIXES, f"mix must be one of {', '.join(MIXES)}.")
        _check(self.mix_alpha > 0, "mix_alpha must be positive.")
        _check(self.mix == "none" or not self.box_loss, "box_loss and mix do not combine: a mixed image has no box.")
        _check(self.freeze_epochs >= 0 and self.patience >= 0, "freeze_epochs and patience must be >= 0.")
        _check(self.low_res == 0 or self.low_res >= 32, "low_res must be 0 (off) or at least 32 px.")
        _check(self.cpu_pass_pixels >= 0, "cpu_pass_pixels must be >= 0 (0: off).")
        _check(self.full_res_epochs is None or self.full_res_epochs >= 1, "full_res_epochs must be at least 1.")
        _check(
            self.target_sensitivity is None or 0 < self.target_sensitivity <= 1,
            "target_sensitivity must lie in (0, 1].",
        )

    @property
    def full_resolution_epochs(self) -> int:
        """How many final epochs run at full resolution: ``full_res_epochs``, or a quarter of the epochs."""
        return self.full_res_epochs if self.full_res_epochs is not None else max(1, self.epochs // 4)


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; saved as ``config.yaml`` in the run directory."""

    data: DataConfig
    out: str = "runs/latest"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain builtins only, so it fits a ``weights_only`` checkpoint and a YAML file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error that names them."""
        sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value)
            elif key == "out":
                kwargs[key] = value
            elif key == "quiet":  # written by brainscan 0.1 runs; verbosity is the CLI's, not the run's
                continue
            else:
                raise BrainscanError(f"Unknown config section {key!r}.")
        return cls(**kwargs)

    def resolved(self) -> RunConfig:
        """This config with its data paths absolute and resolved, so that the run finds its images from anywhere."""
        paths = {name: str(Path(value).resolve()) for name in ("root", "index", "cache_dir")
                 if (value := getattr(self.data, name)) is not None}  # fmt: skip
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **paths))

    def with_recipe(self, name: str) -> RunConfig:
        """This config with the values of recipe ``name`` (:data:`RECIPES`) in place of its own."""
        fields = recipe_fields(name)
        return dataclasses.replace(
            self, **{section: dataclasses.replace(getattr(self, section), **v) for section, v in fields.items()}
        )

    def save(self, path: str | Path) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))


# Named recipes: field values applied before any option the user types. ``fast`` is the dataclass defaults (the
# small-CPU recipe chosen on Figshare's patient-wise folds); ``full`` switches off its two CPU shortcuts (128-px
# epochs first, pretrained early blocks frozen); ``robust`` adds what makes a model hold up on data from elsewhere
# (per-image intensity standardisation, acquisition augmentation). Measurements: docs/benchmarks.md.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {},
    "full": {"train": {"low_res": 0, "freeze_early": False}},
    "robust": {
        "data": {"standardise": True},
        "train": {"low_res": 0, "freeze_early": False, "augment_acquisition": True},
    },
}


def recipe_fields(name: str) -> dict[str, dict[str, Any]]:
    """The config values of recipe ``name`` (:data:`RECIPES`), by section.

    Raises:
        BrainscanError: no such recipe.
    """
    if name not in RECIPES:
        raise BrainscanError(f"Unknown recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    return RECIPES[name]


def _build(kind: type, values: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise BrainscanError(f"Unknown {kind.__name__} field(s): {', '.join(sorted(unknown))}.")
    return kind(**values)
