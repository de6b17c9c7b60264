"""Prediction at scale: folders streamed in batches with bounded memory, results printed and written as they come
(table, JSON lines, CSV), exported models wherever a checkpoint is taken, and every kind of in-memory input."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brainscan.cli import app
from brainscan.errors import BrainscanError
from brainscan.predict import Prediction, Predictor, Skipped, predict_files, source_checkpoint

from .conftest import write_class_folders
from .test_checkpoints import make_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two class folders of generated slices, a long-named file and an unreadable one at the top level."""
    root = write_class_folders(tmp_path_factory.mktemp("scans") / "scans", {"yes": 3, "no": 2})
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(root / ("a-very-long-file-name-" * 4 + "slice.png"))
    (root / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "best.pt")


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> Path:
    pytest.importorskip("onnxruntime")
    from brainscan.export import export_model

    return export_model(checkpoint, fmt="onnx")


def predict(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["predict", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------------------------------------------- the CLI


def test_csv_holds_one_row_per_file_relative_to_the_folder_given_with_skipped_files_and_their_reason(
    folder: Path, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.csv"
    code, stdout, stderr = predict("-c", str(checkpoint), str(folder), "--recursive", "--csv", str(out))
    assert code == 1  # one file could not be read
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7 and [r["path"] for r in rows if r["error"]] == ["broken.png"]
    assert {r["path"] for r in rows} >= {"yes/yes_000.png", "no/no_001.png", "broken.png"}
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] in ("no", "yes") for r in good)
    assert all(float(r["p_no"]) + float(r["p_yes"]) == pytest.approx(1, abs=1e-5) for r in good)
    assert "skipped" in stderr and "broken.png: not an image" in stderr and "Skipped 1 of 7" in stderr


def test_an_existing_csv_is_kept_unless_overwrite_is_given(folder: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine.csv"
    out.write_text("a user's own table\n")
    code, _, stderr = predict("-c", str(checkpoint), str(folder / "yes"), "--csv", str(out))
    assert code == 2 and "exists" in stderr and "--overwrite" in stderr
    assert out.read_text() == "a user's own table\n"
    code, _, _ = predict("-c", str(checkpoint), str(folder / "yes"), "--csv", str(out), "--overwrite")
    assert code == 0 and len(list(csv.DictReader(out.open()))) == 3


def test_the_table_shows_every_path_whole_as_typed(folder: Path, checkpoint: Path) -> None:
    code, stdout, _ = predict("-c", str(checkpoint), str(folder))
    long_name = "a-very-long-file-name-" * 4 + "slice.png"
    assert code == 1 and str(folder / long_name) in stdout  # nothing cut to a shared prefix
    header, *rows = stdout.splitlines()
    assert header.split() == ["path", "label", "confidence", "no", "yes"] and len(rows) == 1


def test_json_lines_come_one_per_input_in_input_order(folder: Path, checkpoint: Path) -> None:
    code, stdout, _ = predict("-c", str(checkpoint), str(folder), "-r", "--json", "--batch-size", "2")
    records = [json.loads(line) for line in stdout.splitlines()]
    assert code == 1 and len(records) == 7
    assert [r["path"] for r in records] == sorted(r["path"] for r in records)  # the discovery order
    assert sum("error" in r for r in records) == 1


def test_folders_are_searched_below_their_top_level_only_with_recursive(folder: Path, checkpoint: Path) -> None:
    code, stdout, _ = predict("-c", str(checkpoint), str(folder), "--json")
    assert code == 1 and len(stdout.splitlines()) == 2  # the top level: the long-named file and the broken one
    code, _, stderr = predict("-c", str(checkpoint), str(folder.parent))
    assert code == 2 and "add --recursive" in stderr


def test_an_exported_model_is_taken_wherever_a_checkpoint_is(
    folder: Path, checkpoint: Path, exported: Path, tmp_path: Path
) -> None:
    yes = str(folder / "yes")
    code, stdout, _ = predict("-c", str(exported), yes, "--json")
    from_onnx = [json.loads(line)["probabilities"] for line in stdout.splitlines()]
    code_pt, stdout, _ = predict("-c", str(checkpoint), yes, "--json", "--backend", "torch")
    from_pt = [json.loads(line)["probabilities"] for line in stdout.splitlines()]
    assert code == code_pt == 0
    for a, b in zip(from_onnx, from_pt, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # activation maps need the PyTorch model: the checkpoint beside the export is found by its recorded sha256
    assert source_checkpoint(exported) == checkpoint
    result = runner.invoke(app, ["explain", "-c", str(exported), yes, "--out", str(tmp_path / "cams")])
    assert result.exit_code == 0 and len(list((tmp_path / "cams").glob("*.png"))) == 3
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(exported.read_bytes())
    result = runner.invoke(app, ["explain", "-c", str(lone), yes, "--out", str(tmp_path / "none")])
    assert result.exit_code == 2 and "need the PyTorch checkpoint" in result.stderr
    result = runner.invoke(app, ["export", "-c", str(exported)])
    assert result.exit_code == 2 and "is an exported model, not a checkpoint" in result.stderr


# ------------------------------------------------------------------------------------------------ the API


def test_many_files_stream_with_at_most_two_batches_decoded_ahead(folder: Path, checkpoint: Path) -> None:
    predictor = Predictor.load(checkpoint)
    files = sorted((folder / "yes").glob("*.png")) * 20
    pulled = 0

    def lazily() -> Iterator[Path]:
        nonlocal pulled
        for f in files:
            pulled += 1
            yield f

    results = predict_files(predictor, lazily(), batch_size=4)
    first = next(results)
    assert isinstance(first, Prediction) and pulled <= 3 * 4  # a batch predicted, two more in decoding at most
    assert len([first, *results]) == len(files)


def test_results_keep_input_order_whatever_the_decoding_threads(folder: Path, checkpoint: Path) -> None:
    predictor = Predictor.load(checkpoint)
    files = [*sorted(folder.rglob("*.png"))] * 3
    serial = list(predict_files(predictor, files, batch_size=3, workers=1))
    threaded = list(predict_files(predictor, files, batch_size=3, workers=4))
    assert [r.path for r in threaded] == [r.path for r in serial] == list(map(str, files))
    for a, b in zip(serial, threaded, strict=True):
        assert type(a) is type(b)
        if isinstance(a, Prediction):
            assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
        else:
            assert isinstance(a, Skipped) and a.reason == b.reason


def test_arrays_pil_images_and_tensors_are_classified_alone_or_as_a_batch(checkpoint: Path) -> None:
    predictor = Predictor.load(checkpoint)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    expected = predictor.predict(gray).probabilities
    same = [
        predictor(gray),
        predictor(Image.fromarray(gray)),
        predictor(np.repeat(gray[..., None], 3, axis=-1)),  # H×W×3 colour
        predictor(torch.from_numpy(gray)),
        predictor(torch.from_numpy(gray)[None]),  # 1×H×W
    ]
    for one in same:
        assert isinstance(one, Prediction) and one.probabilities == pytest.approx(expected, abs=1e-6)
    stack = np.stack([gray, 255 - gray, gray])
    for batch in (stack, torch.from_numpy(stack)[:, None], list(stack)):  # N×H×W, N×1×H×W, a list
        results = predictor(batch)
        assert isinstance(results, list) and len(results) == 3
        assert results[0].probabilities == pytest.approx(expected, abs=1e-6) and results[0].path is None
    assert [p.label for p in predictor.predict_many(list(stack), batch_size=2)] == [r.label for r in results]
    with pytest.raises(BrainscanError, match="shape"):
        predictor(np.zeros((2, 3, 4, 5, 6)))


def test_an_in_memory_onnx_graph_gives_the_pytorch_probabilities(checkpoint: Path) -> None:
    pytest.importorskip("onnxruntime")
    eager = Predictor.load(checkpoint, backend="torch")
    fast = Predictor.load(checkpoint, backend="torch")
    assert fast.accelerate() and fast.backend.name == "onnxruntime" and fast.model is not None  # CAMs still work
    slices = np.random.default_rng(1).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    assert np.abs(fast.predict_proba(slices) - eager.predict_proba(slices)).max() <= 1e-5
    assert fast.describe()["backend"] == "onnxruntime" and fast.describe()["sha256"] == eager.sha256


def test_an_export_describes_the_model_as_its_checkpoint_does(checkpoint: Path, exported: Path) -> None:
    from_pt, from_onnx = Predictor.load(checkpoint).describe(), Predictor.load(exported).describe()
    for key in ("arch", "class_names", "preprocess", "calibration", "operating_point"):
        assert from_onnx[key] == from_pt[key]
    assert from_onnx["file"] == "best.onnx" and from_onnx["backend"] == "onnxruntime"
    with pytest.raises(BrainscanError, match="runs on onnxruntime, not torch"):
        Predictor.load(exported, backend="torch")
