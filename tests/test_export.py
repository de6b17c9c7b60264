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


class _NormalisesFirst(torch.nn.Module):
    """A model whose first convolution does not read the input directly, so it must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.flip(-1)).mean((2, 3))


@pytest.mark.parametrize(
    ("arch", "mean", "std", "folded"),
    [
        ("cnn", (0.5,) * 3, (0.5,) * 3, True),
        ("mobilenet_v2", (0.4,) * 3, (0.2,) * 3, True),
        ("mobilenet_v2", None, None, False),
    ],
)
def test_grey_input_is_folded_into_the_first_convolution_without_changing_outputs(
    arch: str, mean: tuple | None, std: tuple | None, folded: bool
) -> None:
    from brainscan.backends import ExportWrapper, GreyStem
    from brainscan.data.transforms import Preprocess, to_model_input
    from brainscan.models import IMAGENET_MEAN, IMAGENET_STD, create_model

    torch.manual_seed(0)
    model = create_model(arch, 3).eval()
    for module in model.modules():  # non-trivial statistics and logits, so a wrong offset shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight)
    preprocess = Preprocess(37, mean or IMAGENET_MEAN, std or IMAGENET_STD)  # odd size: padding at every border
    rng = torch.get_rng_state()
    wrapper = ExportWrapper(model, preprocess).eval()
    assert torch.equal(torch.get_rng_state(), rng)  # training validates through it: its randomness is untouched
    slices = torch.randint(0, 256, (2, 1, 37, 37), dtype=torch.uint8)
    x, normalised = slices.float(), to_model_input(slices, preprocess)  # what training feeds the model
    assert wrapper.folded is folded  # ImageNet's per-channel normalisation gives three different channels
    with torch.no_grad():
        if folded:
            stem = next(name for name, m in wrapper.model.named_modules() if isinstance(m, GreyStem))
            assert isinstance(model.get_submodule(stem), torch.nn.Conv2d)  # the caller's model is left as it is
            torch.testing.assert_close(wrapper.model.get_submodule(stem)(x), model.get_submodule(stem)(normalised))
        torch.testing.assert_close(wrapper(x), model(normalised), rtol=1e-4, atol=1e-4)

    assert not ExportWrapper(_NormalisesFirst().eval(), Preprocess(37, (0.5,) * 3, (0.5,) * 3)).folded
