"""The registry: every architecture builds with a fresh head, names real layers, and loads weights safely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from brainscan.errors import BrainscanError
from brainscan.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    SmallCNN,
    create_model,
    get_spec,
    is_known_model,
    list_models,
    register_model,
)

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
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
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


@pytest.mark.parametrize("name", list_models())
def test_every_model_names_a_real_dropout_before_its_classifier_if_any(name: str) -> None:
    spec = get_spec(name)
    model = create_model(name, 3, dropout=0.4)
    if spec.dropout_module is not None:
        assert isinstance(model.get_submodule(spec.dropout_module), torch.nn.Dropout)
        assert model.get_submodule(spec.dropout_module).p == 0.4


def test_a_timm_model_builds_with_the_spec_read_from_it() -> None:
    spec = get_spec("timm:resnet10t")
    assert spec is get_spec("timm:resnet10t")  # built once, then cached
    assert "timm:resnet10t" not in list_models() and is_known_model("timm:resnet10t")
    assert (spec.classifier, spec.cam_layers, spec.early_layers) == (
        "fc",
        ("layer4", "layer3"),
        ("conv1", "bn1", "layer1"),
    )
    assert (spec.mean, spec.std, spec.input_size) == (IMAGENET_MEAN, IMAGENET_STD, 176)
    assert spec.has_pretrained and spec.timm_name == "resnet10t" and spec.dropout_module is None
    model = create_model("timm:resnet10t", 3).eval()
    assert model.get_submodule(spec.classifier).out_features == 3
    for layer in spec.cam_layers + spec.early_layers:
        model.get_submodule(layer)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_a_timm_model_without_stride_4_features_or_one_linear_head_is_handled() -> None:
    vit = get_spec("timm:vit_tiny_patch16_224")
    assert vit.early_layers == () and vit.cam_layers == ("blocks.11",)  # every block at stride 16
    with pytest.raises(BrainscanError, match="is not one Linear layer"):
        get_spec("timm:deit_tiny_distilled_patch16_224")  # two heads


def test_an_unknown_timm_name_is_a_clear_error() -> None:
    assert not is_known_model("timm:resnet10tt")
    with pytest.raises(BrainscanError, match=r"Unknown timm model 'resnet10tt' .*did you mean timm:resnet10t"):
        create_model("timm:resnet10tt", 2)
    with pytest.raises(BrainscanError, match="Unknown timm model ''"):
        get_spec("timm:")
