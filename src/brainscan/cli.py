"""The ``brainscan`` command: a thin Typer layer that builds a config, calls one library function, renders."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import DISCLAIMER
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .errors import BrainscanError

T, D = TrainConfig, DataConfig  # option defaults come from the config, the one place they are defined

app = typer.Typer(
    help=f"Brain-tumour MRI slice classification. {DISCLAIMER}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console()
err_console = Console(stderr=True)

Checkpoint = Annotated[Path, typer.Option("--checkpoint", "-c", help="A brainscan checkpoint (best.pt).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter; results only.")]
Index = Annotated[
    Path | None, typer.Option(help="CSV with path,label[,group][,split]; paths relative to --data or the CSV.")
]
GroupColumn = Annotated[
    str | None, typer.Option(help="Index column whose values never straddle splits (e.g. cv_fold).")
]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Report user mistakes (BrainscanError) as one red line and exit code 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BrainscanError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@friendly_errors
def train(
    data: Annotated[
        Path | None, typer.Option(help="Image folder (class folders, split folders, an index's base) or an index CSV.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Run directory to create.")] = Path("runs/latest"),
    index: Index = None,
    group_column: GroupColumn = None,
    model: Annotated[
        str, typer.Option(help="Architecture: cnn, mobilenet_v2, resnet18, ... (see `brainscan models`).")
    ] = ModelConfig.name,
    weights: Annotated[
        str | None, typer.Option(help="State_dict file, or a torchvision weights name (DEFAULT, IMAGENET1K_V1).")
    ] = None,
    epochs: Annotated[int, typer.Option()] = T.epochs,
    seed: Annotated[int, typer.Option()] = T.seed,
    image_size: Annotated[int, typer.Option(help="Square input size in pixels.")] = D.image_size,
    batch_size: Annotated[int, typer.Option()] = T.batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate of the new head.")] = T.lr,
    backbone_lr_scale: Annotated[
        float, typer.Option(help="Backbone lr = lr × this, once unfrozen.")
    ] = T.backbone_lr_scale,
    weight_decay: Annotated[float, typer.Option()] = T.weight_decay,
    optimizer: Annotated[str, typer.Option(help="adamw or adam.")] = T.optimizer,
    schedule: Annotated[str, typer.Option(help="cosine, onecycle, plateau or none.")] = T.schedule,
    freeze_epochs: Annotated[
        int, typer.Option(help="Head-only epochs before unfreezing a pretrained backbone.")
    ] = T.freeze_epochs,
    freeze_early_layers: Annotated[
        bool,
        typer.Option(
            "--freeze-early-layers/--train-early-layers",
            help="Keep the pretrained early blocks (stride <= 4) frozen, or train every layer (slower on a CPU).",
        ),
    ] = T.freeze_early,
    label_smoothing: Annotated[float, typer.Option()] = T.label_smoothing,
    low_res: Annotated[
        int, typer.Option(help="Progressive resizing: earlier epochs at this size (0: off).")
    ] = T.low_res,
    full_res_epochs: Annotated[
        int | None, typer.Option(help="Final epochs at --image-size (default: the last quarter).")
    ] = T.full_res_epochs,
    no_feature_cache: Annotated[
        bool,
        typer.Option("--no-feature-cache", help="Head-only epochs run the whole network instead of cached features."),
    ] = False,
    patience: Annotated[int, typer.Option(help="Early-stopping patience in epochs (0: off).")] = T.patience,
    monitor: Annotated[
        str, typer.Option(help="val_balanced_accuracy, val_accuracy, val_macro_f1 or val_loss.")
    ] = T.monitor,
    balance: Annotated[str, typer.Option(help="Class imbalance: none, sampler or loss.")] = T.balance,
    target_sensitivity: Annotated[
        float | None, typer.Option(help="Tumour threshold reaching this val sensitivity (default: Youden's J).")
    ] = None,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Switch off train-time augmentation.")] = False,
    cpu_pass_pixels: Annotated[
        int, typer.Option(help="On a CPU, split bigger batches into passes of this many pixels (0: never).")
    ] = T.cpu_pass_pixels,
    no_crop: Annotated[
        bool, typer.Option("--no-crop", help="Keep the black background instead of cropping to the head.")
    ] = False,
    keep_duplicates_apart: Annotated[
        bool,
        typer.Option(
            "--ignore-duplicates", help="Do not keep duplicate sets (exact, pixel, near copies) in one split."
        ),
    ] = False,
    val_fraction: Annotated[float, typer.Option()] = D.val_fraction,
    test_fraction: Annotated[float, typer.Option()] = D.test_fraction,
    cache_dir: Annotated[Path | None, typer.Option(help="Reuse decoded images across runs from this folder.")] = None,
    strict: Annotated[bool, typer.Option(help="Unreadable files are fatal instead of skipped.")] = False,
    device: Device = "auto",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last.pt.")] = False,
    quiet: Quiet = False,
) -> None:
    """Train a classifier and write a run directory (config, split, history, checkpoints, metrics, plots)."""
    from .train import train as run_train

    config = RunConfig(
        data=_data_config(
            data,
            index,
            cache_dir,
            group_column=group_column,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            group_duplicates=not keep_duplicates_apart,
            strict=strict,
            image_size=image_size,
            crop_background=not no_crop,
        ),
        out=str(out),
        model=ModelConfig(name=model, weights=weights),
        train=TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            backbone_lr_scale=backbone_lr_scale,
            weight_decay=weight_decay,
            optimizer=optimizer,
            schedule=schedule,
            freeze_epochs=freeze_epochs,
            freeze_early=freeze_early_layers,
            label_smoothing=label_smoothing,
            low_res=low_res,
            full_res_epochs=full_res_epochs,
            cache_head_features=not no_feature_cache,
            patience=patience,
            monitor=monitor,
            balance=balance,
            target_sensitivity=target_sensitivity,
            augment=not no_augment,
            cpu_pass_pixels=cpu_pass_pixels,
            seed=seed,
            device=device,
        ),
        quiet=quiet,
    )
    result = run_train(config, resume=resume)
    _print_metrics(result.metrics, quiet=quiet)
    out_console.print(f"Run directory: {result.run_dir}")


def _data_config(data: Path | None, index: Path | None, cache_dir: Path | None, **fields: Any) -> DataConfig:
    """The data section of a run's config from CLI options (paths become strings, absent ones stay None)."""
    return DataConfig(
        root=str(data) if data else None,
        index=str(index) if index else None,
        cache_dir=str(cache_dir) if cache_dir else None,
        **fields,
    )


