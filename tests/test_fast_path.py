"""The fast training path changes cost, not results: cached head inputs equal the live ones, and progressive
resizing ends at the served resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainscan import DataConfig, RunConfig, TrainConfig
from brainscan.data.transforms import Preprocess, to_model_input
from brainscan.head_features import extract_head_inputs, head_epoch_order
from brainscan.models import create_model, get_spec
from brainscan.train import accumulated_step, epoch_image_size


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "cnn"])
def test_cached_head_inputs_reproduce_the_model_output(name: str) -> None:
    torch.manual_seed(0)
    spec = get_spec(name)
    model = create_model(name, 3).eval()
    pre = Preprocess(48, spec.mean, spec.std)
    images = np.random.default_rng(0).integers(0, 255, (5, 48, 48), dtype=np.uint8)
    features = extract_head_inputs(model, spec, images, preprocess=pre, device=torch.device("cpu"), batch_size=2)
    with torch.inference_mode():
        expected = model(to_model_input(torch.from_numpy(images).unsqueeze(1), pre))
        got = model.get_submodule(spec.classifier)(features)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not model.training or name == "cnn"


def test_progressive_resizing_schedule_ends_at_full_resolution() -> None:
    config = RunConfig(
        DataConfig(root=".", image_size=224), train=TrainConfig(epochs=6, low_res=160, full_res_epochs=2)
    )
    assert [epoch_image_size(e, config) for e in range(1, 7)] == [160, 160, 160, 160, 224, 224]
    off = RunConfig(DataConfig(root=".", image_size=224), train=TrainConfig(epochs=6, low_res=0))
    assert {epoch_image_size(e, off) for e in range(1, 7)} == {224}
    small = RunConfig(DataConfig(root=".", image_size=128), train=TrainConfig(epochs=6, low_res=160))
    assert {epoch_image_size(e, small) for e in range(1, 7)} == {128}
    by_default = RunConfig(DataConfig(root=".", image_size=224), train=TrainConfig(epochs=12, low_res=160))
    assert [epoch_image_size(e, by_default) for e in range(1, 13)] == [160] * 9 + [224] * 3  # the last quarter
    short = RunConfig(DataConfig(root=".", image_size=224), train=TrainConfig(epochs=3, low_res=160))
    assert [epoch_image_size(e, short) for e in range(1, 4)] == [160, 160, 224]  # at least one


def test_head_epoch_order_matches_the_loader_step_count() -> None:
    g = torch.Generator().manual_seed(0)
    batches = head_epoch_order(70, batch_size=32, drop_last=True, generator=g, weights=None)
    assert [len(b) for b in batches] == [32, 32]
    assert len(set(torch.cat(batches).tolist())) == 64
    weighted = head_epoch_order(70, batch_size=32, drop_last=False, generator=g, weights=torch.ones(70).double())
    assert [len(b) for b in weighted] == [32, 32, 6]


def test_batch_augmentation_varies_per_image_and_reproduces_with_a_seed() -> None:
    from brainscan.data.transforms import BatchAugment

    x = torch.zeros(8, 1, 32, 32)
    x[:, :, 8:24, 4:12] = 1.0  # the same off-centre block in every image
    augment = BatchAugment()
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(img.flatten().round(decimals=3).tolist()) for img in a}) == 8  # each image its own draw
    assert a.min() >= 0 and a.max() <= 1
    flipped_mass = (a[..., 16:].sum((1, 2, 3)) > a[..., :16].sum((1, 2, 3))).sum()
    assert 0 < flipped_mass < 8  # some, not all, images were mirrored


def test_batch_augmentation_without_change_is_the_identity() -> None:
    from brainscan.data.transforms import BatchAugment

    x = torch.rand(4, 1, 16, 16)
    still = BatchAugment(hflip=0.0, degrees=0.0, translate=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=0.0)
    torch.testing.assert_close(still(x, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("weighted", [False, True])
def test_a_batch_split_into_passes_takes_the_same_optimizer_step(weighted: bool) -> None:
    """Memory-bounded training: gradients accumulated over slices of a batch equal the whole batch's gradient
    (a weighted, label-smoothed loss included), so only BatchNorm, absent here, could tell the two apart."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 3, 8, 8), torch.tensor([0, 1, 1, 1, 1, 1, 1, 2, 2, 0])
    weight = torch.tensor([3.0, 0.5, 1.5]) if weighted else None
    criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    steps = []
    for passes in (1, 3):
        torch.manual_seed(1)
        nn = torch.nn
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss, logits = accumulated_step(model, x, y, criterion=criterion, optimizer=optimizer, passes=passes)
        steps.append((loss, logits, [p.detach().clone() for p in model.parameters()]))
    (loss1, logits1, params1), (loss3, logits3, params3) = steps
    assert torch.allclose(loss1, loss3, atol=1e-6) and torch.allclose(logits1, logits3, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params1, params3, strict=True))


def test_default_cpu_passes_hold_16_slices_at_160_px_and_8_at_224() -> None:
    budget = TrainConfig().cpu_pass_pixels
    assert 16 * 160 * 160 <= budget < 17 * 160 * 160 and 8 * 224 * 224 <= budget < 9 * 224 * 224
