"""mixup and cutmix (``--mix``): pairs of training images mixed, and their labels' losses weighed by the share."""

from __future__ import annotations

import torch
from torch import nn

from brainscan.data.transforms import BatchMix
from brainscan.train import accumulated_step


def batch(n: int = 8, size: int = 16) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()


def test_mixup_blends_each_image_with_its_partner_by_the_drawn_share() -> None:
    x = batch()
    mixed, partner, lam = BatchMix("mixup", 0.4)(x, torch.Generator().manual_seed(0))
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner])
    again = BatchMix("mixup", 0.4)(x, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], mixed) and again[2] == lam  # the run's generator decides: a seeded run repeats


def test_cutmix_pastes_one_patch_whose_area_is_the_partners_share() -> None:
    x = batch()
    mixed, partner, lam = BatchMix("cutmix", 1.0)(x, torch.Generator().manual_seed(1))
    for i in range(len(x)):
        if partner[i] == i:
            continue
        from_partner = (mixed[i, 0] == x[partner[i], 0]).float().mean()
        assert abs(float(from_partner) - (1 - lam)) < 1e-6
        assert ((mixed[i, 0] == x[i, 0]) | (mixed[i, 0] == x[partner[i], 0])).all()


def test_a_mixed_step_weighs_both_labels_and_is_the_same_in_passes() -> None:
    torch.manual_seed(0)
    x, targets = torch.randn(12, 3, 4, 4), torch.tensor([0, 1, 2] * 4)
    partners = targets.roll(1)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))
    grads = []
    for passes in (1, 4):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))  # no BatchNorm: slices see the same function
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loss, _ = accumulated_step(model, x, targets, criterion=criterion, optimizer=optimizer, passes=passes,
                                   mixed=(partners, 0.3))  # fmt: skip
        grads.append(model[1].weight.grad.clone())
        logits = model(x)
        expected = 0.3 * criterion(logits, targets) + 0.7 * criterion(logits, partners)
        assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