@app.command()
@friendly_errors
def cv(
    data: Annotated[
        Path | None, typer.Option(help="Image folder (any layout), an index's base, or an index CSV.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the fold runs and cv_metrics.json.")] = Path("runs/cv"),
    index: Index = None,
    group_column: GroupColumn = None,
    folds: Annotated[
        int, typer.Option(help="Number of folds (a group column with this many values is used as is).")
    ] = 5,
    model: Annotated[str, typer.Option(help="Architecture (see `brainscan models`).")] = ModelConfig.name,
    weights: Annotated[str | None, typer.Option(help="State_dict file or torchvision weights name.")] = None,
    epochs: Annotated[int, typer.Option()] = T.epochs,
    seed: Annotated[int, typer.Option()] = T.seed,
    image_size: Annotated[int, typer.Option()] = D.image_size,
    batch_size: Annotated[int, typer.Option()] = T.batch_size,
    keep_duplicates_apart: Annotated[
        bool,
        typer.Option("--ignore-duplicates", help="Do not keep duplicate sets (exact, pixel, near copies) in one fold."),
    ] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Decoded-image cache (default: inside --out).")] = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Cross-validate: one run per fold, test = that fold; prints the protocol and mean ± std."""
    from .cv import SUMMARY_METRICS, cross_validate

    config = RunConfig(
        data=_data_config(
            data,
            index,
            cache_dir,
            group_column=group_column,
            group_duplicates=not keep_duplicates_apart,
            image_size=image_size,
        ),
        out=str(out),
        model=ModelConfig(name=model, weights=weights),
        train=TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, device=device),
        quiet=quiet,
    )
    summary = cross_validate(config, folds=folds)
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
        Path | None, typer.Option(help="Evaluate on this folder instead of the run's recorded split.")
    ] = None,
    index: Index = None,
    group_column: GroupColumn = None,
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Metrics JSON path (default: beside the checkpoint).")] = None,
    tta: Annotated[bool, typer.Option(help="Average the slice and its left-right mirror.")] = False,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Score a checkpoint; prints the metrics JSON (same schema as the run's metrics.json) and writes it."""
    from .evaluate import default_metrics_path
    from .evaluate import evaluate as run_evaluate

    metrics = run_evaluate(
        checkpoint,
        data=data,
        index=index,
        group_column=group_column,
        split=split,
        out=out,
        tta=tta,
        device=device,
        quiet=quiet,
    )
    _print_metrics(metrics, quiet=quiet)
    print(json.dumps(metrics, indent=2))
    err_console.print(f"Metrics written to {out or default_metrics_path(checkpoint, split)}")


def _image_files(paths: list[Path]) -> list[Path]:
    """The given files, and the supported images inside the given folders (sorted)."""
    from .data.readers import is_supported

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and is_supported(p))
        else:
            files.append(path)
    if not files:
        raise BrainscanError("No image files given.")
    return files


