"""Build the sample embedded in the package (src/brainscan/sample) from the shared Figshare copy.

    python scripts/build_sample.py [--source ../shared/data/figshare-cheng] [--per-class-fold 12] [--size 160]

Picks the same number of slices of every class from every patient-wise ``cv_fold`` (seeded), downsizes them to
``size`` px JPEG and writes ``index.csv`` with the fold as the group and a fold-based split, so the demo's split
is patient-wise: fold 1 → test, fold 2 → val, folds 3–5 → train.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from pathlib import Path

from PIL import Image

SPLIT_OF_FOLD = {"1": "test", "2": "val", "3": "train", "4": "train", "5": "train"}
LICENSE = """\
# Embedded sample: a subset of the Figshare brain tumour dataset

{n} slices ({per} per class per patient-wise fold), downscaled to {size}×{size} px JPEG (quality 90) by
`scripts/build_sample.py` from `../shared/data/figshare-cheng`.

Source: Jun Cheng, "brain tumor dataset", figshare (2017), https://doi.org/10.6084/m9.figshare.1512427 —
licensed under Creative Commons Attribution 4.0 International (CC BY 4.0,
https://creativecommons.org/licenses/by/4.0/). Changes: slices selected, converted to 8-bit JPEG, resized.

Please cite: J. Cheng et al., "Enhanced performance of brain tumor classification via tumor region
augmentation and partition", PLoS ONE 10(10): e0140381, 2015; and J. Cheng et al., "Retrieval of brain tumors
by adaptive spatial pooling and Fisher vector representation", PLoS ONE 11(6): e0157112, 2016.

`index.csv`: path,label,cv_fold,split and the tumour box (normalised centre x/y, width, height). `cv_fold` is
Cheng's patient-wise fold: fold 1 is the test split, fold 2 validation, folds 3–5 training.

Research and education use only; not for clinical use.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/figshare-cheng"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/brainscan/sample")
    parser.add_argument("--per-class-fold", type=int, default=12)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with (args.source / "index.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(args.seed)
    chosen = []
    for fold in sorted(SPLIT_OF_FOLD):
        for label in sorted({r["label"] for r in rows}):
            pool = [r for r in rows if r["cv_fold"] == fold and r["label"] == label]
            chosen += rng.sample(pool, args.per_class_fold)

    if args.out.exists():
        shutil.rmtree(args.out / "images", ignore_errors=True)
    out_rows = []
    for r in chosen:
        src = args.source / r["path"]
        rel = Path("images") / r["label"] / src.name
        (args.out / rel).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as image:
            image.convert("L").resize((args.size, args.size), Image.Resampling.LANCZOS).save(
                args.out / rel, quality=90, optimize=True
            )
        out_rows.append(
            {
                "path": rel.as_posix(),
                "label": r["label"],
                "cv_fold": r["cv_fold"],
                "split": SPLIT_OF_FOLD[r["cv_fold"]],
                **{k: r[k] for k in ("box_x_center", "box_y_center", "box_width", "box_height")},
            }
        )
    with (args.out / "index.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(out_rows[0]))
        writer.writeheader()
        writer.writerows(out_rows)
    (args.out / "LICENSE.md").write_text(LICENSE.format(n=len(out_rows), per=args.per_class_fold, size=args.size))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(out_rows)} slices to {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
