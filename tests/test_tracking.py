"""Experiment tracking (--log tensorboard|mlflow): a tiny run mirrored to each tracker holds its config, one point
per epoch equal to history.csv, the final metrics with their protocol and its files; without --log nothing is
imported or written, and tracking never changes a run's identity."""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from brainscan.cli import app
from brainscan.errors import BrainscanError
from brainscan.rundir import read_identity
from brainscan.tracking import TrackingConfig, track_training
from brainscan.train import train

from .conftest import write_class_folders
from .test_train import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")  # SQLAlchemy 2.1 on MLflow's store

runner = CliRunner()
TINY = ["--model", "cnn", "--image-size", "32", "--batch-size", "16", "--lr", "0.003", "--epochs", "2", "--quiet"]
TRACKER_MODULES = ("tensorboard", "mlflow", "torch.utils.tensorboard")
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "sensitivity", "specificity")


@pytest.fixture(scope="module", autouse=True)
def no_mlflow_telemetry() -> object:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("data") / "tumours", {"yes": 40, "no": 40})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def plain_run(data: Path, runs: Path) -> Path:
    return train(tiny_config(data, runs / "plain")).run_dir


@pytest.fixture(scope="module")
def tensorboard_run(data: Path, runs: Path) -> Path:
    """`brainscan train --log tensorboard`, into the default place: <out>/tensorboard."""
    out = runs / "tensorboard"
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), *TINY, "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def mlflow_run(data: Path, runs: Path) -> tuple[Path, object, object]:
    """The library's API, to an SQLite store in a folder of its own: (run dir, client, the MLflow run)."""
    from mlflow.tracking import MlflowClient

    config, store = tiny_config(data, runs / "mlflow"), runs / "store"
    with track_training(config, TrackingConfig("mlflow", uri=str(store), experiment="tiny")) as on_epoch_end:
        train(config, on_epoch_end=on_epoch_end)
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(found) == 1
    return runs / "mlflow", client, found[0]


def history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open() as f:
        return list(csv.DictReader(f))


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------- TensorBoard


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    return accumulator


def test_tensorboard_has_one_point_per_epoch_equal_to_history_and_the_final_test_metrics(tensorboard_run: Path) -> None:
    found = events(tensorboard_run)
    rows = history(tensorboard_run)
    for column in ("train_loss", "train_accuracy", "val_loss", "val_balanced_accuracy", "lr"):
        points = found.Scalars(column)
        assert [p.step for p in points] == [1, 2], column
        assert [p.value for p in points] == pytest.approx([float(r[column]) for r in rows], rel=1e-6, abs=1e-9)
    metrics = metrics_of(tensorboard_run)
    for name in HEADLINE:
        (point,) = found.Scalars(f"test/{name}")
        assert point.value == pytest.approx(metrics[name], rel=1e-6)
    (recall,) = found.Scalars("test/per_class/yes/recall")
    assert recall.value == pytest.approx(metrics["per_class"]["yes"]["recall"], rel=1e-6)


