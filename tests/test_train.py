"""Training writes a self-describing run directory, reproduces with a seed, resumes, and never dies on bad files."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from brainscan import DataConfig, ModelConfig, Predictor, RunConfig, TrainConfig, evaluate, train
from brainscan.errors import BrainscanError
from brainscan.train import SliceDataset, slice_cache


def tiny_config(data: Path, out: Path, **train_kwargs) -> RunConfig:
    return RunConfig(
        data=DataConfig(root=str(data), image_size=32),
        out=str(out),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 0, **train_kwargs}),
    )


def test_run_directory_holds_everything_a_reader_needs(yes_no_folder: Path, tmp_path: Path) -> None:
    result = train(tiny_config(yes_no_folder, tmp_path / "run"))
    run = result.run_dir
    for name in (
        "config.yaml",
        "split.csv",
        "history.csv",
        "best.pt",
        "last.pt",
        "metrics.json",
        "curves.png",
        "confusion_matrix.png",
        "examples.png",
    ):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp")), "no temporary checkpoint files left behind"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "roc_auc",
        "per_class",
        "confusion_matrix",
        "class_names",
        "protocol",
        "sensitivity",
        "specificity",
    ):
        assert key in metrics
    assert metrics["protocol"]["split"] == "test"
    assert metrics["positive_class"] == "yes"
    with (run / "history.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    assert RunConfig.load(run / "config.yaml") == tiny_config(yes_no_folder, tmp_path / "run")


def test_checkpoint_loads_with_weights_only_and_carries_what_predict_needs(yes_no_folder: Path, tmp_path: Path) -> None:
    result = train(tiny_config(yes_no_folder, tmp_path / "run"))
    ckpt = torch.load(result.best_checkpoint, weights_only=True)
    assert ckpt["arch"] == "cnn" and ckpt["class_names"] == ["no", "yes"]
    assert ckpt["preprocess"]["image_size"] == 32 and len(ckpt["preprocess"]["mean"]) == 3
    assert ckpt["calibration"]["temperature"] > 0
    assert ckpt["metrics"]["accuracy"] == result.metrics["accuracy"]
    assert set(ckpt["versions"]) >= {"torch", "torchvision", "brainscan"}
    assert RunConfig.from_dict(ckpt["config"]).model.name == "cnn"


def test_same_seed_gives_the_same_metrics(yes_no_folder: Path, tmp_path: Path) -> None:
    a = train(tiny_config(yes_no_folder, tmp_path / "a"))
    b = train(tiny_config(yes_no_folder, tmp_path / "b"))
    assert a.metrics["accuracy"] == b.metrics["accuracy"]
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert (tmp_path / "a" / "split.csv").read_text() == (tmp_path / "b" / "split.csv").read_text()


def test_resume_continues_to_the_same_result_as_an_uninterrupted_run(yes_no_folder: Path, tmp_path: Path) -> None:
    straight = train(tiny_config(yes_no_folder, tmp_path / "straight", epochs=3))

    def crash_after_first_epoch(row: dict) -> None:
        if row["epoch"] == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C or the machine went down

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(yes_no_folder, tmp_path / "resumed", epochs=3), on_epoch_end=crash_after_first_epoch)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = train(tiny_config(yes_no_folder, tmp_path / "resumed", epochs=3), resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in straight.history], rel=1e-4
    )


def test_an_existing_run_is_not_overwritten_even_without_its_last_checkpoint(
    yes_no_folder: Path, tmp_path: Path
) -> None:
    train(tiny_config(yes_no_folder, tmp_path / "run", epochs=1))
    with pytest.raises(BrainscanError, match="already holds a run"):
        train(tiny_config(yes_no_folder, tmp_path / "run", epochs=1))
    (tmp_path / "run" / "last.pt").unlink()
    before = (tmp_path / "run" / "best.pt").read_bytes()
    with pytest.raises(BrainscanError, match=r"already holds a run of these settings \(best.pt, config.yaml"):
        train(tiny_config(yes_no_folder, tmp_path / "run", epochs=1))
    assert (tmp_path / "run" / "best.pt").read_bytes() == before


def test_a_run_that_cannot_start_leaves_no_run_directory(yes_no_folder: Path, tmp_path: Path) -> None:
    missing_weights = replace(
        tiny_config(yes_no_folder, tmp_path / "a"), model=ModelConfig(name="cnn", weights=str(tmp_path / "no.pth"))
    )
    with pytest.raises(BrainscanError, match="no such weights file"):
        train(missing_weights)
    for name in ("yes", "no"):
        for image in (yes_no_folder / name).iterdir():
            image.write_bytes(b"not an image")
    with pytest.raises(BrainscanError, match="could be read"):
        train(tiny_config(yes_no_folder, tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_imagenet_architecture_without_weights_needs_random_init(yes_no_folder: Path, tmp_path: Path) -> None:
    config = replace(tiny_config(yes_no_folder, tmp_path / "run"), model=ModelConfig(name="mobilenet_v3_small"))
    with pytest.raises(BrainscanError, match="no --weights were given.*--random-init"):
        train(config)
    assert not (tmp_path / "run").exists()
    result = train(replace(config, model=ModelConfig(name="mobilenet_v3_small", random_init=True), train=replace(
        config.train, epochs=1)))  # fmt: skip
    assert result.best_checkpoint.is_file()


def test_corrupt_files_are_skipped_and_reported_or_fatal_when_strict(yes_no_folder: Path, tmp_path: Path) -> None:
    (yes_no_folder / "yes" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (yes_no_folder / "no" / "empty.jpg").write_bytes(b"")
    result = train(tiny_config(yes_no_folder, tmp_path / "run", epochs=1))
    assert result.metrics["protocol"]["skipped_files"] == 2
    strict = tiny_config(yes_no_folder, tmp_path / "strict", epochs=1)
    strict = replace(strict, data=replace(strict.data, strict=True))
    with pytest.raises(BrainscanError, match=r"(?s)2 unusable file\(s\).*broken.png"):
        train(strict)
    assert not (tmp_path / "strict" / "last.pt").exists(), "strict mode fails before any training"


@pytest.mark.parametrize(
    "train_kwargs",
    [
        pytest.param({"balance": "sampler", "schedule": "onecycle", "optimizer": "adam"}, id="sampler-onecycle-adam"),
        pytest.param(
            {"balance": "none", "schedule": "plateau", "label_smoothing": 0.1, "monitor": "val_loss"},
            id="plateau-smoothing",
        ),
        pytest.param({"patience": 1, "epochs": 4, "lr": 1e-7}, id="early-stopping"),
        pytest.param({"mix": "mixup", "mix_alpha": 0.4}, id="mixup"),
        pytest.param({"mix": "cutmix", "cpu_pass_pixels": 4 * 32 * 32}, id="cutmix-in-passes"),
    ],
)
def test_training_options_run_end_to_end(yes_no_folder: Path, tmp_path: Path, train_kwargs: dict) -> None:
    result = train(tiny_config(yes_no_folder, tmp_path / "run", **train_kwargs))
    assert 0 <= result.metrics["accuracy"] <= 1
    if "patience" in train_kwargs:
        assert len(result.history) < 4


def test_evaluate_reuses_the_recorded_split_and_agrees_with_predict(yes_no_folder: Path, tmp_path: Path) -> None:
    result = train(tiny_config(yes_no_folder, tmp_path / "run", epochs=3))
    metrics = evaluate(result.best_checkpoint)
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert metrics["protocol"]["n_evaluated"] == result.metrics["protocol"]["n_evaluated"]
    predictor = Predictor.from_checkpoint(result.best_checkpoint)
    with (result.run_dir / "split.csv").open() as f:
        test_rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    predicted = [predictor.predict(yes_no_folder / r["path"]).label for r in test_rows]
    accuracy = np.mean([p == r["label"] for p, r in zip(predicted, test_rows, strict=True)])
    assert accuracy == pytest.approx(metrics["accuracy"])
    assert (result.run_dir / "evaluate-test.json").is_file()


def test_operating_point_is_chosen_on_val_stored_and_used_by_predict(yes_no_folder: Path, tmp_path: Path) -> None:
    result = train(tiny_config(yes_no_folder, tmp_path / "run", epochs=2, target_sensitivity=0.95))
    op = result.metrics["operating_point"]
    assert op["negative_class"] == "no" and op["method"] == "sensitivity >= 0.95 on val"
    assert op["val_sensitivity"] >= 0.95
    ckpt = torch.load(result.best_checkpoint, weights_only=True)
    assert ckpt["operating_point"]["threshold"] == op["threshold"]
    prediction = Predictor.from_checkpoint(result.best_checkpoint).predict(next((yes_no_folder / "yes").glob("*.png")))
    decision = prediction.to_dict()["decision"]
    assert decision["threshold"] == op["threshold"]
    assert decision["tumour"] == (decision["tumour_probability"] >= op["threshold"])
    assert decision["tumour_probability"] == pytest.approx(prediction.probabilities["yes"])


def test_predefined_split_with_a_copy_across_it_reports_raw_and_deleaked(tmp_path: Path) -> None:
    from .conftest import write_class_folders

    write_class_folders(tmp_path / "data" / "Training", {"yes": 20, "no": 20}, seed=1)
    write_class_folders(tmp_path / "data" / "Testing", {"yes": 8, "no": 8}, seed=2)
    leaked = tmp_path / "data" / "Training" / "yes" / "yes_000.png"
    (tmp_path / "data" / "Testing" / "yes" / "copy_of_train.png").write_bytes(leaked.read_bytes())
    result = train(tiny_config(tmp_path / "data", tmp_path / "run", epochs=1))
    assert result.metrics["protocol"]["groups_straddling_splits"] == 1
    assert result.metrics["deleaked"]["protocol"]["removed"] == 1
    assert result.metrics["deleaked"]["protocol"]["n_evaluated"] == result.metrics["protocol"]["n_evaluated"] - 1
    assert evaluate(result.best_checkpoint)["deleaked"]["protocol"]["removed"] == 1


@pytest.mark.parametrize("freeze_early", [True, False], ids=["early-frozen", "all-trained"])
def test_fine_tuning_leaves_the_pretrained_early_blocks_alone_unless_asked(
    yes_no_folder: Path, tmp_path: Path, freeze_early: bool
) -> None:
    from brainscan.models import create_model, get_spec

    weights = tmp_path / "pretrained.pth"  # stands in for ImageNet weights: any state_dict of the architecture
    torch.save(torchvision_state("mobilenet_v3_small"), weights)
    config = replace(
        tiny_config(yes_no_folder, tmp_path / "run", epochs=2, freeze_epochs=1, freeze_early=freeze_early),
        model=ModelConfig(name="mobilenet_v3_small", weights=str(weights)),
    )
    trained = torch.load(train(config).run_dir / "last.pt", weights_only=True)["model_state"]
    before = create_model("mobilenet_v3_small", 2, str(weights)).state_dict()
    early = get_spec("mobilenet_v3_small").early_layers
    learned = [k for k in before if k.endswith(".weight") and k.startswith(tuple(f"{m}." for m in early))]
    later = [k for k in before if k.endswith(".weight") and k.startswith("features.5.")]
    assert learned and later
    assert all(torch.equal(trained[k], before[k]) for k in learned) == freeze_early
    assert not any(torch.equal(trained[k], before[k]) for k in later)


def torchvision_state(name: str) -> dict[str, torch.Tensor]:
    from brainscan.models import get_spec

    torch.manual_seed(0)
    return get_spec(name).builder().state_dict()


def test_best_checkpoint_comes_from_an_epoch_at_the_served_resolution(yes_no_folder: Path, tmp_path: Path) -> None:
    config = tiny_config(yes_no_folder, tmp_path / "run", epochs=3, low_res=32, full_res_epochs=1)
    config = replace(config, data=replace(config.data, image_size=48))
    result = train(config)
    assert [row["stage"] for row in result.history] == ["full@32px", "full@32px", "full@48px"]
    assert result.metrics["best_epoch"] == 3, "low-resolution epochs are progress figures, not candidates"


def test_a_validation_tie_keeps_the_later_epoch(yes_no_folder: Path, tmp_path: Path) -> None:
    result = train(tiny_config(yes_no_folder, tmp_path / "run", epochs=3, lr=1e-12))  # nothing changes: all tie
    assert len({row["val_balanced_accuracy"] for row in result.history}) == 1
    assert result.metrics["best_epoch"] == 3


def test_the_slice_cache_stays_in_host_memory_on_a_cpu_without_a_copy() -> None:
    images = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    cache = slice_cache(images, torch.device("cpu"))
    assert cache.data_ptr() == images.ctypes.data  # shared with the decoded array, not a second copy
    dataset = SliceDataset(cache, np.array([0, 1, 0, 1]), np.array([1, 3]))
    image, target = dataset[1]
    assert image.shape == (1, 8, 8) and torch.equal(image[0], torch.from_numpy(images[3])) and target == 1


@pytest.mark.parametrize(
    ("option", "no_index", "no_columns"),
    [
        ({"box_loss": 1.0}, "--box-loss needs tumour boxes: it needs an index CSV",
         "plain.csv has no columns box_x_center"),
        ({"balance": "source"}, "--balance source needs each image's source: it needs an index CSV",
         "plain.csv has no column source"),
    ],
)  # fmt: skip
def test_options_that_read_index_columns_refuse_data_without_them_before_any_work(
    tmp_path: Path, yes_no_folder: Path, option: dict, no_index: str, no_columns: str
) -> None:
    config = RunConfig(
        DataConfig(root=str(yes_no_folder), image_size=64),
        out=str(tmp_path / "run"),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(epochs=1, **option),
    )
    with pytest.raises(BrainscanError, match=no_index):
        train(config)
    index = tmp_path / "plain.csv"
    index.write_text("path,label\n" + "".join(f"{p.relative_to(yes_no_folder)},{p.parent.name}\n"
                                                for p in sorted(yes_no_folder.rglob("*.png"))))  # fmt: skip
    without = replace(config, data=replace(config.data, index=str(index)))
    with pytest.raises(BrainscanError, match=no_columns):
        train(without)
    assert not (tmp_path / "run").exists()