def _cam_paths(cam: Path, files: list[Path]) -> list[Path]:
    """``--cam overlay.png`` for one input; ``overlay-<input stem>.png`` beside it for several."""
    if len(files) == 1:
        return [cam]
    names, paths = set(), []
    for file in files:
        name, n = f"{cam.stem}-{file.stem}.png", 1
        while name in names:  # same file name in two folders
            n += 1
            name = f"{cam.stem}-{file.stem}-{n}.png"
        names.add(name)
        paths.append(cam.with_name(name))
    return paths


@app.command()
@friendly_errors
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files (JPEG/PNG/DICOM/NIfTI) or folders of them.")],
    checkpoint: Checkpoint,
    tta: Annotated[bool, typer.Option(help="Average the slice and its left-right mirror.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per input: path, label, probabilities.")
    ] = False,
    batch_size: Annotated[int, typer.Option()] = 32,
    backend: Annotated[
        str, typer.Option(help="auto (ONNX Runtime when best.onnx sits beside it), torch, onnxruntime.")
    ] = "auto",
    cam: Annotated[
        Path | None,
        typer.Option(
            help="Write the predicted class's activation map over the slice to this PNG (several inputs: "
            "NAME-<input>.png beside it)."
        ),
    ] = None,
    cam_method: Annotated[str, typer.Option(help="CAM method for --cam (see `brainscan explain`).")] = "",
    device: Device = "auto",
) -> None:
    """Classify images with a trained checkpoint. Unreadable files are reported and skipped (exit code 1)."""
    from .data.readers import ImageReadError
    from .predict import Predictor

    files = _image_files(paths)
    if cam:  # pytorch-grad-cam is imported only when maps are asked for
        from .explain import DEFAULT_METHOD, METHODS, explain, save_overlay

        cam_method = cam_method or DEFAULT_METHOD
        if cam_method not in METHODS:
            raise BrainscanError(f"Unknown CAM method {cam_method!r}; choose one of: {', '.join(METHODS)}.")
    # activation maps need the PyTorch graph; its outputs match the exported model's within 1e-4
    predictor = Predictor.from_checkpoint(checkpoint, device=device, backend="torch" if cam else backend)
    cam_files = _cam_paths(cam, files) if cam else [None] * len(files)
    failures = 0
    table = Table("path", "label", "confidence", *predictor.class_names, *(["overlay"] if cam else []))
    for file, cam_file in zip(files, cam_files, strict=True):
        try:
            result = predictor.predict(file, tta=tta)
            if cam_file is not None:
                save_overlay(explain(predictor, file, method=cam_method, target=result.label), cam_file)
        except ImageReadError as exc:
            failures += 1
            err_console.print(f"[bold red]skipped[/] {exc}", highlight=False)
            continue
        record = result.to_dict() | ({"cam": str(cam_file), "cam_method": cam_method} if cam_file else {})
        if as_json:
            print(json.dumps(record), flush=True)
        else:
            table.add_row(
                str(file),
                result.label,
                f"{result.confidence:.3f}",
                *(f"{p:.3f}" for p in result.probabilities.values()),
                *([str(cam_file)] if cam_file else []),
            )
    if not as_json:
        out_console.print(table)
    if failures:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def export(
    checkpoint: Checkpoint,
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Output file (default: beside the checkpoint).")] = None,
) -> None:
    """Export a checkpoint; outputs are checked against PyTorch (max abs difference <= 1e-4) on its test images."""
    from .export import export_model, reference_slices

    path = export_model(checkpoint, fmt=fmt, out=out, check_slices=reference_slices(checkpoint))
    out_console.print(f"Exported {fmt} to {path} (metadata: {path.with_suffix('.json')})")


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Run directory for the demo.")] = Path("runs/demo"),
    quiet: Quiet = False,
) -> None:
    """Train, evaluate and predict on the sample shipped inside the package (no network, no ../shared)."""
    from .demo import run_demo

    result = run_demo(out, quiet=quiet)
    out_console.print(json.dumps(result["prediction"]))
    out_console.print(
        f"Demo test accuracy {result['metrics']['accuracy']:.3f} on {result['metrics']['protocol']['n_evaluated']} "
        f"held-out slices (patient-wise split of a tiny sample: it shows the pipeline, not clinical performance)."
    )
    out_console.print(f"Run directory: {result['run_dir']}")


