"""External benchmark on the shared data: does a model learn the tumour, or the source of its training images?

    python benchmarks/external.py [--parts yesno,fourclass,confound] [--recipe robust] [--set train.low_res=0 ...]
        [--out DIR]

Parts (each trains with brainscan's defaults, MobileNetV2 from the shared ImageNet weights, seed 0, unless
``--recipe NAME`` applies a named recipe and ``--set SECTION.FIELD=VALUE`` overrides a config field after it — how
levers are measured):

* ``yesno``: trained on the 253-image yes/no set (70/15/15, duplicate-aware), and again with ``--final`` (every
  image but val); each asked about the 4-class set's ``Testing/`` minus every image with a copy in its train/val
  images, as tumour vs no tumour: ``yesno_to_fourclass_auc``, ``..._sensitivity``, ``..._specificity``
  (and ``yesno_final_to_fourclass_*``).
* ``fourclass``: trained on the 4-class ``Training/`` (val carved from it; its ``Testing/`` is the test split),
  asked about the yes/no set minus copies of its train/val images: ``fourclass_to_yesno_sensitivity`` (share of
  ``yes`` slices whose most probable class is a tumour class), the same at the stored operating point, and the
  internal ``fourclass_test_accuracy`` raw and de-leaked. ``--fourclass-boxes`` reads the same images and split
  from an index that gives each Figshare copy its tumour box and every image its source, Figshare or other
  (``fourclass_boxes.py``), for ``--set train.box_loss=W`` or ``--set train.balance=source``.
* ``confound``: the audit's label–source confound score on the 4-class set and on Figshare.

Figshare is not external to the 4-class set (its tumour images are Figshare slices), so it is not used as such.
The last line printed is one JSON object with every figure measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from brainscan import DataConfig, ModelConfig, RunConfig, TrainConfig, train
from brainscan.config import RECIPES
from brainscan.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
YESNO, FOURCLASS, FIGSHARE = DATA / "brain-mri-yes-no", DATA / "brain-tumor-mri-4class", DATA / "figshare-cheng"
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2-imagenet-int8-dequantized.pth"


def config(root: Path, out: Path, overrides: dict[str, dict[str, Any]], **data: Any) -> RunConfig:
    base = RunConfig(
        data=DataConfig(root=str(root), **data),
        out=str(out),
        model=ModelConfig(name="mobilenet_v2", weights=str(WEIGHTS)),
        train=TrainConfig(),
    )
    sections = {name: dataclasses.replace(getattr(base, name), **values) for name, values in overrides.items()}
    return dataclasses.replace(base, **sections)


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``train.low_res=0`` → ``{"train": {"low_res": 0}}`` (values parsed as JSON, else kept as strings)."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        section, _, field = key.partition(".")
        if section not in ("data", "model", "train") or not field or not raw:
            sys.exit(f"--set {pair}: expected SECTION.FIELD=VALUE with SECTION data, model or train")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[field] = value
    return out


def trained(cfg: RunConfig) -> tuple[Path, dict[str, Any], float]:
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    started = time.time()
    result = train(cfg)
    return result.best_checkpoint, result.metrics, (time.time() - started) / 60


def yesno_part(out: Path, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, final in (("yesno", False), ("yesno_final", True)):
        ckpt, metrics, minutes = trained(config(YESNO, out / name, overrides, final=final))
        external = evaluate(ckpt, data=FOURCLASS, split="test")
        copies = external["protocol"]["copies_of_training_images"]
        figures |= {
            f"{name}_internal_accuracy": round(metrics["accuracy"], 4),
            f"{name}_to_fourclass_auc": round(external["roc_auc"], 4),
            f"{name}_to_fourclass_sensitivity": round(external["sensitivity"], 4),
            f"{name}_to_fourclass_specificity": round(external["specificity"], 4),
            f"{name}_to_fourclass_n": external["n"],
            f"{name}_to_fourclass_excluded": copies["excluded"],
            f"{name}_train_minutes": round(minutes, 2),
        }
        point = external.get("at_operating_point")
        if point:
            figures[f"{name}_to_fourclass_sensitivity_at_threshold"] = round(point["sensitivity"], 4)
            figures[f"{name}_to_fourclass_specificity_at_threshold"] = round(point["specificity"], 4)
    return figures


def fourclass_part(out: Path, overrides: dict[str, dict[str, Any]], boxes: bool = False) -> dict[str, Any]:
    # the set files 4 slices under both meningioma and pituitary (the audit's conflicting groups): left out
    data: dict[str, Any] = {"drop_conflicts": True}
    if boxes:  # the same images and split, read from an index that gives the Figshare copies their tumour boxes
        from fourclass_boxes import write_fourclass_index

        index = out / "fourclass-boxes" / "index.csv"
        if not index.is_file():
            write_fourclass_index(index)
        data["index"] = str(index)
    ckpt, metrics, minutes = trained(config(FOURCLASS, out / "fourclass", overrides, **data))
    external = evaluate(ckpt, data=YESNO, split="all")
    yes = external["called_tumour"]["yes"]
    figures = {
        "fourclass_test_accuracy": round(metrics["accuracy"], 4),
        "fourclass_test_accuracy_deleaked": round((metrics.get("deleaked") or metrics)["accuracy"], 4),
        "fourclass_to_yesno_sensitivity": round(external["sensitivity"], 4),
        "fourclass_to_yesno_yes_n": yes["n"],
        "fourclass_to_yesno_specificity": round(external["specificity"], 4),
        "fourclass_to_yesno_auc": round(external["roc_auc"], 4),
        "fourclass_to_yesno_excluded": external["protocol"]["copies_of_training_images"]["excluded"],
        "fourclass_train_minutes": round(minutes, 2),
    }
    point = external.get("at_operating_point")
    if point:
        figures["fourclass_to_yesno_sensitivity_at_threshold"] = round(point["sensitivity"], 4)
        figures["fourclass_to_yesno_specificity_at_threshold"] = round(point["specificity"], 4)
    return figures


def confound_part() -> dict[str, Any]:
    from brainscan.data.audit import audit_duplicates

    figures: dict[str, Any] = {}
    for name, root in (("fourclass", FOURCLASS), ("figshare", FIGSHARE)):
        started = time.time()
        block = audit_duplicates(root).counts()["confounding"]
        figures[f"{name}_confound_balanced_accuracy"] = round(block["balanced_accuracy"], 4)
        figures[f"{name}_confound_chance"] = round(block["chance"], 4)
        figures[f"{name}_confound_flagged"] = block["flagged"]
        figures[f"{name}_audit_minutes"] = round((time.time() - started) / 60, 2)
    return figures


PARTS = {"yesno": yesno_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="yesno,fourclass,confound")
    parser.add_argument("--recipe", default="fast", choices=list(RECIPES), help="a named recipe, applied before --set")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "external")
    parser.add_argument(
        "--fourclass-boxes",
        action="store_true",
        help="train the fourclass part from an index with tumour boxes and sources (box_loss, balance=source)",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if not all(p.exists() for p in (YESNO, FOURCLASS, FIGSHARE, WEIGHTS)):
        sys.exit(f"needs {DATA} and {WEIGHTS} (../shared beside the checkout)")
    overrides = {section: dict(values) for section, values in RECIPES[args.recipe].items()}
    for section, values in parse_overrides(args.overrides).items():
        overrides[section] = {**overrides.get(section, {}), **values}
    figures: dict[str, Any] = {"recipe": args.recipe, "overrides": args.overrides}
    started = time.time()
    for part in args.parts.split(","):
        if part == "confound":
            figures |= confound_part()
        elif part == "fourclass":
            figures |= fourclass_part(args.out, overrides, boxes=args.fourclass_boxes)
        elif part in PARTS:
            figures |= PARTS[part](args.out, overrides)
        else:
            sys.exit(f"unknown part {part!r}: choose from yesno, fourclass, confound")
    figures["minutes"] = round((time.time() - started) / 60, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
