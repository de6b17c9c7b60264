"""The command line, through Typer's CliRunner: what each command accepts, prints, writes and refuses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer.main
from PIL import Image
from typer.testing import CliRunner

from brainscan.about import __version__
from brainscan.cli import app, run_config
from brainscan.config import RunConfig

from .conftest import write_class_folders

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands
TINY = ["--model", "cnn", "--image-size", "32", "--batch-size", "16", "--quiet"]


def options(command: str) -> set[str]:
    return {opt for p in COMMANDS[command].params if not getattr(p, "hidden", False) for opt in p.opts}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("data"), {"yes": 40, "no": 40})


@pytest.fixture(scope="module")
def trained_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = runner.invoke(
        app, ["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--lr", "0.002", *TINY]
    )
    assert result.exit_code == 0, result.output
    assert f"Run directory: {out}" in result.output
    return out


def images(data: Path, label: str, n: int) -> list[str]:
    return [str(p) for p in sorted((data / label).glob("*.png"))[:n]]


# ------------------------------------------------------------------------------------------- the whole app


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"brainscan {__version__}"


def test_every_command_takes_quiet() -> None:
    assert [name for name in COMMANDS if not {"--quiet", "-q"} <= options(name)] == []


@pytest.mark.parametrize("command", ["train", "cv", "evaluate", "audit", "split"])
def test_every_command_reading_a_dataset_takes_it_as_data(command: str) -> None:
    assert "--data" in options(command)


def test_cv_accepts_every_training_option_of_train() -> None:
    # --final trains the deployed model on every image: a fold has a test split by definition
    assert options("train") - {"--resume", "--final"} <= options("cv")


# ---------------------------------------------------------------------------------------- train and cv


def test_train_evaluate_predict_from_the_command_line(trained_run: Path, data: Path) -> None:
    evaluated = runner.invoke(app, ["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--quiet"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    assert metrics == json.loads((trained_run / "evaluate-test.json").read_text())
    stored = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(stored["accuracy"])

    paths = images(data, "yes", 3)
    predicted = runner.invoke(app, ["predict", "--checkpoint", str(trained_run / "best.pt"), *paths, "--json", "--tta"])
    assert predicted.exit_code == 0, predicted.output
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [d["path"] for d in lines] == paths
    for d in lines:
        assert set(d) == {"path", "label", "probabilities", "decision"}  # binary runs carry a tumour decision
        assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_config_file_is_fed_back_with_flags_overriding_it(trained_run: Path, tmp_path: Path) -> None:
    first = RunConfig.load(trained_run / "config.yaml")
    again = tmp_path / "again"
    result = runner.invoke(
        app,
        ["train", "--config", str(trained_run / "config.yaml"), "--out", str(again), "--epochs", "1",
         "--train-early-layers", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    overridden = dataclasses.replace(first.train, epochs=1, freeze_early=False)
    assert RunConfig.load(again / "config.yaml") == dataclasses.replace(first, out=str(again), train=overridden)
    assert first.train.lr == 0.002 and first.model.name == "cnn"  # not the defaults: taken from the file
    assert first.train.freeze_early  # the default, which --train-early-layers turned off


def test_without_a_config_file_the_options_alone_make_the_config(tmp_path: Path) -> None:
    config = run_config({"data": tmp_path, "model": "resnet18", "random_init": True, "no_crop": True, "epochs": 3})
    assert config.data.root == str(tmp_path) and not config.data.crop_background
    assert (config.model.name, config.model.random_init, config.train.epochs) == ("resnet18", True, 3)


@pytest.mark.parametrize("command", ["train", "cv"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(["--epochs", "0"], "--epochs must be at least 1", id="epochs"),
        pytest.param(["--batch-size", "0"], "--batch-size must be at least 1", id="batch-size"),
        pytest.param(["--image-size", "8"], "--image-size 8 is outside 32..1024 px", id="image-size"),
        pytest.param(["--lr", "0"], "--lr must be positive", id="lr"),
        pytest.param(["--patience", "-1"], "--freeze-epochs and --patience must be >= 0", id="patience"),
        pytest.param(["--val-fraction", "0.5", "--test-fraction", "0.45"], "--val-fraction + --test-fraction",
                     id="fractions"),
        pytest.param(["--config", "absent.yaml"], "--config absent.yaml: no such file", id="config-file"),
        pytest.param(["--data", "/nonexistent"], "--data /nonexistent: no such data folder", id="data"),
    ],
)  # fmt: skip
def test_a_bad_option_names_the_flag_and_creates_nothing(
    command: str, flags: list[str], message: str, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, [command, "--data", str(data), "--out", str(out), *TINY, *flags])
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(["--model", "mobilenetv2"], "Unknown model 'mobilenetv2'; did you mean mobilenet_v2?", id="model"),
        pytest.param(["--optimizer", "AdamW"], "Unknown optimizer 'AdamW'; did you mean adamw?", id="optimizer"),
        pytest.param(["--schedule", "cosin"], "Unknown schedule 'cosin'; did you mean cosine?", id="schedule"),
        pytest.param(["--monitor", "val_acc"], "Unknown monitor 'val_acc'; did you mean val_accuracy?", id="monitor"),
        pytest.param(["--balance", "sample"], "Unknown balance mode 'sample'; did you mean sampler?", id="balance"),
        pytest.param(["--model", "vgg"], "Unknown model 'vgg'; choose one of: ", id="nothing-near"),
    ],
)  # fmt: skip
def test_unknown_names_suggest_the_nearest_one(flags: list[str], message: str, data: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, *flags])
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "cv"])
def test_a_pretrained_architecture_without_weights_is_refused_in_one_line(
    command: str, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, [command, "--data", str(data), "--out", str(out), "--model", "mobilenet_v2", "-q"])
    assert result.exit_code == 2
    assert "no --weights were given" in result.stderr and "--random-init" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_random_init_lifts_the_refusal(data: Path, tmp_path: Path) -> None:
    args = ["cv", "--data", str(data), "--out", str(tmp_path / "cv"), "--model", "mobilenet_v2", "--folds", "1"]
    result = runner.invoke(app, [*args, "--random-init", "-q"])
    assert result.exit_code == 2 and "--folds must be at least 2" in result.stderr  # past the weights check


# --------------------------------------------------------------------------------------- predict, explain


def test_predict_writes_the_activation_map_of_the_predicted_class(
    trained_run: Path, data: Path, tmp_path: Path
) -> None:
    checkpoint = str(trained_run / "best.pt")
    image = images(data, "yes", 1)
    overlay = tmp_path / "overlay.png"
    one = runner.invoke(app, ["predict", "--checkpoint", checkpoint, *image, "--cam", str(overlay), "--json"])
    assert one.exit_code == 0, one.output
    record = json.loads(one.stdout)
    assert record["cam"] == str(overlay) and record["cam_method"] == "fullgrad"
    with Image.open(overlay) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)  # the model's input grid


def test_predict_and_explain_name_overlays_alike(trained_run: Path, data: Path, tmp_path: Path) -> None:
    checkpoint = str(trained_run / "best.pt")
    inputs = images(data, "no", 2)
    for command, flag in [("predict", "--cam"), ("explain", "--out")]:
        method = "--cam-method" if command == "predict" else "--method"
        result = runner.invoke(
            app, [command, "--checkpoint", checkpoint, *inputs, flag, str(tmp_path / command), method, "gradcam"]
        )
        assert result.exit_code == 0, result.output
    expected = sorted(f"{Path(p).stem}-gradcam.png" for p in inputs)
    assert sorted(p.name for p in (tmp_path / "predict").iterdir()) == expected
    assert sorted(p.name for p in (tmp_path / "explain").iterdir()) == expected


def test_one_overlay_file_for_several_inputs_is_refused_before_anything_is_written(
    trained_run: Path, data: Path, tmp_path: Path
) -> None:
    overlay = tmp_path / "cams" / "overlay.png"
    result = runner.invoke(
        app, ["predict", "--checkpoint", str(trained_run / "best.pt"), *images(data, "no", 2), "--cam", str(overlay)]
    )
    assert result.exit_code == 2 and "names one overlay file but 2 images were given" in result.stderr
    assert not overlay.parent.exists()


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_unreadable_files_are_listed_with_their_reason_and_the_rest_go_on(
    command: str, trained_run: Path, data: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    good = images(data, "no", 1)[0]
    extra = ["--json"] if command == "predict" else ["--out", str(tmp_path / "cams")]
    result = runner.invoke(app, [command, "--checkpoint", str(trained_run / "best.pt"), str(bad), good, *extra])
    assert result.exit_code == 1
    assert "Skipped 1 of 2 input(s)" in result.stderr and f"{bad}: not an image" in result.stderr
    if command == "predict":  # one JSON line per input, the unreadable one with its reason
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert [r["path"] for r in records] == [str(bad), good]
        assert "not an image" in records[0]["error"] and "label" in records[1]
    else:
        assert [p.name for p in (tmp_path / "cams").iterdir()] == [f"{Path(good).stem}-fullgrad.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["explain", "x.png", "--method", "gradcam+"], "Unknown CAM method 'gradcam+'; did you mean",
                     id="explain-method"),
        pytest.param(["predict", "x.png", "--cam", "o.png", "--cam-method", "layer-cam"],
                     "Unknown CAM method 'layer-cam'; did you mean layercam?", id="predict-cam-method"),
        pytest.param(["predict", "x.png", "--backend", "onnx"], "Unknown backend 'onnx'; did you mean onnxruntime?",
                     id="backend"),
    ],
)  # fmt: skip
def test_unknown_methods_and_backends_suggest_the_nearest_name(args: list[str], message: str) -> None:
    result = runner.invoke(app, [*args, "--checkpoint", "absent.pt"])  # refused before the checkpoint is read
    assert result.exit_code == 2
    assert message in result.stderr


# ------------------------------------------------------------------------------------------ other commands


def test_evaluate_on_another_folder_scores_all_its_images(trained_run: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "external.json"
    other = write_class_folders(tmp_path / "other", {"maybe": 2})
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(other)])
    assert result.exit_code == 2 and "Labels maybe are neither classes of this model" in result.stderr
    result = runner.invoke(
        app,
        ["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(data), "--split", "all",
         "--out", str(out), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["protocol"]["n_evaluated"] == 80


def test_positional_data_still_works_with_a_deprecation_message(tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "data", {"yes": 6, "no": 6})
    old = runner.invoke(app, ["split", str(data), "--out", str(tmp_path / "old.csv"), "-q"])
    assert old.exit_code == 0, old.output
    assert "deprecated" in old.stderr and "use `brainscan split --data DATA`" in old.stderr
    new = runner.invoke(app, ["split", "--data", str(data), "--out", str(tmp_path / "new.csv"), "-q"])
    assert new.exit_code == 0, new.output
    assert "deprecated" not in new.stderr
    assert (tmp_path / "old.csv").read_text() == (tmp_path / "new.csv").read_text()


def test_audit_and_split_without_data_say_what_to_type(tmp_path: Path) -> None:
    for command in ("audit", "split"):
        result = runner.invoke(app, [command, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and "Give the data: --data DIR" in result.stderr


def test_missing_checkpoint_gets_one_clear_line() -> None:
    result = runner.invoke(app, ["evaluate", "--checkpoint", "absent.pt"])
    assert result.exit_code == 2
    assert "no such checkpoint" in result.stderr and "Traceback" not in result.output


def test_models_lists_the_registry() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "mobilenet_v2" in result.stdout and "cnn" in result.stdout


def test_resume_needs_only_the_run_directory_and_a_new_epoch_budget(trained_run: Path) -> None:
    resumed = runner.invoke(app, ["train", "--out", str(trained_run), "--resume", "--epochs", "3", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert len((trained_run / "history.csv").read_text().splitlines()) == 1 + 3