def test_tensorboard_shows_the_config_as_hparams_the_protocol_and_the_plots(tensorboard_run: Path) -> None:
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    found = events(tensorboard_run)
    start = HParamsPluginData.FromString(found.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["train.seed"].number_value == 0 and hparams["model.name"].string_value == "cnn"
    (protocol,) = found.Tensors("protocol/text_summary")
    assert '"split": "test"' in protocol.tensor_proto.string_val[0].decode()
    assert {"plots/curves", "plots/confusion_matrix", "plots/examples"} <= set(found.Tags()["images"])


# ------------------------------------------------------------------------------------------------ MLflow


def test_mlflow_run_holds_the_config_as_params_and_each_epoch_as_metric_history(mlflow_run) -> None:
    run_dir, client, run = mlflow_run
    assert run.info.status == "FINISHED" and run.info.run_name == "mlflow"
    params = run.data.params
    assert params["train.seed"] == "0" and params["model.name"] == "cnn" and params["data.image_size"] == "32"
    assert Path(params["data.root"]).is_absolute() and Path(params["data.root"]).name == "tumours"  # resolved
    rows = history(run_dir)
    for column in ("train_loss", "val_accuracy", "val_macro_f1", "seconds"):
        points = client.get_metric_history(run.info.run_id, column)
        assert sorted((p.step, p.value) for p in points) == [(int(r["epoch"]), float(r[column])) for r in rows]
    assert run.data.tags["brainscan.config_sha256"] == read_identity(run_dir)["config_sha256"]


def test_mlflow_run_holds_the_final_metrics_their_protocol_and_the_run_s_files(mlflow_run) -> None:
    run_dir, client, run = mlflow_run
    metrics = metrics_of(run_dir)
    for name in HEADLINE:
        assert run.data.metrics[f"test/{name}"] == metrics[name]
    assert run.data.metrics["test/calibration/temperature"] == metrics["calibration"]["temperature"]
    assert run.data.tags["protocol.split"] == "test"
    assert json.loads(run.data.tags["protocol.n_images"]) == metrics["protocol"]["n_images"]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.yaml", "history.csv", "curves.png", "confusion_matrix.png"} <= files
    assert not (run_dir / "mlflow").exists(), "with --log-uri the store lies there, not in the run directory"


def test_a_resumed_run_continues_its_mlflow_run(data: Path, runs: Path) -> None:
    from mlflow.tracking import MlflowClient

    first = tiny_config(data, runs / "resumed", epochs=1)
    with track_training(first, TrackingConfig("mlflow")) as on_epoch_end:  # the store: <out>/mlflow
        train(first, on_epoch_end=on_epoch_end)
    more = tiny_config(data, runs / "resumed", epochs=2)
    with track_training(more, TrackingConfig("mlflow"), resume=True) as on_epoch_end:
        train(more, resume=True, on_epoch_end=on_epoch_end)
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'resumed' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tumours").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1" and run.data.tags["brainscan.resumed.train.epochs"] == "2"
    assert [p.step for p in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]


# ---------------------------------------------------------------------------------------- never required


def test_tracking_is_no_part_of_the_run_s_identity(plain_run: Path, tensorboard_run: Path, mlflow_run) -> None:
    digests = {read_identity(run)["config_sha256"] for run in (plain_run, tensorboard_run, mlflow_run[0])}
    assert len(digests) == 1
    config = (plain_run / "config.yaml").read_text().replace(str(plain_run), "OUT")
    assert (tensorboard_run / "config.yaml").read_text().replace(str(tensorboard_run), "OUT") == config


def test_without_log_nothing_is_written_or_imported(plain_run: Path, tensorboard_run: Path) -> None:
    assert {p.name for p in plain_run.iterdir()} == {p.name for p in tensorboard_run.iterdir()} - {"tensorboard"}
    code = (
        "import sys, brainscan.cli\n"
        "from brainscan.config import DataConfig, RunConfig\n"
        "from brainscan.tracking import TrackingConfig, track_training\n"
        "with track_training(RunConfig(DataConfig(root='x')), TrackingConfig()) as on_epoch_end:\n"
        "    assert on_epoch_end is None\n"
        f"print(sorted(set({TRACKER_MODULES}) & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert tracker_imports() == {"tracking.py"}, "only brainscan.tracking imports them, inside its functions"


def tracker_imports() -> set[str]:
    """The modules of the package that import TensorBoard or MLflow (failing on one that does so at import time)."""
    found = set()
    for path in (Path(__file__).resolve().parents[1] / "src" / "brainscan").rglob("*.py"):
        tree = ast.parse(path.read_text())
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == t or n.startswith(t + ".") for n in names for t in TRACKER_MODULES):
                assert id(node) in nested, f"{path.name} imports {names} at import time"
                found.add(path.name)
    return found


def test_an_unknown_tracker_is_a_one_line_error_naming_the_nearest(data: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--log", "mlfow"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: Unknown tracker 'mlfow'; did you mean mlflow? Choices: tensorboard, mlflow."
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("kind", "module"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_tracker_package_names_the_extra_before_any_training(
    kind: str, module: str, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(BrainscanError, match=r"needs the .* package: pip install 'brainscan\[track\]'"):
        with track_training(tiny_config(data, tmp_path / "run"), TrackingConfig(kind)):
            pytest.fail("the body must not run")
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "cli"), *TINY, "--log", kind])
    assert result.exit_code == 2 and "brainscan[track]" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "cli").exists()


def test_log_uri_without_log_is_refused() -> None:
    with pytest.raises(BrainscanError, match="need --log"):
        TrackingConfig(uri="runs/tb")


def test_cross_validation_tracks_each_fold_as_a_run_of_its_own(data: Path, runs: Path) -> None:
    out = runs / "cv-tracked"
    result = CliRunner().invoke(
        app, ["cv", "--data", str(data), "--out", str(out), "--folds", "2", "--epochs", "1", "--model", "cnn",
              "--image-size", "32", "--batch-size", "16", "--log", "tensorboard", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for k in (1, 2):
        fold = out / f"fold-{k}"
        assert [p.step for p in events(fold).Scalars("val_loss")] == [1]
        (point,) = events(fold).Scalars("test/accuracy")
        assert point.value == pytest.approx(metrics_of(fold)["accuracy"], rel=1e-6)
