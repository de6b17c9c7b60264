"""Box attention (``--box-loss``): tumour boxes from the index teach the model where to look, at training only."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brainscan import DataConfig, ModelConfig, RunConfig, TrainConfig, train
from brainscan.box_attention import BoxAttention, box_masks
from brainscan.cli import app
from brainscan.data.transforms import BatchAugment
from brainscan.errors import BrainscanError
from brainscan.explain import box_mask, localization_scores
from brainscan.models import create_model, get_spec
from brainscan.predict import Predictor

from .conftest import cued_slice

SIZE = 64


def boxed_dataset(root: Path, per_class: int = 50, seed: int = 0) -> Path:
    """Heads on black; each ``yes`` slice has a bright round 'tumour' with its box in ``index.csv``, and also a white
    corner mark, a cue that predicts the label as well as the tumour does (as a source's look can)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in ("yes", "no"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img, centre = cued_slice(rng, tumour=120, mark=4) if label == "yes" else cued_slice(rng)
            box = {"box_x_center": "", "box_y_center": "", "box_width": "", "box_height": ""}
            if centre is not None:
                cy, cx = centre
                box = {"box_x_center": cx / SIZE, "box_y_center": cy / SIZE, "box_width": 10 / SIZE,
                       "box_height": 10 / SIZE}  # fmt: skip
            path = f"{label}/{i:03d}.png"
            Image.fromarray(img).save(root / path)
            rows.append({"path": path, "label": label, **box})
    with (root / "index.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_box_masks_mark_the_pixels_whose_centres_lie_in_the_box() -> None:
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.5], [float("nan")] * 4])
    masks = box_masks(boxes, 6)
    assert masks.shape == (2, 1, 6, 6)
    assert np.array_equal(masks[0, 0].numpy().astype(bool), box_mask((6, 6), (1.0, 2.0, 3.0, 4.5)))
    assert masks[1].sum() == 0  # no box: nothing to attend to


def test_augmentation_moves_a_box_mask_with_its_image_and_draws_the_same_numbers() -> None:
    x = torch.zeros(16, 1, SIZE, SIZE)
    x[:, :, 12:30, 30:50] = 1.0
    augment = BatchAugment()
    plain = augment(x.clone(), torch.Generator().manual_seed(3))
    moved, masks = augment.transform(x.clone(), torch.Generator().manual_seed(3), x.clone())
    assert torch.equal(plain, moved)  # masks change nothing about the images or the random stream
    low, high = moved.amin((1, 2, 3), keepdim=True), moved.amax((1, 2, 3), keepdim=True)
    square = moved > (low + high) / 2  # brightness and contrast moved the levels, not the square
    inside = masks > 0.5
    iou = (square & inside).sum((1, 2, 3)).float() / (square | inside).sum((1, 2, 3)).float()
    assert iou.min() > 0.9


def test_the_loss_is_lower_when_the_class_map_lies_in_the_box() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", 2).eval()
    attention = BoxAttention(model, get_spec("cnn"), weight=1.0)
    x = torch.zeros(1, 3, SIZE, SIZE)
    x[:, :, 8:20, 8:20] = 3.0  # a strong pattern top-left: the map of either class peaks there
    at_pattern = box_masks(torch.tensor([[8.0, 8.0, 20.0, 20.0]]), SIZE)
    elsewhere = box_masks(torch.tensor([[44.0, 44.0, 56.0, 56.0]]), SIZE)
    target = torch.tensor([1])
    with attention.watching():
        model(x)
        near = attention.loss(at_pattern, target)
        model(x)
        far = attention.loss(elsewhere, target)
    assert near < far
    assert attention.features is None  # released on leaving


def test_a_model_trained_with_box_loss_looks_at_the_tumour_not_the_cue(tmp_path: Path) -> None:
    data = boxed_dataset(tmp_path / "data")
    rows = list(csv.DictReader((data / "index.csv").open()))
    pointing = {}
    for weight in (0.0, 1.0):
        config = RunConfig(
            DataConfig(root=str(data), image_size=SIZE, confound_check=False),
            out=str(tmp_path / f"run-{weight}"),
            model=ModelConfig(name="cnn"),
            train=TrainConfig(epochs=5, box_loss=weight),
        )
        result = train(config)
        assert result.metrics["accuracy"] >= 0.9
        predictor = Predictor.load(result.best_checkpoint, backend="torch")
        pointing[weight] = localization_scores(predictor, rows, root=data, method="gradcam")["pointing_game"]
        assert RunConfig.load(result.run_dir / "config.yaml").train.box_loss == weight
    assert pointing[1.0] >= pointing[0.0] + 0.2, pointing


def test_box_attention_refuses_a_layer_that_does_not_feed_the_classifier() -> None:
    spec = dataclasses.replace(get_spec("cnn"), cam_layers=("features.3",))
    with pytest.raises(BrainscanError, match="features.3 gives 128 channels"):
        BoxAttention(create_model("cnn", 2), spec, weight=1.0)


def test_box_loss_and_mixing_are_refused_together_in_the_flags_words(yes_no_folder: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(yes_no_folder), "--model", "cnn", "--box-loss", "1", "--mix", "cutmix"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "--box-loss and --mix do not combine" in result.output
    assert not (tmp_path / "run").exists()
