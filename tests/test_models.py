"""The registry: every architecture builds with a fresh head, names real layers, and loads weights safely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from brainscan.errors import BrainscanError
from brainscan.models import ModelSpec, SmallCNN, create_model, get_spec, list_models, register_model

from .conftest import shared_weights


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_with_the_requested_classes_and_real_layer_names(name: str) -> None:
    spec = get_spec(name)
    model = create_model(name, 3).eval()
    assert model.get_submodule(spec.classifier).out_features == 3
    for layer in spec.cam_layers:
        model.get_submodule(layer)  # raises if the spec names a missing layer
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_the_catalogue_has_the_promised_architectures() -> None:
    expected = {
        "cnn",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "resnet18",
        "resnet50",
        "efficientnet_b0",
    }
    assert expected <= set(list_models())


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(BrainscanError, match="choose one of: cnn"):
        create_model("vgg99", 2)


def test_registering_a_duplicate_name_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelSpec("cnn", SmallCNN, "classifier.2", ("features.4",)))


def test_mismatched_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    torch.save(create_model("resnet18", 1000).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(BrainscanError, match="does not fit mobilenet_v2"):
        create_model("mobilenet_v2", 2, str(tmp_path / "resnet.pth"))


def test_missing_weights_file_that_is_no_enum_name_is_a_clear_error() -> None:
    with pytest.raises(BrainscanError, match="no such weights file, nor a MobileNet_V2_Weights name"):
        create_model("mobilenet_v2", 2, "nowhere.pth")


def test_shared_mobilenet_weights_load_into_the_backbone() -> None:
    path = shared_weights()
    state = torch.load(path, weights_only=True)
    model = create_model("mobilenet_v2", 2, str(path))
    torch.testing.assert_close(model.features[0][0].weight, state["features.0.0.weight"])
    assert model.classifier[1].out_features == 2


@pytest.mark.parametrize("name", list_models())
def test_early_layers_are_leading_backbone_blocks(name: str) -> None:
    spec = get_spec(name)
    model = create_model(name, 3)
    order = [n for n, _ in model.named_children()] + [n for n, _ in model.named_modules() if n.count(".") == 1]
    for layer in spec.early_layers:
        model.get_submodule(layer)  # raises if the spec names a missing layer
        assert not spec.classifier.startswith(layer) and layer in order
