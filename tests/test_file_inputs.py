"""Many files at once, as a notebook would run them: discovery, results in input order with unreadable files
skipped and reported, and one overlay naming scheme."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from brainscan.cli import app
from brainscan.data.transforms import Preprocess
from brainscan.errors import BrainscanError, display_path
from brainscan.explain import SavedOverlay, check_method, explain_files, overlay_paths
from brainscan.models import create_model, get_spec
from brainscan.predict import Prediction, Predictor, Skipped, discover_images, predict_files

from .conftest import write_class_folders
from .test_checkpoints import make_checkpoint


@pytest.fixture
def predictor() -> Predictor:
    torch.manual_seed(0)
    spec = get_spec("cnn")
    return Predictor(create_model("cnn", 2), class_names=["no", "yes"], preprocess=Preprocess(32, spec.mean, spec.std))


def test_discovery_keeps_given_files_and_finds_supported_images_in_folders(tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "data", {"yes": 2, "no": 1})
    (data / "notes.txt").write_text("not an image")
    missing = tmp_path / "missing.png"
    found = discover_images([missing, data])
    assert found == [missing, data / "no" / "no_000.png", data / "yes" / "yes_000.png", data / "yes" / "yes_001.png"]
    assert discover_images([data / "yes"], recursive=False) == [
        data / "yes" / "yes_000.png",
        data / "yes" / "yes_001.png",
    ]
    with pytest.raises(BrainscanError, match="No image files"):
        discover_images([data], recursive=False)  # its images are all in its class folders


def test_predictions_come_in_input_order_with_unreadable_files_in_their_place(
    predictor: Predictor, tmp_path: Path
) -> None:
    data = write_class_folders(tmp_path / "data", {"yes": 3})
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    files = [data / "yes" / "yes_000.png", bad, data / "yes" / "yes_001.png", data / "yes" / "yes_002.png"]
    results = list(predict_files(predictor, files, batch_size=2))
    assert [r.path for r in results] == list(map(str, files))
    assert [type(r) for r in results] == [Prediction, Skipped, Prediction, Prediction]
    assert "not an image" in results[1].reason
    for path, result in zip(files, results, strict=True):
        if isinstance(result, Prediction):  # the same numbers as one file at a time
            assert result.probabilities == pytest.approx(predictor.predict(path).probabilities, abs=1e-5)


def test_overlays_are_named_after_their_input_and_method(tmp_path: Path) -> None:
    inputs = [Path("a/scan.png"), Path("b/scan.png"), Path("b/other.jpg")]
    assert overlay_paths(inputs, tmp_path, method="gradcam") == [
        tmp_path / "scan-gradcam.png", tmp_path / "scan-gradcam-2.png", tmp_path / "other-gradcam.png"
    ]  # fmt: skip
    assert overlay_paths(inputs[:1], tmp_path / "mine.png", method="gradcam") == [tmp_path / "mine.png"]
    with pytest.raises(BrainscanError, match="names one overlay file but 3 images"):
        overlay_paths(inputs, tmp_path / "mine.png", method="gradcam")


def test_explaining_many_files_writes_each_overlay_and_skips_unreadable_ones(
    predictor: Predictor, tmp_path: Path
) -> None:
    data = write_class_folders(tmp_path / "data", {"yes": 1})
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    done = list(explain_files(predictor, [bad, data / "yes" / "yes_000.png"], tmp_path / "cams"))
    assert isinstance(done[0], Skipped) and isinstance(done[1], SavedOverlay)
    assert done[1].path == tmp_path / "cams" / "yes_000-fullgrad.png" and done[1].path.is_file()
    assert done[1].explanation.method == "fullgrad"


def test_cam_methods_are_checked_in_one_place() -> None:
    assert check_method(None) == "fullgrad" and check_method("gradcam++") == "gradcam++"
    with pytest.raises(BrainscanError, match=re.escape("Unknown CAM method 'gradcam+'; did you mean gradcam++?")):
        check_method("gradcam+")


# --------------------------------------------------------------------------- odd file names on the command line


def _odd_names(folder: Path) -> tuple[Path, Path, Path]:
    """An image whose name holds Rich markup, one whose name is not UTF-8 and an unreadable one not UTF-8 either."""
    source = write_class_folders(folder / "data", {"yes": 1}) / "yes" / "yes_000.png"
    markup = folder / "x[" / "bold].png"  # the path x[/bold].png
    markup.parent.mkdir()
    shutil.copy(source, markup)
    try:
        not_utf8 = folder / os.fsdecode(b"bad\xff\xfe.png")
        shutil.copy(source, not_utf8)
        broken = folder / os.fsdecode(b"broken\xff.png")
        broken.write_bytes(b"not an image")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    return markup, not_utf8, broken


def test_display_path_renders_bytes_that_are_not_utf8_as_escapes() -> None:
    assert display_path(os.fsdecode(b"scans/bad\xff\xfe.jpg")) == "scans/bad\\xff\\xfe.jpg"
    assert display_path(Path("scans/é[x].png")) == "scans/é[x].png"
    assert display_path("lone\ud800") == "lone\\ud800"


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_predict_prints_file_names_with_markup_or_invalid_utf8_and_keeps_every_result(
    as_json: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = make_checkpoint(tmp_path / "best.pt")
    monkeypatch.chdir(tmp_path)  # short relative paths: the table does not wrap them
    markup, not_utf8, broken = (p.relative_to(tmp_path) for p in _odd_names(tmp_path))
    args = ["predict", "--checkpoint", str(checkpoint), str(markup), str(not_utf8), str(broken)]
    result = CliRunner().invoke(app, [*args, *(["--json"] if as_json else [])])
    assert result.exit_code == 1, result.output  # one unreadable input, the others predicted
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if as_json:  # one line per input, in input order; the unreadable one carries its error
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert [r["path"] for r in records] == ["x[/bold].png", "bad\\xff\\xfe.png", "broken\\xff.png"]
        assert "label" in records[0] and "not an image" in records[2]["error"]
    else:
        assert "x[/bold].png" in result.stdout and "bad\\xff\\xfe.png" in result.stdout
    assert "Skipped 1 of 3 input(s)" in result.stderr and "broken\\xff.png: not an image" in result.stderr


def test_explain_prints_file_names_with_markup_or_invalid_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = make_checkpoint(tmp_path / "best.pt")
    monkeypatch.chdir(tmp_path)
    markup, not_utf8, _ = (p.relative_to(tmp_path) for p in _odd_names(tmp_path))
    out = Path("cams[/red]")
    result = CliRunner().invoke(app, ["explain", "--checkpoint", str(checkpoint), str(markup), str(not_utf8),
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bold].png" in result.stdout and "bad\\xff\\xfe.png" in result.stdout
    assert "Overlays written to cams[/red]" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(["bold]-fullgrad.png", f"{not_utf8.stem}-fullgrad.png"])
