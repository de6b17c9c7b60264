"""Every registered architecture, and a small ``timm:`` model standing for all of them, exports to ONNX with the
PyTorch outputs, gives the same outputs twice, and freezes as the training recipe expects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainscan.backends import OnnxRuntimeBackend, TorchBackend, onnx_bytes
from brainscan.data.transforms import Preprocess
from brainscan.models import (
    create_model,
    freeze_early_layers,
    get_spec,
    head_parameters,
    list_models,
    set_backbone_frozen,
)

ARCHITECTURES = [pytest.param(name, id=name) for name in [*list_models(), "timm:resnet10t"]]


def built(name: str) -> tuple[torch.nn.Module, Preprocess]:
    torch.manual_seed(0)
    spec = get_spec(name)
    model = create_model(name, 3).eval()
    for module in model.modules():  # non-trivial statistics, so a wrong fold or pad shows in the logits
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
    return model, Preprocess(64, spec.mean, spec.std)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_exports_to_onnx_with_the_pytorch_outputs(name: str) -> None:
    model, preprocess = built(name)
    slices = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    reference = TorchBackend(model, preprocess, torch.device("cpu"))(slices)
    exported = OnnxRuntimeBackend(onnx_bytes(model, preprocess))(slices)
    assert np.abs(reference - exported).max() <= 1e-4
    assert np.array_equal(reference, TorchBackend(model, preprocess, torch.device("cpu"))(slices))  # deterministic


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_freezes_its_backbone_and_early_layers(name: str) -> None:
    spec = get_spec(name)
    model, _ = built(name)
    set_backbone_frozen(model, spec, True)
    head = {id(p) for p in head_parameters(model, spec)}
    assert all(p.requires_grad == (id(p) in head) for p in model.parameters())
    set_backbone_frozen(model, spec, False)
    freeze_early_layers(model, spec)
    early = {id(p) for layer in spec.early_layers for p in model.get_submodule(layer).parameters()}
    assert all(p.requires_grad != (id(p) in early) for p in model.parameters())
