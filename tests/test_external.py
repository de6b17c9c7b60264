"""External evaluation scores a model on data from elsewhere: class vocabularies are mapped to tumour vs no tumour,
copies of the model's train/val images (even mirrored ones) are left out and counted, the protocol says
``external``, and an exported model is evaluated the same way. A final model trains on everything but val."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainscan import evaluate, train
from brainscan.data.splits import read_split_file
from brainscan.errors import BrainscanError
from brainscan.external import tumour_metrics, vocabulary

from .conftest import write_class_folders
from .test_train import tiny_config

PLANTED = 5


@pytest.fixture(scope="module")
def yes_no_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("external")
    data = write_class_folders(root / "data", {"yes": 30, "no": 30})
    return train(tiny_config(data, root / "run", epochs=2)).best_checkpoint


@pytest.fixture(scope="module")
def four_class_folder(tmp_path_factory: pytest.TempPathFactory, yes_no_run: Path) -> Path:
    """Another dataset in four classes whose glioma/ folder also holds mirrored copies of PLANTED images the model
    was trained on."""
    root = write_class_folders(
        tmp_path_factory.mktemp("other") / "four", {"glioma": 12, "meningioma": 6, "notumor": 12}, seed=7
    )
    trained = [r for r in read_split_file(yes_no_run.parent / "split.csv") if r["split"] == "train"]
    data = yes_no_run.parent.parent / "data"
    for k, row in enumerate(r for r in trained if r["label"] == "yes"):
        if k == PLANTED:
            break
        mirrored = Image.open(data / row["path"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mirrored.save(root / "glioma" / f"copy_{k}.jpg", quality=95)
    return root


def test_vocabularies_are_mapped_to_tumour_vs_no_tumour() -> None:
    assert vocabulary(["no", "yes"], ["yes", "no"]) == "classes"
    assert vocabulary(["glioma", "meningioma", "notumor", "pituitary"], ["yes", "no"]) == "tumour"
    assert vocabulary(["no", "yes"], ["glioma", "notumor"]) == "tumour"
    with pytest.raises(BrainscanError, match="no 'no tumour' class"):
        vocabulary(["glioma", "meningioma", "pituitary"], ["yes", "no"])
    with pytest.raises(BrainscanError, match="Labels maybe are neither"):
        vocabulary(["no", "yes"], ["maybe", "no"])


def test_tumour_metrics_call_a_tumour_when_the_top_class_is_not_no_tumour() -> None:
    classes = ["glioma", "notumor", "pituitary"]
    # P(no tumour) 0.4 is the single largest class: argmax says no tumour although P(tumour) = 0.6
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    m = tumour_metrics(probs, classes, ["yes", "yes", "no", "no"], threshold=0.5)
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]
    assert m["called_tumour"] == {"no": {"n": 2, "share": 0.5}, "yes": {"n": 2, "share": 0.5}}
    assert m["roc_auc"] == pytest.approx(0.5)
    assert m["at_operating_point"] == {"threshold": 0.5, "sensitivity": 1.0, "specificity": 0.5}
    only_tumours = tumour_metrics(probs[:2], classes, ["glioma", "pituitary"])
    assert only_tumours["specificity"] is None and only_tumours["roc_auc"] is None


def test_external_evaluation_maps_classes_and_leaves_out_copies(yes_no_run: Path, four_class_folder: Path) -> None:
    metrics = evaluate(yes_no_run, data=four_class_folder)
    protocol = metrics["protocol"]
    assert protocol["protocol"] == "external"
    assert protocol["copies_of_training_images"]["excluded"] == PLANTED
    assert protocol["n_evaluated"] == 30 and metrics["n"] == 30
    assert "data tumour: glioma, meningioma | no tumour: notumor" in protocol["vocabulary"]
    assert set(metrics["called_tumour"]) == {"glioma", "meningioma", "notumor"}
    assert metrics["called_tumour"]["glioma"]["n"] == 12  # the planted copies are gone
    for key in ("sensitivity", "specificity", "roc_auc", "accuracy", "balanced_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    written = yes_no_run.parent / f"external-{four_class_folder.name}-test.json"
    assert json.loads(written.read_text()) == json.loads(json.dumps(metrics))


def test_exported_models_are_evaluated_externally_too(yes_no_run: Path, four_class_folder: Path) -> None:
    pytest.importorskip("onnxruntime")
    from brainscan.export import export_model

    onnx = export_model(yes_no_run, out=yes_no_run.parent / "best.onnx")
    exported = evaluate(onnx, data=four_class_folder, out=onnx.parent / "onnx-external.json")
    checkpoint = evaluate(yes_no_run, data=four_class_folder, out=onnx.parent / "pt-external.json")
    assert exported["protocol"]["copies_of_training_images"]["excluded"] == PLANTED
    assert exported["protocol"]["trained_on"] == checkpoint["protocol"]["trained_on"]
    assert exported["roc_auc"] == pytest.approx(checkpoint["roc_auc"], abs=1e-4)
    # beside its unchanged checkpoint, an export is scored on the run's own test split, into a file of its own
    internal = evaluate(onnx)
    assert internal["protocol"]["model_file"] == "best.onnx" and (onnx.parent / "evaluate-test-onnx.json").is_file()
    assert internal["accuracy"] == pytest.approx(evaluate(yes_no_run, out=onnx.parent / "pt.json")["accuracy"])
    alone = shutil.copy(onnx, onnx.parent.parent / "alone.onnx")  # away from its checkpoint: no split to score
    with pytest.raises(BrainscanError, match="pass --data"):
        evaluate(alone)


def test_the_training_data_itself_is_no_external_evaluation(yes_no_run: Path) -> None:
    data = yes_no_run.parent.parent / "data"
    metrics = evaluate(yes_no_run, data=data, out=yes_no_run.parent / "same.json")
    assert metrics["protocol"]["split"] == "test"
    assert "copies_of_training_images" not in metrics["protocol"]


def test_a_final_model_trains_on_everything_but_val(yes_no_folder: Path, tmp_path: Path) -> None:
    config = tiny_config(yes_no_folder, tmp_path / "final", epochs=1)
    result = train(replace(config, data=replace(config.data, final=True)))
    splits = [r["split"] for r in read_split_file(result.run_dir / "split.csv")]
    assert "test" not in splits and splits.count("val") == 12  # 15% of 80
    protocol = result.metrics["protocol"]
    assert protocol["split"] == "val (no test split)"
    assert "optimistic" in protocol["held_out_test"]
    assert (result.run_dir / "training_prints.npz").is_file()
    with pytest.raises(BrainscanError, match="final model"):
        evaluate(result.best_checkpoint)
    from brainscan.cv import cross_validate

    with pytest.raises(BrainscanError, match="has no test split"):
        cross_validate(replace(config, data=replace(config.data, final=True), out=str(tmp_path / "cv")), folds=2)


def test_the_report_puts_external_figures_beside_the_internal_ones(yes_no_run: Path, four_class_folder: Path) -> None:
    from brainscan.report import write_report

    evaluate(yes_no_run, data=four_class_folder)
    out = write_report(yes_no_run.parent, yes_no_run.parent / "report.html", n_resamples=20, gallery_size=2)
    rows = json.loads(out.with_suffix(".json").read_text())["external"]
    assert rows[0]["name"] == "internal: test split"
    external = next(r for r in rows if r["name"] == f"external: {four_class_folder.name} (all)")
    assert external["excluded"] == PLANTED and external["n"] == 30
    assert f"external: {four_class_folder.name}" in out.read_text()


def test_training_warns_when_file_properties_predict_the_label(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """'no' slices saved small as JPEG, 'yes' slices large as PNG: the source gives the label away."""
    rng = np.random.default_rng(0)
    from .conftest import synthetic_slice

    for label, size, suffix in (("no", 40, ".jpg"), ("yes", 64, ".png")):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(synthetic_slice(label, rng, size)).save(tmp_path / "data" / label / f"{i}{suffix}")
    with caplog.at_level("WARNING"):
        result = train(tiny_config(tmp_path / "data", tmp_path / "run", epochs=1))
    confounding = result.metrics["protocol"]["confounding"]
    assert confounding["flagged"] and confounding["balanced_accuracy"] > 0.9
    assert "Label–source confound" in caplog.text and "brainscan evaluate --data OTHER" in caplog.text
