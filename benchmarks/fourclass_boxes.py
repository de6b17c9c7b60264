"""Tumour boxes for the 4-class set: each 4-class copy of a Figshare slice gets that slice's box, in its own frame.

    python benchmarks/fourclass_boxes.py --out runs/fourclass-boxes/index.csv [--overwrite] [--check-png FILE]

Writes an index CSV over every image of ``../shared/data/brain-tumor-mri-4class`` (``Training/`` → split ``train``,
``Testing/`` → ``test``) with columns ``path,label,split,box_x_center,box_y_center,box_width,box_height,source``:
``path`` relative to the 4-class folder, ``label`` its class folder, the box (YOLO convention, normalised to [0,1])
where the image is a verified copy of a Figshare slice, else empty, and ``source`` ``figshare`` for every copy of a
Figshare slice (boxed or not), else ``other`` (Br35H's ``notumor`` images and the tumour images from elsewhere). Train
on it with ``--data`` the 4-class folder and the CSV as its index (``--balance source`` reads ``source``).

How a box is found:

1. **Which slice.** Figshare and 4-class files are fingerprinted and grouped by brainscan's duplicate matcher
   (:mod:`brainscan.data.duplicates`: exact, pixel and near copies, the latter under any of the 8 flips/rotations);
   a 4-class image whose group holds exactly one Figshare slice is that slice's candidate copy.
2. **Which transform.** The matcher compares thumbnails cut around each head, so it says *that* two images are
   copies, not how their full frames relate. The Figshare slice in each dihedral variant ``t``
   (:func:`brainscan.data.fingerprint.dihedral`) whose shape has the copy's aspect ratio (whole-image rescale
   only: a cropped or padded copy is skipped) is resized, like the copy, to ``SIZE``×``SIZE`` and correlated with
   it (Pearson). The best ``t`` is kept when its correlation is at least ``MIN_CORRELATION`` and no other variant
   whose box would differ comes within ``MIN_MARGIN`` of it (a near-symmetric slice with a tumour off the midline
   would otherwise risk a mirrored box).
3. **The box** is mapped through ``t`` (:func:`map_box`; a self-check on a synthetic rectangle runs first).

Measured over the 4,750 matched pairs: the best variant correlates 0.9997 to 1.0000 with the copy; the best variant
whose box differs from the best's reaches 0.980 at most (a near-symmetric slice, mirrored; median 0.66), so the
margin between them is at least 0.0199 (0.1% quantile 0.035). Hence ``MIN_CORRELATION`` = 0.99 (above every wrong
variant seen, well below every right one; 0.95 would not exclude a wrong variant on its own) and ``MIN_MARGIN`` =
0.005 (over 15 times the largest 1 - best). Only ``t`` 0 (1,686 copies) and 4 (left-right mirror, 3,064) occur, and
every copy has its slice's aspect ratio.

``notumor`` images get no box (another source); an image whose class folder differs from its slice's Figshare
label keeps the box (it marks the same tumour) and is counted. Every compared pair (slice, ``t``, correlation,
margin, outcome) goes to ``<out stem>-pairs.csv`` beside the index. Prints counts per split and class (images, boxed,
skipped and why) and, as its last line, one JSON object with those counts and the minutes taken.
``--check-png FILE`` draws 12 random boxed images (half of them mirrored copies) with their mapped box (red), each
beside its Figshare original with the original box (green), for a human to check.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from brainscan.data.boxes import BOX_COLUMNS, row_box
from brainscan.data.duplicates import fingerprint_files, group_fingerprints
from brainscan.data.fingerprint import dihedral
from brainscan.data.ingest import scan_dataset
from brainscan.data.readers import read_image
from brainscan.files import write_csv

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FOURCLASS, FIGSHARE = DATA / "brain-tumor-mri-4class", DATA / "figshare-cheng"
COLUMNS = ("path", "label", "split", *BOX_COLUMNS, "source")
NOT_FIGSHARE = ("unreadable", "notumor", "no_figshare_copy")  # outcomes of images with no Figshare copy
WORKERS = 2
SIZE = 64  # side of the square both images are resized to before correlating
MIN_CORRELATION = 0.99  # Pearson correlation of the best dihedral variant and the copy (right >= 0.9997, wrong <= 0.98)
MIN_MARGIN = 0.005  # the best variant must beat every variant with a different box by this much (measured >= 0.0199)
MAX_ASPECT_LOG_RATIO = 0.02  # |log(aspect ratio of the variant / of the copy)|: ~2%, a whole-image rescale

Box = tuple[float, float, float, float]  # x_center, y_center, width, height, normalised


def map_box(box: Box, t: int) -> Box:
    """The box of an image, in the frame of ``dihedral(image, t)``.

    ``np.rot90`` by one quarter turn moves pixel (row y, column x) of an ``h``×``w`` image to (``w``-1-x, y), so
    in normalised coordinates (x, y) → (y, 1-x) and width and height swap; the mirror (``t >= 4``, after the
    turns) sends x → 1-x.
    """
    x, y, w, h = box
    for _ in range(t % 4):
        x, y, w, h = y, 1.0 - x, h, w
    if t >= 4:
        x = 1.0 - x
    return x, y, w, h


def self_check() -> None:
    """A bright rectangle on a non-square image stays inside its mapped box under all 8 dihedral variants."""
    img = np.zeros((40, 60), dtype=np.uint8)
    img[5:15, 30:52] = 255  # rows 5-14, columns 30-51
    box = ((30 + 52) / 2 / 60, (5 + 15) / 2 / 40, 22 / 60, 10 / 40)
    for t in range(8):
        turned = dihedral(img, t)
        rows, cols = np.nonzero(turned)
        h, w = turned.shape
        x, y, bw, bh = map_box(box, t)
        inside = (
            abs(rows.min() - (y - bh / 2) * h) < 1e-6
            and abs(rows.max() + 1 - (y + bh / 2) * h) < 1e-6
            and abs(cols.min() - (x - bw / 2) * w) < 1e-6
            and abs(cols.max() + 1 - (x + bw / 2) * w) < 1e-6
        )
        assert inside, f"map_box disagrees with dihedral for t={t}"


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two centre-format boxes."""
    ix = max(0.0, min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2))
    iy = max(0.0, min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def fourclass_files() -> list[tuple[str, str, str]]:
    """(path relative to the 4-class folder, class, split) of every image, in the order brainscan reads the folders,
    so that a run on the index draws the same seeded split as a run on the folders."""
    return [(r.path, r.label, r.split or "") for r in scan_dataset(FOURCLASS).records]


def figshare_rows() -> list[dict[str, str]]:
    with (FIGSHARE / "index.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def small(gray: np.ndarray) -> np.ndarray:
    """``SIZE``×``SIZE`` float32, zero mean and unit variance (all zeros when flat)."""
    a = np.asarray(Image.fromarray(gray).resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)
    a = a - a.mean()
    std = float(a.std())
    return a / std if std > 1e-6 else a


@dataclass(frozen=True)
class Relation:
    """How a copy's frame relates to its Figshare slice's: the best variant, its correlation, and the margin."""

    t: int | None  # None: no variant has the copy's aspect ratio
    correlation: float
    margin: float  # best minus the best other variant whose box differs (IoU < 0.5); inf when none differs


def relate(original: np.ndarray, copy: np.ndarray, box: Box) -> Relation:
    """Find the dihedral variant of ``original`` that ``copy`` is a rescaled copy of (see the module docstring)."""
    h, w = original.shape
    ch, cw = copy.shape
    target, source = small(copy), small(original)
    scores: dict[int, float] = {}
    for t in range(8):
        th, tw = (h, w) if t % 2 == 0 else (w, h)
        if abs(np.log((th / tw) / (ch / cw))) <= MAX_ASPECT_LOG_RATIO:
            scores[t] = float((dihedral(source, t) * target).mean())
    if not scores:
        return Relation(None, float("nan"), float("nan"))
    best = max(scores, key=lambda t: scores[t])
    mapped = map_box(box, best)
    rivals = [s for t, s in scores.items() if t != best and iou(map_box(box, t), mapped) < 0.5]
    return Relation(best, scores[best], scores[best] - max(rivals) if rivals else float("inf"))


def match_pairs(files: list[tuple[str, str, str]], fig: list[dict[str, str]]) -> dict[int, Any]:
    """For each 4-class image (by position): the Figshare row positions in its duplicate group."""
    paths = [FIGSHARE / r["path"] for r in fig] + [FOURCLASS / p for p, _, _ in files]
    prints = fingerprint_files(paths, workers=WORKERS)
    groups = group_fingerprints(prints)
    n_fig = len(fig)
    fig_by_group: dict[int, list[int]] = defaultdict(list)
    for i in range(n_fig):
        if groups.ids[i] >= 0:
            fig_by_group[int(groups.ids[i])].append(i)
    out: dict[int, Any] = {}
    for k in range(len(files)):
        gid = int(groups.ids[n_fig + k])
        if gid < 0:
            out[k] = prints[n_fig + k]  # the reason it could not be read
        elif gid in fig_by_group:
            out[k] = fig_by_group[gid]
    return out


def build() -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Rows of the index, counts, and one record per verified pair (for the check image and the statistics)."""
    files = fourclass_files()
    fig = figshare_rows()
    matches = match_pairs(files, fig)

    def verify(k: int) -> tuple[str, dict[str, Any]]:
        path, label, _ = files[k]
        found = matches.get(k)
        if isinstance(found, str):
            return "unreadable", {}
        if label == "notumor":
            return "notumor_copy_of_figshare" if found else "notumor", {}
        if not found:
            return "no_figshare_copy", {}
        if len(found) > 1:
            return "several_figshare_slices", {}
        row = fig[found[0]]
        box = row_box(row)
        if box is None:
            return "figshare_slice_without_box", {}
        rel = relate(read_image(FIGSHARE / row["path"]), read_image(FOURCLASS / path), box)
        info = {
            "figshare": row["path"],
            "figshare_label": row["label"],
            "t": rel.t,
            "correlation": rel.correlation,
            "margin": rel.margin,
        }
        if rel.t is None:
            return "aspect_mismatch", info
        if rel.correlation < MIN_CORRELATION:
            return "low_correlation", info
        if rel.margin < MIN_MARGIN:
            return "ambiguous_transform", info
        return "boxed", info | {"box": map_box(box, rel.t)}

    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(verify, range(len(files))))

    rows: list[dict[str, Any]] = []
    counts: dict[str, Any] = {}
    pairs: list[dict[str, Any]] = []
    for (path, label, split), (outcome, info) in zip(files, results, strict=True):
        source = "other" if outcome in NOT_FIGSHARE else "figshare"
        row: dict[str, Any] = {"path": path, "label": label, "split": split, "source": source}
        per = counts.setdefault(split, {}).setdefault(label, Counter())
        per["images"] += 1
        per[outcome] += 1
        if outcome == "boxed":
            row |= dict(zip(BOX_COLUMNS, (f"{v:.4f}" for v in info["box"]), strict=True))
            if info["figshare_label"] != label:
                per["boxed_label_differs"] += 1
        if info:
            pairs.append(info | {"path": path, "label": label, "split": split, "outcome": outcome})
        rows.append(row)
    counts = {s: {c: dict(v) for c, v in by_class.items()} for s, by_class in counts.items()}
    return rows, counts, pairs


def correlation_summary(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Quantiles of the best-variant correlation and of the margin over every compared pair."""
    corr = np.array([p["correlation"] for p in pairs if p["t"] is not None])
    finite = [p for p in pairs if p["t"] is not None and np.isfinite(p["margin"])]  # inf: no variant moves the box
    margin = np.array([p["margin"] for p in finite])
    rival = np.array([p["correlation"] - p["margin"] for p in finite])
    if corr.size == 0:
        return {}
    qs = (0, 0.001, 0.01, 0.05, 0.5)
    return {
        "pairs": int(corr.size),
        "correlation_quantiles": {str(q): round(float(np.quantile(corr, q)), 4) for q in qs},
        "below_0.95": int((corr < 0.95).sum()),
        "below_0.9": int((corr < 0.9).sum()),
        "margin_quantiles": {str(q): round(float(np.quantile(margin, q)), 4) for q in qs} if margin.size else {},
        "best_other_box_max": round(float(np.max(rival)), 4) if rival.size else None,
        "mirrored_share": round(float(np.mean([p["t"] >= 4 for p in pairs if p["t"] is not None])), 3),
        "t_counts": dict(sorted(Counter(int(p["t"]) for p in pairs if p["t"] is not None).items())),
    }


def draw_check(pairs: list[dict[str, Any]], png: Path, n: int = 12, seed: int = 0) -> None:
    """``n`` random boxed images (half mirrored when possible), box in red, Figshare original beside in green."""
    boxed = [p for p in pairs if p["outcome"] == "boxed"]
    rng = random.Random(seed)
    mirrored = [p for p in boxed if p["t"] >= 4]
    plain = [p for p in boxed if p["t"] < 4]
    picks = rng.sample(mirrored, min(n // 2, len(mirrored)))
    picks += rng.sample(plain, min(n - len(picks), len(plain)))
    tile = 256
    sheet = Image.new("RGB", (4 * 2 * tile, ((len(picks) + 3) // 4) * (tile + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    fig = {r["path"]: r for r in figshare_rows()}
    for i, p in enumerate(picks):
        ox, oy = (i % 4) * 2 * tile, (i // 4) * (tile + 16)
        original_box = row_box(fig[p["figshare"]])  # a boxed pair's original has its box: build() checked
        assert original_box is not None
        for j, (file, box, colour) in enumerate(
            ((FOURCLASS / p["path"], p["box"], "red"), (FIGSHARE / p["figshare"], original_box, "lime"))
        ):
            img = Image.fromarray(read_image(file)).convert("RGB").resize((tile, tile))
            x, y, w, h = box
            ImageDraw.Draw(img).rectangle(
                ((x - w / 2) * tile, (y - h / 2) * tile, (x + w / 2) * tile, (y + h / 2) * tile),
                outline=colour,
                width=2,
            )
            sheet.paste(img, (ox + j * tile, oy + 16))
        draw.text((ox + 2, oy + 2), f"{p['path']} t={p['t']} r={p['correlation']:.3f} | {p['figshare']}", fill="black")
    png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png)


def write_fourclass_index(out_csv: Path, *, overwrite: bool = False, check_png: Path | None = None) -> dict:
    """Write the boxed 4-class index to ``out_csv`` (atomically; an existing file only with ``overwrite``).

    Returns the counts per split and class, the correlation summary, the thresholds and the minutes taken.
    """
    out_csv = Path(out_csv)
    if out_csv.exists() and not overwrite:
        raise FileExistsError(f"{out_csv} exists (pass overwrite=True / --overwrite to replace it)")
    started = time.time()
    self_check()
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows, counts, pairs = build()
    write_csv(out_csv, COLUMNS, rows)
    pair_columns = ("path", "label", "split", "figshare", "figshare_label", "t", "correlation", "margin", "outcome")
    write_csv(
        out_csv.with_name(f"{out_csv.stem}-pairs.csv"), pair_columns, ({c: p[c] for c in pair_columns} for p in pairs)
    )
    if check_png is not None:
        draw_check(pairs, Path(check_png))
    totals: Counter[str] = Counter()
    for by_class in counts.values():
        for per in by_class.values():
            totals.update(per)
    return {
        "csv": str(out_csv),
        "counts": counts,
        "totals": dict(totals),
        "correlation": correlation_summary(pairs),
        "thresholds": {
            "size": SIZE,
            "min_correlation": MIN_CORRELATION,
            "min_margin": MIN_MARGIN,
            "max_aspect_log_ratio": MAX_ASPECT_LOG_RATIO,
        },
        "minutes": round((time.time() - started) / 60, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fourclass-boxes" / "index.csv")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--check-png", type=Path, metavar="FILE")
    args = parser.parse_args()
    if not (FOURCLASS.is_dir() and (FIGSHARE / "index.csv").is_file()):
        sys.exit(f"needs {FOURCLASS} and {FIGSHARE} (../shared beside the checkout)")
    try:
        result = write_fourclass_index(args.out, overwrite=args.overwrite, check_png=args.check_png)
    except FileExistsError as exc:
        sys.exit(str(exc))
    for split, by_class in result["counts"].items():
        for label, per in by_class.items():
            rest = ", ".join(f"{k} {v}" for k, v in sorted(per.items()) if k != "images")
            print(f"{split:5} {label:10} {per['images']:5} images: {rest}")
    print(f"correlation: {json.dumps(result['correlation'])}")
    print(f"wrote {result['csv']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
