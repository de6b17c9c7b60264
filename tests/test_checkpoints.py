"""Malformed checkpoints: one clean error naming the file and the problem, from the API and the command line."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brainscan.checkpoint import load_checkpoint, save_checkpoint
from brainscan.cli import app
from brainscan.data.transforms import Preprocess
from brainscan.errors import BrainscanError
from brainscan.models import create_model, get_spec
from brainscan.predict import Predictor

runner = CliRunner()


def make_checkpoint(path: Path, *, seed: int = 0, size: int = 32, **overrides: Any) -> Path:
    """An untrained ``cnn`` checkpoint (two classes) with ``overrides`` replacing its entries."""
    torch.manual_seed(seed)
    spec = get_spec("cnn")
    payload = {
        "arch": "cnn",
        "class_names": ["no", "yes"],
        "preprocess": Preprocess(size, spec.mean, spec.std).to_dict(),
        "calibration": {"temperature": 1.5},
        "model_state": create_model("cnn", 2).state_dict(),
        "epoch": 1,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(payload | overrides, path)


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def _state(change: Callable[[dict[str, torch.Tensor]], None]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = create_model("cnn", 2).state_dict()
    change(state)
    return state


PRE = Preprocess(32, (0.5,) * 3, (0.5,) * 3).to_dict()
MALFORMED = {
    "unknown-arch": ({"arch": "vgg99"}, "unknown architecture 'vgg99'"),
    "arch-not-a-name": ({"arch": 42}, "unknown architecture 42"),
    "missing-tensor": ({"model_state": _state(lambda s: s.pop("classifier.2.bias"))}, "missing classifier.2.bias"),
    "wrong-shape": (
        {"model_state": _state(lambda s: s.update({"features.0.0.weight": torch.zeros(8, 3, 3, 3)}))},
        "features.0.0.weight is [8, 3, 3, 3], expected [16, 3, 3, 3]",
    ),
    "extra-tensor": ({"model_state": _state(lambda s: s.update({"extra.weight": torch.zeros(1)}))}, "unexpected"),
    "class-count": ({"class_names": ["no", "yes", "maybe"]}, "lists 3 classes but the classifier has 2 outputs"),
    "no-image-size": ({"preprocess": _without(PRE, "image_size")}, "preprocess.image_size"),
    "image-size-text": ({"preprocess": PRE | {"image_size": "big"}}, "preprocess.image_size"),
    "preprocess-not-a-mapping": ({"preprocess": "resize"}, "preprocess must be a mapping"),
    "short-mean": ({"preprocess": PRE | {"mean": [0.5]}}, "preprocess.mean"),
    "calibration-none": ({"calibration": None}, "calibration must be a mapping"),
    "temperature-zero": ({"calibration": {"temperature": 0.0}}, "temperature must be a positive finite number"),
    "temperature-negative": ({"calibration": {"temperature": -1.0}}, "temperature must be a positive finite number"),
    "temperature-nan": ({"calibration": {"temperature": math.nan}}, "temperature must be a positive finite number"),
    "temperature-text": ({"calibration": {"temperature": "warm"}}, "temperature must be a positive finite number"),
    "format-version-text": ({"format_version": "abc"}, "format_version 'abc'"),
    "class-names-empty": ({"class_names": []}, "class_names must be a list"),
    "class-names-repeated": ({"class_names": ["yes", "yes"]}, "class_names must be a list"),
    "class-names-string": ({"class_names": "no,yes"}, "class_names must be a list"),
    "class-names-numbers": ({"class_names": [0, 1]}, "class_names must be a list"),
    "model-state-not-tensors": ({"model_state": {"a": "b"}}, "model_state is not a state_dict"),
    "operating-point-unknown-class": (
        {"operating_point": {"negative_class": "none", "threshold": 0.5}},
        "operating_point",
    ),
}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "slice.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(("overrides", "message"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_checkpoint_is_one_error_naming_the_file_and_problem(
    overrides: dict[str, Any], message: str, image: Path, tmp_path: Path
) -> None:
    checkpoint = make_checkpoint(tmp_path / "broken.pt", **overrides)
    with pytest.raises(BrainscanError, match="broken.pt") as caught:
        Predictor.from_checkpoint(checkpoint, device="cpu")
    assert message in str(caught.value)

    result = runner.invoke(app, ["predict", "--checkpoint", str(checkpoint), str(image)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(checkpoint) in lines[0], result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_a_well_formed_checkpoint_loads_and_keeps_its_temperature(image: Path, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "good.pt")
    assert load_checkpoint(checkpoint)["calibration"]["temperature"] == 1.5
    probabilities = Predictor.from_checkpoint(checkpoint, device="cpu").predict(image).probabilities
    assert all(math.isfinite(p) for p in probabilities.values())


def test_a_checkpoint_without_calibration_predicts_uncalibrated(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "last.pt")
    payload = torch.load(checkpoint, weights_only=True)
    del payload["calibration"]  # last.pt has none: it is not malformed
    torch.save(payload, checkpoint)
    assert Predictor.from_checkpoint(checkpoint, device="cpu").temperature == 1.0
