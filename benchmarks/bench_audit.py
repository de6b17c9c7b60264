"""Duplicate/leakage audit benchmark on the 4-class set, and the measurement behind the near-duplicate thresholds.

    python benchmarks/bench_audit.py [--data DIR] [--against DIR ...] [--out DIR] [--workers N]
    python benchmarks/bench_audit.py --calibrate [--positives N] [--seed S]

Audit mode audits ``../shared/data/brain-tumor-mri-4class`` (7,023 images) with
:func:`brainscan.data.audit.audit_duplicates`, prints the human summary and, as its last line, one JSON object:
``images``, ``seconds``, ``images_per_second``, groups and redundant files per kind, ``leaking_groups``,
``cross_split_groups`` and more.

Calibrate mode measures what the thresholds in :mod:`brainscan.data.audit` rest on, on Figshare slices:
positives are transformed copies of random slices (flips, rotations, rescaling, JPEG, PNG, brightness and
contrast), negatives are all pairs of adjacent slices (N, N+1 in one class and patient-wise ``cv_fold``). It
prints per-transform distance and correlation figures and, as its last line, recall and false-positive rate.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from brainscan.data.audit import audit_duplicates
from brainscan.data.duplicates import KINDS, NEAR_MAX_DISTANCE, NEAR_MIN_CORRELATION, hamming, near_pairs
from brainscan.data.fingerprint import Fingerprint, dihedral, fingerprint_slice
from brainscan.data.readers import read_image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
FOUR_CLASS = SHARED / "brain-tumor-mri-4class"
FIGSHARE = SHARED / "figshare-cheng"


def _encode(gray: np.ndarray, fmt: str, **options: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, fmt, **options)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("L"))


def _resize(gray: np.ndarray, scale: float, resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    h, w = gray.shape
    return np.asarray(Image.fromarray(gray).resize((round(w * scale), round(h * scale)), resample))


def _intensity(gray: np.ndarray, gain: float, around: float = 0.0) -> np.ndarray:
    return np.clip(np.rint((gray.astype(np.float32) - around) * gain + around), 0, 255).astype(np.uint8)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mirror": np.fliplr,
    "rot90": np.rot90,
    "rot180": lambda g: np.rot90(g, 2),
    "rot270": lambda g: np.rot90(g, 3),
    "transpose": np.transpose,
    "resize0.5": lambda g: _resize(g, 0.5),
    "resize0.6": lambda g: _resize(g, 0.6),
    "resize0.75": lambda g: _resize(g, 0.75),
    "jpeg70": lambda g: _encode(g, "JPEG", quality=70),
    "jpeg80": lambda g: _encode(g, "JPEG", quality=80),
    "jpeg95": lambda g: _encode(g, "JPEG", quality=95),
    "png": lambda g: _encode(g, "PNG"),
    "brightness+10%": lambda g: _intensity(g, 1.1),
    "brightness-10%": lambda g: _intensity(g, 0.9),
    "contrast+10%": lambda g: _intensity(g, 1.1, float(g.mean())),
    "contrast-10%": lambda g: _intensity(g, 0.9, float(g.mean())),
    "mirror+resize0.6+dark+jpeg70": lambda g: _encode(_intensity(_resize(np.fliplr(g), 0.6), 0.9), "JPEG", quality=70),
    "rot270+resize0.5+bright+jpeg75": lambda g: _encode(
        _intensity(_resize(np.rot90(g, 3), 0.5, Image.Resampling.LANCZOS), 1.1), "JPEG", quality=75
    ),
}


def _closest(a: Fingerprint, b: Fingerprint) -> tuple[int, float]:
    """The smallest Hamming distance of ``a`` to any variant of ``b``, and the best correlation over all variants."""
    distance = int(hamming(np.full(8, a.hashes[0]), b.hashes).min())
    correlation = max(float((a.thumb * dihedral(b.thumb, t)).mean()) for t in range(8))
    return distance, correlation


def _matched(a: Fingerprint, b: Fingerprint) -> bool:
    return bool(near_pairs([a, b])[0].size)


def calibrate(positives: int, seed: int) -> None:
    if not FIGSHARE.is_dir():
        sys.exit(f"needs {FIGSHARE} (../shared beside the checkout)")
    with (FIGSHARE / "index.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(seed)
    started = time.time()
    per_transform: dict[str, list[tuple[int, float, bool]]] = {name: [] for name in TRANSFORMS}
    for k in rng.choice(len(rows), positives, replace=False):
        gray = read_image(FIGSHARE / rows[k]["path"])
        original = fingerprint_slice(gray)
        for name, transform in TRANSFORMS.items():
            copy = fingerprint_slice(np.ascontiguousarray(transform(gray)))
            per_transform[name].append((*_closest(original, copy), _matched(original, copy)))
    by_key = {(r["label"], int(Path(r["path"]).stem)): r for r in rows}
    adjacent = []
    for r in rows:
        nxt = by_key.get((r["label"], int(Path(r["path"]).stem) + 1))
        if nxt is not None and nxt["cv_fold"] == r["cv_fold"]:
            adjacent.append((r["path"], nxt["path"]))
    cache: dict[str, Fingerprint] = {}

    def get(path: str) -> Fingerprint:
        if path not in cache:
            cache[path] = fingerprint_slice(read_image(FIGSHARE / path))
        return cache[path]

    negatives = [(*_closest(get(a), get(b)), _matched(get(a), get(b)), a, b) for a, b in adjacent]

    print(f"{'transform':32s} {'n':>4s} {'max dist':>8s} {'min corr':>9s} {'p1 corr':>8s} {'recall':>7s}")
    everything = []
    for name, values in per_transform.items():
        d = np.array([v[0] for v in values])
        c = np.array([v[1] for v in values])
        hit = np.array([v[2] for v in values])
        everything += values
        print(f"{name:32s} {len(values):4d} {d.max():8d} {c.min():9.4f} {np.percentile(c, 1):8.4f} {hit.mean():7.2%}")
    pos_d = np.array([v[0] for v in everything])
    pos_c = np.array([v[1] for v in everything])
    pos_hit = np.array([v[2] for v in everything])
    neg_d = np.array([v[0] for v in negatives])
    neg_c = np.array([v[1] for v in negatives])
    neg_hit = np.array([v[2] for v in negatives])
    print(
        f"positives: {pos_hit.sum()}/{pos_hit.size} matched; distance max {pos_d.max()}, "
        f"<= 4 for {(pos_d <= 4).sum()}; correlation min {pos_c.min():.4f}, p1 {np.percentile(pos_c, 1):.4f}"
    )
    print(
        f"negatives (adjacent slices): {neg_hit.sum()}/{neg_hit.size} matched; distance <= {NEAR_MAX_DISTANCE} for "
        f"{(neg_d <= NEAR_MAX_DISTANCE).sum()}; correlation max {neg_c.max():.4f}, p99 {np.percentile(neg_c, 99):.4f}"
    )
    for a, b in (n[3:] for n in sorted(negatives, key=lambda n: -n[1])[:5]):
        print(f"  most similar negative: {a} vs {b}: correlation {_closest(get(a), get(b))[1]:.4f}")
    for threshold in sorted({0.97, 0.98, 0.985, 0.99, 0.995, NEAR_MIN_CORRELATION}):
        recall = ((pos_c >= threshold) & (pos_d <= NEAR_MAX_DISTANCE)).mean()
        fpr = ((neg_c >= threshold) & (neg_d <= NEAR_MAX_DISTANCE)).mean()
        print(f"  correlation >= {threshold}: recall {recall:.2%}, false-positive rate {fpr:.2%}")
    print(
        json.dumps(
            {
                "positives": int(pos_hit.size),
                "negatives": int(neg_hit.size),
                "max_distance": NEAR_MAX_DISTANCE,
                "min_correlation": NEAR_MIN_CORRELATION,
                "recall": round(float(pos_hit.mean()), 4),
                "false_positive_rate": round(float(neg_hit.mean()), 4),
                "positive_min_correlation": round(float(pos_c.min()), 4),
                "negative_max_correlation": round(float(neg_c.max()), 4),
                "seconds": round(time.time() - started, 1),
            }
        )
    )


def audit(data: Path, against: list[Path], out: Path | None, workers: int | None) -> None:
    if not data.is_dir():
        sys.exit(f"needs {data} (../shared beside the checkout)")
    started = time.time()
    result = audit_duplicates(data, against=against, workers=workers)
    seconds = time.time() - started
    counts = result.write(out) if out else result.counts()
    print(result.summary(counts))
    images = len(result.files) + len(result.unreadable)
    figures = {
        "images": images,
        "datasets": [d["name"] for d in counts["datasets"]],
        "seconds": round(seconds, 1),
        "images_per_second": round(images / seconds, 1),
        "unreadable": counts["unreadable"]["count"],
        **{f"{k}_groups": counts["groups"][k] for k in KINDS},
        **{f"{k}_redundant": counts["redundant_files"][k] for k in KINDS},
        "groups": counts["groups"]["total"],
        "redundant_files": counts["redundant_files"]["total"],
        "conflicting_label_groups": counts["conflicting_label_groups"]["count"],
        "leaking_groups": counts["leaking_groups"]["count"],
        "cross_split_groups": counts["cross_split_groups"],
        "cross_dataset_groups": counts["cross_dataset_groups"],
    }
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FOUR_CLASS)
    parser.add_argument("--against", type=Path, action="append", default=[], help="e.g. ../shared/data/figshare-cheng")
    parser.add_argument("--out", type=Path, default=None, help="also write duplicates.csv and audit.json here")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--calibrate", action="store_true", help="measure recall and false positives instead")
    parser.add_argument("--positives", type=int, default=300, help="Figshare slices to copy (calibrate)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.calibrate:
        calibrate(args.positives, args.seed)
    else:
        audit(args.data, args.against, args.out, args.workers)


if __name__ == "__main__":
    main()
