"""Source-balanced sampling (``--balance source``): within each class, every source of images (the index's
``source`` column) gets the same share of the training draws."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainscan import DataConfig, ModelConfig, RunConfig, TrainConfig, train
from brainscan.data.sources import UNSPECIFIED, index_sources, source_balanced_weights
from brainscan.predict import Predictor

from .conftest import cued_slice

SIZE = 64
TUMOUR = 40  # the tumour's brightness over the head: faint, so the source's mark is the easier cue


def test_every_class_and_every_source_within_it_gets_an_equal_share_of_the_draws() -> None:
    targets = np.array([0] * 90 + [0] * 10 + [1] * 30)
    sources = ["A"] * 90 + ["B"] * 10 + ["A"] * 30
    weights, cells = source_balanced_weights(targets, sources)
    cell_of = list(zip(targets.tolist(), sources, strict=True))
    share = {cell: sum(w for w, c in zip(weights, cell_of, strict=True) if c == cell) for cell in cells}
    assert share == pytest.approx({(0, "A"): 0.25, (0, "B"): 0.25, (1, "A"): 0.5})
    assert weights[95] == pytest.approx(9 * weights[0])  # a rare source's image is drawn 9 times as often
    assert cells == {(0, "A"): 90, (0, "B"): 10, (1, "A"): 30}


def test_an_empty_source_cell_is_a_source_of_its_own(tmp_path: Path) -> None:
    index = tmp_path / "index.csv"
    index.write_text("path,label,source\na.png,yes,x\n./b.png,yes,\nc.png,no, y \n")
    assert index_sources(index, ["a.png", "b.png", "c.png"]) == ["x", UNSPECIFIED, "y"]


TRAINING = (("yes", "A", 60), ("yes", "B", 6), ("no", "B", 66))  # (label, source, images)


def two_source_dataset(root: Path, parts: tuple[tuple[str, str, int], ...] = TRAINING, seed: int = 0) -> Path:
    """``yes`` slices (a faint round tumour) mostly from source A, whose images carry a white corner mark, and a few
    from source B without it; every ``no`` slice comes from B. The mark predicts the label in all but the few B tumour
    slices, as a source's look does in real collections. ``index.csv`` names each image's source."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, source, n in parts:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, _ = cued_slice(rng, tumour=TUMOUR if label == "yes" else 0.0, mark=6 if source == "A" else 0)
            path = f"{label}/{source}{i:03d}.png"
            Image.fromarray(img).save(root / path)
            rows.append({"path": path, "label": label, "source": source})
    with (root / "index.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_source_balanced_draws_teach_the_tumour_where_the_source_gives_the_label_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = two_source_dataset(tmp_path / "data")
    unseen = two_source_dataset(tmp_path / "unseen", (("yes", "B", 40),), seed=1)  # the mark is no help here
    found = {}
    for balance in ("loss", "source"):
        config = RunConfig(
            DataConfig(root=str(data), image_size=SIZE, confound_check=False),
            out=str(tmp_path / f"run-{balance}"),
            model=ModelConfig(name="cnn"),
            train=TrainConfig(epochs=6, balance=balance),
        )
        with caplog.at_level(logging.INFO, logger="brainscan"):
            result = train(config)
        predictor = Predictor.load(result.best_checkpoint, backend="torch")
        labels = [p.label for p in predictor.predict_many(sorted((unseen / "yes").glob("*.png")))]
        found[balance] = labels.count("yes") / len(labels)
    assert "Draws balanced by class, then by source within each class: no B 4" in caplog.text
    assert found["source"] >= found["loss"] + 0.3, found  # by hand: 0.0 -> 0.775
