"""Activation maps exist for every architecture, leave the model untouched, and are scored against boxes that are
mapped correctly through the crop, the padding and the resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brainscan import DataConfig, ModelConfig, RunConfig, TrainConfig, train
from brainscan.cli import app
from brainscan.data.transforms import Preprocess, crop_to_content, prepare_slice, slice_geometry
from brainscan.errors import BrainscanError
from brainscan.explain import (
    METHODS,
    energy_in_box,
    explain,
    localization_scores,
    model_arch,
    overlay,
    pointing_game,
    save_overlay,
)
from brainscan.models import create_model, get_spec, list_models
from brainscan.predict import Predictor


def random_predictor(arch: str, size: int = 64, classes: int = 3) -> Predictor:
    torch.manual_seed(0)
    spec = get_spec(arch)
    return Predictor(
        create_model(arch, classes),
        class_names=[f"c{i}" for i in range(classes)],
        preprocess=Preprocess(size, spec.mean, spec.std),
        arch=arch,
    )


def head_slice(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    image = np.where(head, 90.0, 0.0) + rng.normal(0, 10, (size, size)) * head
    image[size // 3 : size // 3 + 8, size // 2 : size // 2 + 8] = 230
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("arch", [pytest.param(a, id=a) for a in [*list_models(), "timm:resnet10t"]])
def test_every_architecture_gives_a_finite_non_constant_image_sized_map(arch: str) -> None:
    predictor = random_predictor(arch)
    explanation = explain(predictor, head_slice())
    assert explanation.cam.shape == (64, 64) and explanation.cam.dtype == np.float32
    assert np.isfinite(explanation.cam).all()
    assert explanation.cam.min() >= 0 and explanation.cam.max() <= 1
    assert explanation.cam.std() > 1e-3, "a constant map points nowhere"
    assert explanation.image.shape == (64, 64) and explanation.image.dtype == np.uint8
    assert explanation.label in predictor.class_names and explanation.target == explanation.label


@pytest.mark.parametrize("arch", [pytest.param(a, id=a) for a in ("cnn", "mobilenet_v2")])
def test_layer_based_methods_take_their_layers_from_the_registry(arch: str) -> None:
    explanation = explain(random_predictor(arch), head_slice(), method="layercam")
    assert explanation.layers == get_spec(arch).cam_layers
    assert explanation.cam.std() > 1e-3


@pytest.mark.parametrize("method", [pytest.param(m, id=m) for m in METHODS])
def test_every_method_runs_and_explains_the_class_asked_for(method: str) -> None:
    predictor = random_predictor("cnn")
    explanation = explain(predictor, head_slice(), method=method, target="c2")
    assert explanation.target == "c2" and explanation.method == method
    assert explanation.cam.shape == (64, 64) and np.isfinite(explanation.cam).all()
    probs = predictor.predict_proba(explanation.image[None])[0]
    assert explanation.probability == pytest.approx(probs.max(), abs=1e-5)
    assert explanation.target_probability == pytest.approx(probs[2], abs=1e-5)


@pytest.mark.parametrize("method", [pytest.param(m, id=m) for m in ("layercam", "fullgrad")])
def test_explaining_leaves_the_model_as_it_was_and_releases_its_hooks(method: str) -> None:
    predictor = random_predictor("mobilenet_v2")
    model = predictor.model
    model.train()
    model.features[0][0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    explain(
        predictor, head_slice(), method=method, layers=["features.18", "features.6"] if method != "fullgrad" else None
    )
    assert model.training, "the caller's train mode is restored"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters()), "no gradient lands in the parameters"
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules()), "hooks are released"


def test_the_architecture_of_a_predictor_built_by_hand_is_recognised() -> None:
    predictor = random_predictor("resnet18")
    predictor.arch = None
    assert model_arch(predictor) == "resnet18"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"method": "nope"}, "Unknown CAM method", id="unknown-method"),
        pytest.param({"method": "layercam", "layers": ["features.99"]}, "No layer 'features.99'", id="unknown-layer"),
        pytest.param(
            {"method": "fullgrad", "layers": ["features.0"]}, "takes no target layers", id="layers-to-fullgrad"
        ),
        pytest.param({"target": "tumour"}, "Unknown target class", id="unknown-target"),
        pytest.param({"target": 7}, "outside", id="target-index-out-of-range"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(BrainscanError, match=message):
        explain(random_predictor("cnn"), head_slice(), **kwargs)


def test_overlay_is_rgb_over_the_slice_and_saves_as_png(tmp_path: Path) -> None:
    explanation = explain(random_predictor("cnn"), head_slice())
    rgb = overlay(explanation)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    path = save_overlay(explanation, tmp_path / "out" / "cam.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)


def peaked(shape: tuple[int, int], row: int, col: int) -> np.ndarray:
    cam = np.zeros(shape, np.float32)
    cam[row, col] = 1.0
    return cam


@pytest.mark.parametrize(
    ("cam", "box", "tolerance", "expected"),
    [
        pytest.param(peaked((20, 20), 5, 5), (4, 4, 8, 8), 0, True, id="maximum-inside"),
        pytest.param(peaked((20, 20), 5, 12), (4, 4, 8, 8), 0, False, id="maximum-outside"),
        pytest.param(peaked((20, 20), 5, 12), (4, 4, 8, 8), 4.5, True, id="outside-within-tolerance"),
        pytest.param(peaked((20, 20), 5, 12), (4, 4, 8, 8), 4.4, False, id="outside-beyond-tolerance"),
        pytest.param(peaked((20, 20), 12, 12), (4, 4, 8, 8), 6.3, False, id="diagonal-distance-is-euclidean"),
        pytest.param(peaked((20, 20), 12, 12), (4, 4, 8, 8), 6.4, True, id="diagonal-within-tolerance"),
        pytest.param(np.ones((20, 20), np.float32), (0, 0, 20, 20), 0, False, id="constant-map-points-nowhere"),
    ],
)
def test_pointing_game_on_hand_made_maps(cam: np.ndarray, box: tuple, tolerance: float, expected: bool) -> None:
    assert pointing_game(cam, box, tolerance) is expected


@pytest.mark.parametrize(
    ("cam", "box", "expected"),
    [
        pytest.param(np.ones((10, 10)), (0, 0, 5, 10), 0.5, id="uniform-map-half-box"),
        pytest.param(np.ones((10, 10)), (2, 2, 4, 4), 0.04, id="uniform-map-small-box"),
        pytest.param(peaked((10, 10), 3, 3), (2, 2, 4, 4), 1.0, id="all-mass-inside"),
        pytest.param(peaked((10, 10), 8, 8), (2, 2, 4, 4), 0.0, id="all-mass-outside"),
        pytest.param(np.zeros((10, 10)), (2, 2, 4, 4), 0.0, id="empty-map"),
    ],
)
def test_energy_in_box_on_hand_made_maps(cam: np.ndarray, box: tuple, expected: float) -> None:
    assert energy_in_box(cam, box) == pytest.approx(expected)


def bright_square_image(height: int, width: int, square: tuple[int, int, int, int]) -> np.ndarray:
    """A gray 'head' rectangle off-centre on black, with a bright square at rows r0:r1, columns c0:c1."""
    image = np.zeros((height, width), np.uint8)
    image[height // 5 : height - height // 8, width // 6 : width - width // 4] = 70
    r0, r1, c0, c1 = square
    image[r0:r1, c0:c1] = 250
    return image


@pytest.mark.parametrize(
    ("shape", "square", "crop"),
    [
        pytest.param((300, 400), (120, 160, 150, 190), True, id="landscape-cropped"),
        pytest.param((400, 260), (200, 260, 90, 130), True, id="portrait-cropped"),
        pytest.param((300, 400), (120, 160, 150, 190), False, id="landscape-uncropped"),
        pytest.param((256, 256), (60, 100, 70, 110), True, id="square-cropped"),
    ],
)
def test_a_box_maps_onto_its_pixels_through_crop_pad_and_resize(
    shape: tuple[int, int], square: tuple[int, int, int, int], crop: bool
) -> None:
    height, width = shape
    image = bright_square_image(height, width, square)
    r0, r1, c0, c1 = square
    yolo = ((c0 + c1) / 2 / width, (r0 + r1) / 2 / height, (c1 - c0) / width, (r1 - r0) / height)
    size = 96
    prepared = prepare_slice(image, size, crop_background=crop)
    geometry = slice_geometry(image, size, crop)
    x0, y0, x1, y1 = geometry.yolo_box_to_slice(*yolo)
    rows, cols = np.nonzero(prepared > 160)  # the bright square after resizing (its blurred rim is dimmer)
    assert (x0, y0, x1, y1) == pytest.approx((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1), abs=1.0)
    if crop:
        assert geometry.crop != (0, height, 0, width), "the black border was cropped"
        assert (geometry.crop[1] - geometry.crop[0], geometry.crop[3] - geometry.crop[2]) == crop_to_content(
            image
        ).shape


def test_localization_scores_count_only_correctly_classified_tumour_slices(tmp_path: Path) -> None:
    predictor = random_predictor("cnn", size=48, classes=2)
    predictor.class_names = ["no", "yes"]
    rows = []
    for i in range(6):
        image = bright_square_image(120, 120, (40 + i, 60 + i, 50, 70))
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        predicted = predictor.predict(tmp_path / f"{i}.png").label
        box = {"box_x_center": 60 / 120, "box_y_center": (50 + i) / 120, "box_width": 20 / 120, "box_height": 0.17}
        rows.append({"path": f"{i}.png", "label": "yes" if i < 4 else predicted, **box})
    rows.append({"path": "0.png", "label": "no", **box})  # the 'no tumour' class has no tumour to point at
    rows.append({"path": "1.png", "label": "yes", "box_x_center": ""})  # no box
    scores = localization_scores(predictor, rows, root=tmp_path, batch_size=4)
    assert scores["n_candidates"] == 6
    assert scores["n"] + scores["n_misclassified"] == 6
    if scores["n"]:
        for key in ("pointing_game", "pointing_game_tolerant", "energy_in_box"):
            assert 0 <= scores[key] <= 1
        assert scores["pointing_game_tolerant"] >= scores["pointing_game"]
        assert 0 < scores["chance"] < 0.2
    limited = localization_scores(predictor, rows, root=tmp_path, limit=2)
    assert limited["n_candidates"] == 2


def test_explain_command_writes_one_overlay_per_input(yes_no_folder: Path, tmp_path: Path) -> None:
    config = RunConfig(
        data=DataConfig(root=str(yes_no_folder), image_size=32),
        out=str(tmp_path / "run"),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(epochs=1, batch_size=16, seed=0),
    )
    checkpoint = train(config).best_checkpoint
    images = sorted((yes_no_folder / "yes").glob("*.png"))[:2] + sorted((yes_no_folder / "no").glob("*.png"))[:1]
    result = CliRunner().invoke(
        app,
        ["explain", "--checkpoint", str(checkpoint), *map(str, images), "--method", "gradcam++",
         "--out", str(tmp_path / "cams")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "cams").glob("*.png"))
    assert [p.stem for p in written] == sorted(f"{p.stem}-gradcam++" for p in images)
    for image in images:
        assert image.name in result.output
    bad = CliRunner().invoke(app, ["explain", "--checkpoint", str(checkpoint), str(images[0]), "--method", "nope"])
    assert bad.exit_code == 2 and "Unknown CAM method" in bad.output