@app.command("models")
def list_architectures() -> None:
    """List the registered architectures."""
    from .models import get_spec, list_models

    table = Table("name", "pretrained weights (torchvision enum)", "Grad-CAM layers")
    for name in list_models():
        spec = get_spec(name)
        table.add_row(name, spec.weights_enum or "none (from scratch)", ", ".join(spec.cam_layers))
    out_console.print(table)


@app.command()
@friendly_errors
def explain(
    paths: Annotated[list[Path], typer.Argument(help="Image files (JPEG/PNG/DICOM/NIfTI) or folders of them.")],
    checkpoint: Checkpoint,
    out: Annotated[Path, typer.Option(help="Folder for the overlay PNGs (one per input).")] = Path("cams"),
    method: Annotated[
        str, typer.Option(help="fullgrad (default), gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, ...")
    ] = "",
    target: Annotated[str | None, typer.Option(help="Class to explain (default: the predicted class).")] = None,
    device: Device = "auto",
) -> None:
    """Class activation maps (Grad-CAM family) over each input slice, written as PNG overlays."""
    from .data.readers import ImageReadError
    from .explain import DEFAULT_METHOD, METHODS, save_overlay
    from .explain import explain as run_explain
    from .predict import Predictor

    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise BrainscanError(f"Unknown CAM method {method!r}; choose one of: {', '.join(METHODS)}.")
    files = _image_files(paths)
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    table = Table("input", "label", "probability", "explained", "overlay", title=f"{method} maps")
    failures, used = 0, set()
    for file in files:
        try:
            explanation = run_explain(predictor, file, method=method, target=target)
        except ImageReadError as exc:
            failures += 1
            err_console.print(f"[bold red]skipped[/] {exc}", highlight=False)
            continue
        name, n = f"{file.stem}-{method}.png", 1
        while name in used:  # same file name in two folders
            n += 1
            name = f"{file.stem}-{method}-{n}.png"
        used.add(name)
        written = save_overlay(explanation, out / name)
        table.add_row(file.name, explanation.label, f"{explanation.probability:.3f}", explanation.target, written.name)
    out_console.print(table)
    out_console.print(f"Overlays written to {out}")
    if failures:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `brainscan train`.")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default: report.html in the run directory).")] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the confidence intervals.")] = 1000,
    localization_limit: Annotated[
        int, typer.Option(help="Tumour slices scored for localisation, when the index has boxes (0: all).")
    ] = 200,
    device: Device = "auto",
) -> None:
    """Write a self-contained HTML report of a run (and its numbers as JSON beside it)."""
    from .report import write_report

    path = write_report(
        run_dir, out, device=device, n_resamples=resamples, localization_limit=localization_limit or None
    )
    out_console.print(f"Report written to {path} (numbers: {path.with_suffix('.json')})")


