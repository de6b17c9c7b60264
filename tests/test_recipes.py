"""Levers for models that hold up on data from elsewhere: per-image intensity standardisation (stored in the
model, applied at prediction), acquisition augmentation (seeded, in range) and named recipes (typed options win)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from brainscan.cli import run_config
from brainscan.config import RECIPES
from brainscan.data.transforms import BatchAugment, Preprocess, percentile, prepare_slice, standardise_intensity
from brainscan.errors import BrainscanError

from .conftest import synthetic_slice


def test_standardisation_removes_a_source_s_level_and_contrast() -> None:
    gray = synthetic_slice("yes", np.random.default_rng(0), 64)
    dim = (gray.astype(np.float32) * 0.5).astype(np.uint8)  # the same anatomy exported darker and flatter
    a, b = standardise_intensity(gray), standardise_intensity(dim)
    assert a.dtype == np.uint8 and a.shape == gray.shape
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0
    assert np.abs(gray.astype(int) - dim.astype(int)).mean() > 10.0
    assert (a[gray == 0] == 0).all(), "the background stays black"
    blank = np.zeros((32, 32), np.uint8)
    assert (standardise_intensity(blank) == 0).all()


def test_standardisation_travels_with_the_model() -> None:
    pre = Preprocess(32, (0.5,) * 3, (0.5,) * 3, standardise=True)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert Preprocess.from_dict({**pre.to_dict(), "standardise": False}).standardise is False
    old = {k: v for k, v in pre.to_dict().items() if k != "standardise"}  # a checkpoint from before the option
    assert Preprocess.from_dict(old).standardise is False
    gray = synthetic_slice("no", np.random.default_rng(1), 64) // 2
    assert np.array_equal(pre.prepare(gray), standardise_intensity(prepare_slice(gray, 32)))
    assert pre.slice_format.key != Preprocess(32, (0.5,) * 3, (0.5,) * 3).slice_format.key, "cached apart"


def test_acquisition_augmentation_is_seeded_and_stays_in_range() -> None:
    x = torch.rand(6, 1, 40, 40)
    augment = BatchAugment(acquisition=True)
    first = augment(x, torch.Generator().manual_seed(3))
    again = augment(x, torch.Generator().manual_seed(3))
    plain = BatchAugment()(x, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert first.shape == x.shape and first.min() >= 0 and first.max() <= 1
    assert not torch.allclose(first, plain), "acquisition changes add to the geometric and photometric ones"


def test_a_recipe_sets_its_fields_and_typed_options_win() -> None:
    robust = run_config({"data": "d", "low_res": 128, "epochs": 5}, given={"data", "epochs"}, recipe="robust")
    assert robust.train.low_res == 0 and not robust.train.freeze_early
    assert robust.data.standardise and robust.train.augment_acquisition and robust.train.epochs == 5
    typed = run_config({"data": "d", "low_res": 96}, given={"data", "low_res"}, recipe="full")
    assert typed.train.low_res == 96
    fast = run_config({"data": "d"}, given={"data"}, recipe="fast")
    assert fast == run_config({"data": "d"}, given={"data"})
    assert set(RECIPES) >= {"fast", "full", "robust"}
    from brainscan import DataConfig, RunConfig

    assert RunConfig(DataConfig(root="d")).with_recipe("robust").data.standardise
    assert RunConfig(DataConfig(root="d")).with_recipe("fast") == RunConfig(DataConfig(root="d"))
    with pytest.raises(BrainscanError, match="Unknown recipe 'quick'"):
        run_config({"data": "d"}, recipe="quick")


@settings(max_examples=300, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40))),
    st.sampled_from([0.0, 1.0, 50.0, 99.0, 99.5, 100.0]),
)
def test_the_histogram_percentile_of_a_slice_is_numpy_s_to_the_bit(gray: np.ndarray, q: float) -> None:
    assert percentile(gray, q) == float(np.percentile(gray, q))  # the background crop must not move by a pixel
