"""Exported models reproduce PyTorch; every backend gives the same predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brainscan import Predictor, train
from brainscan.errors import BrainscanError
from brainscan.export import PARITY_TOLERANCE, export_model, reference_slices

from .test_train import tiny_config

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .conftest import write_class_folders

    root = tmp_path_factory.mktemp("export")
    data = write_class_folders(root / "data", {"yes": 30, "no": 30})
    return train(tiny_config(data, root / "run", epochs=2)).best_checkpoint


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_pytorch_and_keeps_metadata(tiny_run: Path, fmt: str) -> None:
    slices = reference_slices(tiny_run)
    assert slices is not None and len(slices) > 0  # the run's real test images
    path = export_model(tiny_run, fmt=fmt, check_slices=slices)
    meta = json.loads(path.with_suffix(".json").read_text())
    ckpt = torch.load(tiny_run, weights_only=True)
    assert meta["class_names"] == ckpt["class_names"]
    assert meta["preprocess"] == ckpt["preprocess"]
    assert meta["calibration"]["temperature"] == ckpt["calibration"]["temperature"]
    backend = "onnxruntime" if fmt == "onnx" else "torchscript"
    exported = Predictor.from_checkpoint(tiny_run, backend=backend, model_path=path)
    reference = Predictor.from_checkpoint(tiny_run, backend="torch")
    assert np.abs(exported.raw_logits(slices) - reference.raw_logits(slices)).max() <= PARITY_TOLERANCE


def test_backends_agree_on_probabilities_and_auto_prefers_onnx(tiny_run: Path) -> None:
    export_model(tiny_run, fmt="onnx")
    slices = reference_slices(tiny_run)
    torch_p = Predictor.from_checkpoint(tiny_run, backend="torch")
    auto = Predictor.from_checkpoint(tiny_run, backend="auto")
    assert auto.backend.name == "onnxruntime"
    np.testing.assert_allclose(auto.predict_proba(slices, tta=True), torch_p.predict_proba(slices, tta=True), atol=1e-5)
    standalone = Predictor.from_exported(tiny_run.with_suffix(".onnx"))
    assert standalone.class_names == torch_p.class_names and standalone.model is None
    np.testing.assert_allclose(standalone.predict_proba(slices), torch_p.predict_proba(slices), atol=1e-5)


def test_missing_export_and_unknown_format_are_clear_errors(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(BrainscanError, match="no exported model"):
        Predictor.from_checkpoint(tiny_run, backend="onnxruntime", model_path=tmp_path / "absent.onnx")
    with pytest.raises(BrainscanError, match="Unknown export format"):
        export_model(tiny_run, fmt="tflite")


def test_tta_averages_the_slice_and_its_mirror_image_only(tiny_run: Path) -> None:
    predictor = Predictor.from_checkpoint(tiny_run, backend="torch")
    predictor.temperature = 1.0  # TTA returns log(mean probability): with T = 1 its softmax is exactly that mean
    slices = reference_slices(tiny_run)[:4]
    mirrored = np.ascontiguousarray(slices[..., ::-1])
    expected = (predictor.predict_proba(slices) + predictor.predict_proba(mirrored)) / 2
    np.testing.assert_allclose(predictor.predict_proba(slices, tta=True), expected, atol=1e-5)
