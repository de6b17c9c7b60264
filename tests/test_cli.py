"""The documented commands, run through Typer's CliRunner: exit codes, outputs, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from brainscan.cli import app
from brainscan.config import RunConfig

from .conftest import write_class_folders

runner = CliRunner()


@pytest.fixture
def trained_run(yes_no_folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", "--data", str(yes_no_folder), "--model", "cnn", "--out", str(out), "--epochs", "2",
         "--image-size", "32", "--batch-size", "16", "--seed", "0", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Run directory: {out}" in result.output
    return out


@pytest.mark.parametrize(("flags", "frozen"), [([], True), (["--train-early-layers"], False)])
def test_train_keeps_pretrained_early_layers_frozen_unless_asked(
    flags: list[str], frozen: bool, yes_no_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", "--data", str(yes_no_folder), "--model", "cnn", "--out", str(out), "--epochs", "1",
         "--image-size", "32", "--quiet", *flags],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert RunConfig.load(out / "config.yaml").train.freeze_early is frozen


def test_train_evaluate_predict_from_the_command_line(trained_run: Path, yes_no_folder: Path) -> None:
    evaluated = runner.invoke(app, ["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--quiet"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    assert metrics == json.loads((trained_run / "evaluate-test.json").read_text())
    stored = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(stored["accuracy"])

    images = [str(p) for p in sorted((yes_no_folder / "yes").glob("*.png"))[:3]]
    predicted = runner.invoke(
        app, ["predict", "--checkpoint", str(trained_run / "best.pt"), *images, "--json", "--tta"]
    )
    assert predicted.exit_code == 0, predicted.output
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [d["path"] for d in lines] == images
    for d in lines:
        assert set(d) == {"path", "label", "probabilities", "decision"}  # binary runs carry a tumour decision
        assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_predict_writes_the_activation_map_of_the_predicted_class(trained_run: Path, yes_no_folder: Path) -> None:
    from PIL import Image

    checkpoint = str(trained_run / "best.pt")
    image = sorted((yes_no_folder / "yes").glob("*.png"))[0]
    overlay = trained_run / "cams" / "overlay.png"
    one = runner.invoke(app, ["predict", "--checkpoint", checkpoint, str(image), "--cam", str(overlay), "--json"])
    assert one.exit_code == 0, one.output
    record = json.loads(one.stdout)
    assert record["cam"] == str(overlay) and record["cam_method"] == "fullgrad"
    with Image.open(overlay) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)  # the model's input grid

    others = sorted((yes_no_folder / "no").glob("*.png"))[:2]
    several = runner.invoke(
        app,
        ["predict", "--checkpoint", checkpoint, *map(str, others), "--cam", str(overlay), "--cam-method", "gradcam"],
    )
    assert several.exit_code == 0, several.output
    assert sorted(p.name for p in overlay.parent.glob("overlay-*.png")) == sorted(
        f"overlay-{p.stem}.png" for p in others
    )
    bad = runner.invoke(
        app, ["predict", "--checkpoint", checkpoint, str(image), "--cam", "x.png", "--cam-method", "no"]
    )
    assert bad.exit_code == 2 and "Unknown CAM method" in bad.output


def test_predict_reports_unreadable_files_and_goes_on(trained_run: Path, yes_no_folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    good = sorted((yes_no_folder / "no").glob("*.png"))[0]
    result = runner.invoke(
        app, ["predict", "--checkpoint", str(trained_run / "best.pt"), str(bad), str(good), "--json"]
    )
    assert result.exit_code == 1
    assert "bad.png" in result.stderr and "not an image" in result.stderr
    assert json.loads(result.stdout.strip())["path"] == str(good)


def test_evaluate_on_another_folder_scores_all_its_images(
    trained_run: Path, yes_no_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "external.json"
    other = write_class_folders(tmp_path / "other", {"maybe": 2})
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(other)])
    assert result.exit_code == 2 and "Labels maybe are not classes of this checkpoint" in result.stderr
    result = runner.invoke(
        app,
        ["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(yes_no_folder), "--split", "all",
         "--out", str(out), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["protocol"]["n_evaluated"] == 80


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["train", "--data", "/nonexistent", "--model", "cnn"], "no such data folder", id="missing-data"),
        pytest.param(["train", "--data", ".", "--model", "vgg"], "Unknown model 'vgg'", id="unknown-model"),
        pytest.param(["evaluate", "--checkpoint", "absent.pt"], "no such checkpoint", id="missing-checkpoint"),
        pytest.param(["train", "--data", ".", "--epochs", "0"], "epochs must be at least 1", id="bad-epochs"),
    ],
)
def test_user_mistakes_get_one_clear_line_and_exit_code_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, [*args, "--quiet"] if args[0] == "train" else args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_models_lists_the_registry() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "mobilenet_v2" in result.stdout and "cnn" in result.stdout