@app.command()
@friendly_errors
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")],
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("compare.html"),
    allow_mismatch: Annotated[
        bool, typer.Option("--allow-mismatch", help="Compare runs evaluated under different protocols (warned).")
    ] = False,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the confidence intervals.")] = 1000,
    device: Device = "auto",
) -> None:
    """Compare runs side by side: metrics with confidence intervals, size, compute, speed, training time."""
    from .compare import compare_runs

    path = compare_runs(run_dirs, out, allow_mismatch=allow_mismatch, device=device, n_resamples=resamples)
    out_console.print(f"Comparison written to {path} (numbers: {path.with_suffix('.json')})")


@app.command()
@friendly_errors
def audit(
    data: Annotated[
        Path, typer.Argument(help="Dataset folder (class folders, split folders, an index's base) or an index CSV.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for duplicates.csv and audit.json (created).")],
    against: Annotated[
        list[Path] | None,
        typer.Option(help="Another dataset to search for copies (repeatable); its paths read NAME:path."),
    ] = None,
    index: Index = None,
    fail_on_leak: Annotated[
        bool, typer.Option("--fail-on-leak", help="Exit with code 1 when a duplicate group spans splits or datasets.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Find duplicate slices (exact, re-encoded, flipped/rotated/rescaled) and copies that leak across splits."""
    from .console import deferred_progress
    from .data.audit import audit_duplicates

    with deferred_progress("Auditing images", quiet=quiet) as (start, advance):
        result = audit_duplicates(data, index=index, against=against or (), on_start=start, on_progress=advance)
    counts = result.write(out)
    out_console.print(counts["summary"], highlight=False, soft_wrap=True)
    err_console.print(f"Wrote {out / 'duplicates.csv'} and {out / 'audit.json'}", highlight=False, soft_wrap=True)
    leaking = counts["leaking_groups"]["count"]
    if fail_on_leak and leaking:
        err_console.print(f"[bold red]leak:[/] {leaking} duplicate group(s) straddle splits or datasets.")
        raise typer.Exit(1)


@app.command("split")
@friendly_errors
def split_data(
    data: Annotated[
        Path, typer.Argument(help="Dataset folder (class folders, split folders, an index's base) or an index CSV.")
    ],
    out: Annotated[Path, typer.Option(help="Split CSV to write: path,label,group,split.")],
    index: Index = None,
    group_column: GroupColumn = None,
    dedupe: Annotated[
        bool, typer.Option("--dedupe", help="Keep one file of each duplicate group and leave the others out.")
    ] = False,
    seed: Annotated[int, typer.Option()] = 0,
    val_fraction: Annotated[float, typer.Option()] = D.val_fraction,
    test_fraction: Annotated[float, typer.Option()] = D.test_fraction,
    quiet: Quiet = False,
) -> None:
    """Write a stratified train/val/test split in which no duplicate group (or group-column value) straddles splits."""
    from .console import deferred_progress
    from .data.audit import duplicate_aware_split

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
    if result.unreadable and not quiet:
        path, reason = result.unreadable[0]
        err_console.print(f"[yellow]Skipped {len(result.unreadable)} unusable file(s)[/], e.g. {path}: {reason}")
    counts = ", ".join(f"{split} {n}" for split, n in result.counts().items())
    out_console.print(f"Wrote {out}: {counts} images; {result.duplicate_groups} duplicate groups.", soft_wrap=True)
    out_console.print(f"Split: {result.description}", highlight=False, soft_wrap=True)


def _print_metrics(metrics: dict[str, Any], *, quiet: bool) -> None:
    if quiet:
        return
    table = Table(title=f"{metrics['protocol'].get('split', '')} split — {metrics['protocol'].get('split_method', '')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    deleaked = metrics.get("deleaked")
    if deleaked:
        table.add_column(f"de-leaked (−{deleaked['protocol']['removed']} images)", justify="right")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "sensitivity", "specificity"):
        if key in metrics and metrics[key] is not None:
            extra = [f"{deleaked[key]:.4f}" if deleaked.get(key) is not None else "–"] if deleaked else []
            table.add_row(key, f"{metrics[key]:.4f}", *extra)
    err_console.print(table)


def main() -> None:
    app()
