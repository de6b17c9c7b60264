"""Exported models stay tied to the checkpoint bytes they came from: a stale or broken export is never used in its
place, exports are written atomically, never over files that are not exports, and say what parity was checked on."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from brainscan import train
from brainscan.backends import TORCHSCRIPT_METADATA
from brainscan.checkpoint import save_checkpoint
from brainscan.cli import app
from brainscan.errors import BrainscanError
from brainscan.export import PARITY_TOLERANCE, export_model
from brainscan.predict import Predictor

from .conftest import write_class_folders
from .test_checkpoints import make_checkpoint
from .test_train import tiny_config

pytest.importorskip("onnxruntime")
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run (with its split and data, so exports check parity on its test images)."""
    root = tmp_path_factory.mktemp("stale")
    data = write_class_folders(root / "data", {"yes": 16, "no": 16}, size=40)
    train(tiny_config(data, root / "run", epochs=1))
    return root


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the run directory (tests change its files); its config still points at the data."""
    return shutil.copytree(trained / "run", tmp_path / "run")


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The warnings brainscan logs while the test runs (whatever the CLI did to the logger's propagation)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("brainscan")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def change_weights(checkpoint: Path) -> None:
    """Re-save ``checkpoint`` with other classifier weights, as more training would."""
    payload = torch.load(checkpoint, weights_only=True)
    payload["model_state"]["classifier.2.bias"] += torch.tensor([0.7, -0.7])
    save_checkpoint(payload, checkpoint)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def slices(checkpoint: Path) -> np.ndarray:
    size = Predictor.from_checkpoint(checkpoint, backend="torch").preprocess.image_size
    return np.random.default_rng(1).integers(0, 256, (3, size, size), dtype=np.uint8)


# ------------------------------------------------------------------------------------------- stale exports


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_exports_record_the_sha256_and_name_of_their_checkpoint(run: Path) -> None:
    checkpoint = run / "best.pt"
    onnx_path = export_model(checkpoint, fmt="onnx")
    script_path = export_model(checkpoint, fmt="torchscript")
    embedded_onnx = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["brainscan"]
    extra = {TORCHSCRIPT_METADATA: ""}
    torch.jit.load(str(script_path), _extra_files=extra)
    for meta in (
        json.loads(onnx_path.with_suffix(".json").read_text()),
        json.loads(script_path.with_suffix(".json").read_text()),
        json.loads(embedded_onnx),
        json.loads(extra[TORCHSCRIPT_METADATA]),
    ):
        assert meta["source_checkpoint_sha256"] == sha256(checkpoint)
        assert meta["source_checkpoint"] == "best.pt"


def test_a_stale_export_is_not_used_for_a_changed_checkpoint(run: Path, logged: list[str]) -> None:
    checkpoint = run / "best.pt"
    export_model(checkpoint, fmt="onnx")
    export_model(checkpoint, fmt="torchscript")
    assert Predictor.from_checkpoint(checkpoint, backend="auto").backend.name == "onnxruntime"
    assert not logged

    change_weights(checkpoint)
    auto = Predictor.from_checkpoint(checkpoint, backend="auto")
    torch_p = Predictor.from_checkpoint(checkpoint, backend="torch")
    assert auto.backend.name == "torch"
    np.testing.assert_allclose(auto.predict_proba(slices(checkpoint)), torch_p.predict_proba(slices(checkpoint)))
    assert len(logged) == 1
    assert "best.onnx: stale export" in logged[0] and "PyTorch" in logged[0]
    assert f"brainscan export --checkpoint {checkpoint}" in logged[0]
    for backend in ("onnxruntime", "torchscript"):
        with pytest.raises(BrainscanError, match=r"stale export.*brainscan export --checkpoint"):
            Predictor.from_checkpoint(checkpoint, backend=backend)

    export_model(checkpoint, fmt="onnx")  # re-exporting brings it back into use
    assert Predictor.from_checkpoint(checkpoint, backend="auto").backend.name == "onnxruntime"


def test_default_predict_gives_the_changed_checkpoints_result_with_a_warning(run: Path, trained: Path) -> None:
    checkpoint = run / "best.pt"
    image = str(sorted((trained / "data" / "yes").glob("*.png"))[0])
    assert runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "-q"]).exit_code == 0
    change_weights(checkpoint)

    result = runner.invoke(app, ["predict", "--checkpoint", str(checkpoint), image, "--json"])
    assert result.exit_code == 0, result.output
    expected = Predictor.from_checkpoint(checkpoint, backend="torch").predict(image).probabilities
    assert json.loads(result.stdout)["probabilities"] == pytest.approx(expected, abs=1e-6)
    assert "stale export" in result.stderr and "brainscan export --checkpoint" in result.stderr

    refused = runner.invoke(app, ["predict", "--checkpoint", str(checkpoint), image, "--backend", "onnxruntime"])
    assert refused.exit_code == 2 and refused.stderr.startswith("error:") and "best.onnx" in refused.stderr


@pytest.mark.parametrize(("fmt", "backend"), [("onnx", "onnxruntime"), ("torchscript", "torchscript")])
def test_a_garbage_export_falls_back_with_a_warning_or_is_refused(
    run: Path, logged: list[str], fmt: str, backend: str
) -> None:
    checkpoint = run / "best.pt"
    garbage = run / ("best.onnx" if fmt == "onnx" else "best.torchscript.pt")
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))  # e.g. a copy cut short
    if fmt == "onnx":
        assert Predictor.from_checkpoint(checkpoint, backend="auto").backend.name == "torch"
        assert len(logged) == 1 and "not a readable onnx model" in logged[0] and "PyTorch" in logged[0]
    with pytest.raises(BrainscanError, match=f"{garbage.name}: not a readable {fmt} model"):
        Predictor.from_checkpoint(checkpoint, backend=backend)

    result = runner.invoke(app, ["predict", "--checkpoint", str(checkpoint), str(run / "x.png"), "--backend", backend])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.startswith("error:") and f"not a readable {fmt} model" in result.stderr

    export_model(checkpoint, fmt=fmt)  # its default place is brainscan's: a broken export there is replaced
    assert Predictor.from_checkpoint(checkpoint, backend=backend).backend.name == backend


# ------------------------------------------------------------------------------------------ atomic writes


def test_a_failed_parity_check_writes_nothing_and_keeps_the_previous_export(run: Path) -> None:
    checkpoint = run / "best.pt"
    good = export_model(checkpoint, fmt="onnx")
    before = {p.name: p.read_bytes() for p in (good, good.with_suffix(".json"))}
    payload = torch.load(checkpoint, weights_only=True)
    payload["model_state"]["classifier.2.bias"][0] = float("nan")  # NaN logits: never within tolerance
    save_checkpoint(payload, checkpoint)

    with pytest.raises(BrainscanError, match="differ from PyTorch.*not written.*previous export is left"):
        export_model(checkpoint, fmt="onnx")
    assert {p.name: p.read_bytes() for p in (good, good.with_suffix(".json"))} == before
    with pytest.raises(BrainscanError, match="not written"):
        export_model(checkpoint, fmt="onnx", out=run / "fresh.onnx")
    assert not (run / "fresh.onnx").exists() and not (run / "fresh.json").exists()
    assert not list(run.glob(".*.tmp")), "no temporary file left behind"


# ------------------------------------------------------------------------------------------ export targets


@pytest.mark.parametrize(
    ("out", "existing", "replaced"),
    [
        ("best.pt", None, "best.pt"),  # the checkpoint itself
        ("last.pt", None, "last.pt"),
        ("config.yaml", None, "config.yaml"),
        ("split.csv", None, "split.csv"),
        ("metrics.onnx", None, "metrics.json"),
        ("cv_metrics.onnx", "cv_metrics.json", "cv_metrics.json"),
        ("audit.onnx", "audit.json", "audit.json"),
        ("report.onnx", "report.json", "report.json"),
        ("evaluate-test.onnx", "evaluate-test.json", "evaluate-test.json"),
        ("curves.png", None, "curves.png"),
        ("model.json", None, "model.json"),
    ],
)
def test_export_refuses_to_overwrite_what_is_not_an_export(
    run: Path, out: str, existing: str | None, replaced: str
) -> None:
    if existing:
        (run / existing).write_text(json.dumps({"accuracy": 0.9}))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(BrainscanError, match=rf"--out .*{out}") as caught:
        export_model(run / "best.pt", fmt="onnx", out=run / out)
    assert replaced in str(caught.value)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    result = runner.invoke(app, ["export", "--checkpoint", str(run / "best.pt"), "--out", str(run / out)])
    assert result.exit_code == 2 and result.stderr.startswith("error:") and replaced in result.stderr


def test_export_may_replace_an_earlier_export_of_its_own_format_only(run: Path) -> None:
    checkpoint = run / "best.pt"
    custom = run / "deploy" / "model.onnx"
    first = json.loads(export_model(checkpoint, fmt="onnx", out=custom).with_suffix(".json").read_text())
    change_weights(checkpoint)  # more training, then a re-export over the earlier one
    second = json.loads(export_model(checkpoint, fmt="onnx", out=custom).with_suffix(".json").read_text())
    assert first["source_checkpoint_sha256"] != second["source_checkpoint_sha256"] == sha256(checkpoint)
    with pytest.raises(BrainscanError, match="not a brainscan torchscript export"):
        export_model(checkpoint, fmt="torchscript", out=custom)
    with pytest.raises(BrainscanError, match=r"the metadata of an export in another format \(onnx\)"):
        export_model(checkpoint, fmt="torchscript", out=custom.with_suffix(".pt"))


# ------------------------------------------------------------------------------------- parity inputs


def test_export_without_test_images_says_it_checked_on_synthetic_noise(run: Path, logged: list[str]) -> None:
    verified = json.loads(export_model(run / "best.pt").with_suffix(".json").read_text())
    assert verified["parity_checked_on"] == "test images" and verified["parity_images"] > 0
    assert 0 <= verified["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert not logged

    alone = run.parent / "alone" / "best.pt"  # the checkpoint copied without its run's split.csv
    alone.parent.mkdir()
    shutil.copy(run / "best.pt", alone)
    meta = json.loads(export_model(alone).with_suffix(".json").read_text())
    assert meta["parity_checked_on"] == "synthetic noise"
    assert 0 <= meta["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert len(logged) == 1 and "synthetic noise" in logged[0] and str(alone.parent / "split.csv") in logged[0]

    result = runner.invoke(app, ["export", "--checkpoint", str(alone), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    assert "synthetic noise" in result.stdout and "test images were not found" in result.stderr


def test_a_checkpoint_without_a_run_exports_with_its_parity_recorded(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "model.pt")
    meta = json.loads(export_model(checkpoint, fmt="torchscript").with_suffix(".json").read_text())
    assert meta["parity_checked_on"] == "synthetic noise" and meta["source_checkpoint"] == "model.pt"
