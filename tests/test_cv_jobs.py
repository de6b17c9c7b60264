"""Folds as jobs: `cv --fold K` trains one fold (several may run at once into one --out), `cv --collect` merges
them into the cv_metrics.json a plain `cv` writes, and refuses folds of other settings or data, or not done."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from brainscan import DataConfig, ModelConfig, RunConfig, TrainConfig
from brainscan.cli import app
from brainscan.cv import collect_folds, cross_validate, train_fold
from brainscan.errors import BrainscanError

from .conftest import write_class_folders

runner = CliRunner()
TINY = ["--folds", "2", "--model", "cnn", "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--quiet"]


def _config(data: Path, out: Path, **train: Any) -> RunConfig:
    return RunConfig(
        data=DataConfig(root=str(data), image_size=32),
        out=str(out),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(**{"epochs": 1, "batch_size": 16, "seed": 0, **train}),
    )


def _cv(data: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(app, ["cv", "--data", str(data), "--out", str(out), *TINY, *extra])


def _without_timings(summary: dict[str, Any]) -> dict[str, Any]:
    return {**summary, "folds": [{k: v for k, v in f.items() if k != "train_seconds"} for f in summary["folds"]]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("data") / "images", {"yes": 16, "no": 16})


@pytest.fixture(scope="module")
def plain(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """cv_metrics.json of a plain two-fold `cv` of the tiny config."""
    out = tmp_path_factory.mktemp("plain") / "cv"
    cross_validate(_config(data, out), folds=2)
    return json.loads((out / "cv_metrics.json").read_text())


@pytest.fixture(scope="module")
def concurrent_jobs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both folds trained by two `brainscan cv --fold K` processes running at the same time into one --out."""
    out = tmp_path_factory.mktemp("jobs") / "cv"
    command = [sys.executable, "-m", "brainscan", "cv", "--data", str(data), "--out", str(out), *TINY]
    jobs = [subprocess.Popen([*command, "--fold", k], stderr=subprocess.PIPE, text=True) for k in ("1", "2")]
    for job in jobs:
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr
    return out


def test_fold_2_trains_only_fold_2_collect_names_what_is_missing_or_changed_and_overwrite_moves_only_fold_2(
    data: Path, tmp_path: Path
) -> None:
    images, out = shutil.copytree(data, tmp_path / "images"), tmp_path / "cv"
    assert _cv(images, out, "--fold", "2").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [".image-cache", "fold-2"], "nothing another job also writes"
    assert (out / "fold-2" / "metrics.json").is_file()

    missing = _cv(images, out, "--collect")
    assert missing.exit_code == 2 and "folds not done: 1 (missing)" in missing.output
    write_class_folders(tmp_path / "extra", {"yes": 1}, seed=7)
    shutil.copy(tmp_path / "extra" / "yes" / "yes_000.png", images / "yes" / "new.png")  # one more scan since
    changed = _cv(images, out, "--collect")
    assert changed.exit_code == 2 and "holds fold 2 trained on other images" in changed.output
    assert not (out / "cv_metrics.json").exists()

    assert "pass --overwrite to move fold-2 aside" in _cv(images, out, "--fold", "2").output
    assert _cv(images, out, "--fold", "2", "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [".image-cache", "fold-2"]
    (aside,) = tmp_path.glob("cv.replaced-*")
    assert [p.name for p in aside.iterdir()] == ["fold-2"], "only this fold moved aside, nothing deleted"


def test_fold_jobs_running_at_once_into_one_out_collect_into_the_plain_cv_metrics(
    data: Path, plain: dict[str, Any], concurrent_jobs: Path
) -> None:
    collected = _cv(data, concurrent_jobs, "--collect")
    assert collected.exit_code == 0, collected.output
    merged = json.loads((concurrent_jobs / "cv_metrics.json").read_text())
    assert _without_timings(merged) == _without_timings(plain), "per-fold metrics, mean, std and protocol"
    assert "confounding" in merged["protocol"]


def test_collect_with_another_seed_or_epochs_names_the_fold_and_the_setting(data: Path, concurrent_jobs: Path) -> None:
    with pytest.raises(BrainscanError, match=r"fold 1 trained with other settings \(train\.seed 0 → 1\)"):
        collect_folds(_config(data, concurrent_jobs, seed=1), folds=2)
    refused = _cv(data, concurrent_jobs, "--collect", "--epochs", "2")
    assert refused.exit_code == 2 and "fold 1 trained with other settings (train.epochs 1 → 2)" in refused.output


def test_collect_without_any_fold_says_to_train_them_first(data: Path, tmp_path: Path) -> None:
    with pytest.raises(BrainscanError, match="holds no folds"):
        collect_folds(_config(data, tmp_path / "cv"), folds=2)


@pytest.mark.parametrize("fold", ["0", "6"])
def test_a_fold_outside_1_to_k_is_refused_before_any_work(data: Path, tmp_path: Path, fold: str) -> None:
    result = runner.invoke(app, ["cv", "--data", str(data), "--out", str(tmp_path / "cv"), "--fold", fold])
    assert result.exit_code == 2 and f"--fold {fold}: the folds are numbered 1 to 5" in result.output
    assert not (tmp_path / "cv").exists()
    with pytest.raises(BrainscanError, match="numbered 1 to 5"):
        train_fold(_config(data, tmp_path / "cv"), int(fold))


def test_fold_and_collect_together_are_refused(data: Path, tmp_path: Path) -> None:
    result = _cv(data, tmp_path / "cv", "--fold", "1", "--collect")
    assert result.exit_code == 2 and "give one of them" in result.output
    assert not (tmp_path / "cv").exists()


def test_a_fold_job_refuses_an_out_that_holds_more_than_folds(data: Path, tmp_path: Path) -> None:
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "notes.txt").write_text("mine")
    with pytest.raises(BrainscanError, match=r"holds more than cross-validation folds \(notes.txt\)"):
        train_fold(_config(data, tmp_path / "cv"), 1, folds=2)
