"""Label–source confound check on the shared datasets: the measurement behind ``CONFOUND_THRESHOLD``.

    python benchmarks/confounding.py [--datasets fourclass,figshare,yesno] [--workers N] [--seed S]

For each dataset, every image is checked with :func:`brainscan.data.confounding.confound_check`, grouped by its
duplicate sets (:func:`brainscan.data.duplicates.duplicate_groups`, as the audit groups them); Figshare also with
Cheng's patient-wise ``cv_fold`` as groups (``figshare_patients``). Prints each dataset's summary and, as its last
line, one JSON object: per dataset the overall balanced accuracy and chance, one-vs-rest and per-pair balanced
accuracies, the flag, the top feature families and the seconds taken (features and classifiers; grouping apart).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from brainscan.data.confounding import CONFOUND_THRESHOLD, confound_check
from brainscan.data.duplicates import duplicate_groups
from brainscan.data.ingest import scan_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = {
    "fourclass": SHARED / "brain-tumor-mri-4class",
    "figshare": SHARED / "figshare-cheng",
    "yesno": SHARED / "brain-mri-yes-no",
}


def measure(name: str, root: Path, workers: int | None, seed: int) -> dict[str, Any]:
    ds = scan_dataset(root)
    paths = [ds.absolute(r) for r in ds.records]
    labels = [r.label for r in ds.records]
    started = time.time()
    groups = duplicate_groups(paths, workers=workers)
    grouping = time.time() - started
    runs = {name: groups.tolist()}
    if name == "figshare":
        with (root / "index.csv").open(newline="") as f:
            folds = {row["path"]: row["cv_fold"] for row in csv.DictReader(f)}
        runs["figshare_patients"] = [folds[r.path] for r in ds.records]
    figures = {}
    for run, run_groups in runs.items():
        started = time.time()
        report = confound_check(paths, labels, run_groups, workers=workers, seed=seed)
        seconds = time.time() - started
        print(f"== {run} ({len(paths)} images, {seconds:.1f} s)\n{report.summary()}", file=sys.stderr)
        figures[run] = {
            "images": report.images,
            "balanced_accuracy": round(report.balanced_accuracy or 0.0, 4),
            "chance": round(report.chance or 0.0, 4),
            "flagged": report.flagged,
            "flagged_classes": list(report.flagged_classes),
            "per_class": {c.label: round(c.balanced_accuracy, 4) for c in report.per_class},
            "per_pair": {p.name: round(p.balanced_accuracy, 4) for p in report.per_pair},
            "top_features": {f.name: round(f.importance, 4) for f in report.top_features},
            "seconds": round(seconds, 1),
            "grouping_seconds": round(grouping, 1),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = args.datasets.split(",")
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        sys.exit(f"unknown dataset(s) {unknown}: choose from {', '.join(DATASETS)}")
    missing = [str(DATASETS[n]) for n in names if not DATASETS[n].is_dir()]
    if missing:
        sys.exit(f"needs {', '.join(missing)} (../shared beside the checkout)")
    started = time.time()
    figures: dict[str, Any] = {"threshold": CONFOUND_THRESHOLD, "seed": args.seed}
    for name in names:
        figures |= measure(name, DATASETS[name], args.workers, args.seed)
    figures["seconds"] = round(time.time() - started, 1)
    print(json.dumps(figures, ensure_ascii=False))


if __name__ == "__main__":
    main()
