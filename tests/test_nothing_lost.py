"""Runs, folds and data that can't be silently overwritten or mismatched, and bad input answered in words.

Each test reproduces one way brainscan used to give a wrong answer, lose data, or crash (issue 24), through the
CLI a user types or the Python API a notebook calls; tiny generated images and the from-scratch ``cnn``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brainscan.cli import app
from brainscan.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from brainscan.errors import BrainscanError
from brainscan.metrics import compute_metrics
from brainscan.train import train

from .conftest import write_class_folders

runner = CliRunner()
TINY = ["--model", "cnn", "--epochs", "1", "--image-size", "32", "--no-confound-check", "--quiet"]


def run(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def config(data: Path, out: Path, **data_options: object) -> RunConfig:
    return RunConfig(
        DataConfig(root=str(data), image_size=32, confound_check=False, **data_options),  # type: ignore[arg-type]
        out=str(out),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(epochs=1, batch_size=8),
    )


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "data", {"yes": 12, "no": 12})


# ------------------------------------------------------------------------------------------- owned run folders


def test_cv_refuses_to_reuse_folds_trained_with_another_config(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    assert run("cv", "--data", data, "--out", out, "--folds", "2", *TINY)[0] == 0
    code, output = run("cv", "--data", data, "--out", out, "--folds", "2", *TINY, "--seed", "5", "--epochs", "2")
    assert code == 2
    assert "fold 1 trained with other settings" in output and "train.seed 0 → 5" in output
    assert json.loads((out / "cv_metrics.json").read_text())["protocol"]["seed"] == 0  # not rewritten


def test_cv_reuses_finished_folds_of_the_same_config_and_says_so_under_quiet(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    run("cv", "--data", data, "--out", out, "--folds", "2", *TINY)
    first = json.loads((out / "cv_metrics.json").read_text())
    code, output = run("cv", "--data", data, "--out", out, "--folds", "2", *TINY)
    assert code == 0
    assert "fold 1: reusing the finished run" in output and "fold 2: reusing the finished run" in output
    assert json.loads((out / "cv_metrics.json").read_text())["folds"] == first["folds"]


def test_cv_refuses_folds_trained_on_images_that_changed_since(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    run("cv", "--data", data, "--out", out, "--folds", "2", *TINY)
    image = next((data / "yes").iterdir())
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    code, output = run("cv", "--data", data, "--out", out, "--folds", "2", *TINY)
    assert code == 2 and "trained on other images" in output


def test_train_refuses_an_existing_run_even_without_last_pt(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run("train", "--data", data, "--out", out, *TINY)[0] == 0
    (out / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, output = run("train", "--data", data, "--out", out, *TINY, "--seed", "3")
    assert code == 2 and "already holds a run of other settings: train.seed 0 → 3" in output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_refuses_a_folder_holding_the_users_files(data: Path, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "config.yaml").write_text("mine: true\n")
    code, output = run("train", "--data", data, "--out", project, *TINY)
    assert code == 2 and "is not empty (config.yaml)" in output
    assert (project / "config.yaml").read_text() == "mine: true\n"


def test_overwrite_moves_the_old_folder_aside_and_deletes_nothing(data: Path, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    code, output = run("train", "--data", data, "--out", project, *TINY, "--overwrite")
    assert code == 0, output
    (moved,) = tmp_path.glob("proj.replaced-*")
    assert (moved / "notes.txt").read_text() == "keep me"
    assert (project / "best.pt").is_file() and not (project / "notes.txt").exists()


def test_evaluate_refuses_an_out_that_would_replace_the_runs_metrics(data: Path, tmp_path: Path) -> None:
    run_dir = _trained(data, tmp_path / "run")
    before = (run_dir / "metrics.json").read_bytes()
    code, output = run("evaluate", "--checkpoint", run_dir / "best.pt", "--out", run_dir / "metrics.json", "--quiet")
    assert code == 2 and "would replace a run's metrics.json" in output
    assert (run_dir / "metrics.json").read_bytes() == before


def test_out_inside_the_data_folder_is_refused_and_old_runs_there_are_not_read_as_a_class(
    data: Path, tmp_path: Path
) -> None:
    code, output = run("train", "--data", data, "--out", data / "runs", *TINY)
    assert code == 2 and "inside the data folder" in output and not (data / "runs").exists()
    # a run someone wrote there with an older brainscan is left out of the scan, with the reason
    shutil.copytree(_trained(data, tmp_path / "run"), data / "old-run")
    result = train(config(data, tmp_path / "again"))
    assert result.metrics["class_names"] == ["no", "yes"]
    assert skipped(tmp_path / "again") == {"old-run": "a brainscan run directory, not a class folder"}


def _trained(data: Path, out: Path) -> Path:
    return train(config(data, out)).run_dir


def skipped(run_dir: Path) -> dict[str, str]:
    """A run's skipped.csv: path → reason."""
    with (run_dir / "skipped.csv").open(newline="") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


# --------------------------------------------------------------------------------------------- data recorded


def test_a_run_records_absolute_data_paths_and_evaluates_from_another_directory(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(data.parent)
    assert run("train", "--data", "data", "--out", "run", *TINY)[0] == 0
    assert Path(_yaml(tmp_path / "run" / "config.yaml")["data"]["root"]) == data.resolve()
    monkeypatch.chdir(tmp_path / "run")
    code, output = run("evaluate", "--checkpoint", "best.pt", "--quiet")
    assert code == 0, output


def test_evaluate_finds_the_training_data_after_it_moved(data: Path, tmp_path: Path) -> None:
    run_dir = _trained(data, tmp_path / "run")
    moved = data.rename(tmp_path / "moved")
    code, output = run("evaluate", "--checkpoint", run_dir / "best.pt", "--quiet")
    assert code == 2 and "pass --data DIR where the images are now" in output
    code, output = run("evaluate", "--checkpoint", run_dir / "best.pt", "--data", moved, "--quiet")
    assert code == 0, output
    metrics = json.loads((run_dir / "evaluate-test.json").read_text())
    assert metrics["protocol"]["split"] == "test" and "copies_of_training_images" not in metrics["protocol"]


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------------------------ bad files


def test_skipped_files_are_listed_in_skipped_csv_and_warned_under_quiet(data: Path, tmp_path: Path) -> None:
    (data / "yes" / "zero.jpg").write_bytes(b"")
    (data / "no" / "page.jpg").write_text("<html></html>")
    code, output = run("train", "--data", data, "--out", tmp_path / "run", *TINY)
    assert code == 0 and "Skipped 2 unusable file(s)" in output
    assert skipped(tmp_path / "run") == {
        "no/page.jpg": "not an image Pillow can identify",
        "yes/zero.jpg": "empty file (0 bytes)",
    }


def test_a_file_name_that_is_not_utf8_is_skipped_with_a_reason(data: Path, tmp_path: Path) -> None:
    bad = os.fsdecode(os.fsencode(data / "yes") + b"/bad\xff\xfe.png")
    shutil.copy(next((data / "yes").iterdir()), bad)
    result = train(config(data, tmp_path / "run"))
    assert skipped(tmp_path / "run") == {"yes/bad\\xff\\xfe.png": "the file name is not valid UTF-8: rename the file"}
    assert result.metrics["protocol"]["skipped_files"] == 1


def test_fifos_devices_dangling_links_and_folders_named_as_images_are_listed_with_a_reason(data: Path) -> None:
    from brainscan.data.ingest import scan_dataset

    os.mkfifo(data / "yes" / "fifo.jpg")
    (data / "yes" / "zero.png").symlink_to("/dev/zero")
    (data / "no" / "gone.jpg").symlink_to(data / "nowhere.jpg")
    (data / "no" / "folder.png").mkdir()
    reasons = dict(scan_dataset(data).skipped)
    assert reasons == {
        "yes/fifo.jpg": "not a regular file (a FIFO); only ordinary files are read",
        "yes/zero.png": "not a regular file (a character device); only ordinary files are read",
        "no/gone.jpg": "no such file",
        "no/folder.png": "a folder named like an image file",
    }


def test_predict_reports_a_given_folder_that_holds_no_image(data: Path, tmp_path: Path) -> None:
    run_dir = _trained(data, tmp_path / "run")
    (tmp_path / "empty").mkdir()
    image = next((data / "yes").iterdir())
    code, output = run("predict", "--checkpoint", run_dir / "best.pt", image, tmp_path / "empty", "--json")
    assert code == 1 and f"{tmp_path / 'empty'}: not a regular file (a folder)" in output
    assert json.loads(output.splitlines()[0])["path"] == str(image)


# ---------------------------------------------------------------------------------------------------- labels


def _index(tmp_path: Path, rows: list[tuple[str, str]], text: str | None = None, encoding: str = "utf-8") -> Path:
    index = tmp_path / "index.csv"
    index.write_text(text or "path,label\n" + "".join(f"{p},{label}\n" for p, label in rows), encoding=encoding)
    return index


def _rows(data: Path) -> list[tuple[str, str]]:
    return [(p.relative_to(data).as_posix(), p.parent.name) for p in sorted(data.rglob("*.png"))]


def test_one_file_listed_under_two_labels_is_an_error_naming_it(data: Path, tmp_path: Path) -> None:
    rows = _rows(data)
    path, label = rows[0]
    other = "yes" if label == "no" else "no"
    index = _index(data, [*rows, (path, other)])
    code, output = run("train", "--index", index, "--out", tmp_path / "run", *TINY)
    assert code == 2 and f"{path} is listed as '{label}' and as '{other}'" in output
    assert not (tmp_path / "run").exists()


def test_copies_of_one_image_under_two_labels_stop_the_run_or_are_dropped(data: Path, tmp_path: Path) -> None:
    shutil.copy(data / "yes" / "yes_000.png", data / "no" / "copy.png")
    with pytest.raises(BrainscanError, match=r"appear under two labels.*yes/yes_000.png \(yes\)"):
        train(config(data, tmp_path / "run"))
    result = train(config(data, tmp_path / "run", drop_conflicts=True))
    reasons = skipped(tmp_path / "run")
    assert reasons["no/copy.png"] == "conflicting labels: labelled no, a copy of yes/yes_000.png (yes)"
    assert reasons["yes/yes_000.png"] == "conflicting labels: labelled yes, a copy of no/copy.png (no)"
    assert "1 set(s) of copies under two labels left out" in result.metrics["protocol"]["label_conflicts"]


def test_a_class_with_one_image_is_an_error_with_its_count(data: Path, tmp_path: Path) -> None:
    index = _index(data, [*_rows(data)[:-1], (_rows(data)[-1][0], "yess")])
    code, output = run("train", "--index", index, "--out", tmp_path / "run", *TINY)
    assert code == 2 and "Class 'yess' has 1 image(s)" in output and "A typo in a label?" in output


def test_metrics_on_a_split_missing_a_class_say_so_instead_of_a_perfect_score() -> None:
    probs = np.array([[0.2, 0.8], [0.1, 0.9], [0.3, 0.7]])
    metrics = compute_metrics([1, 1, 1], probs, ["no", "yes"], protocol={})
    assert metrics["balanced_accuracy"] is None and metrics["specificity"] is None
    assert metrics["missing_classes"] == ["no"] and "no images of no" in metrics["note"]
    assert metrics["sensitivity"] == 1.0 and metrics["accuracy"] == 1.0


# ------------------------------------------------------------------------------------------------ index CSVs


def test_an_index_with_an_excel_byte_order_mark_or_in_utf16_reads(data: Path, tmp_path: Path) -> None:
    from brainscan.data.ingest import scan_dataset

    text = "path,label\n" + "".join(f"{p},{label}\n" for p, label in _rows(data))
    for encoding in ("utf-8-sig", "utf-16"):
        index = _index(data, [], text, encoding)
        assert len(scan_dataset(data, index=index).records) == 24


def test_index_paths_that_leave_the_data_folder_are_refused(data: Path, tmp_path: Path) -> None:
    for escape in ("../outside.png", "/etc/passwd", "yes/../../outside.png"):
        index = _index(data, [*_rows(data), (escape, "yes")])
        code, output = run("train", "--index", index, "--out", tmp_path / "run", *TINY)
        assert code == 2 and "lies outside the data folder" in output, escape


def test_index_that_is_not_text_or_has_a_huge_field_is_one_line_naming_the_file(data: Path, tmp_path: Path) -> None:
    index = data / "index.csv"
    index.write_bytes(b"path,label\n\xff\xfe\x00bad,yes\n")
    code, output = run("train", "--index", index, "--out", tmp_path / "run", *TINY)
    assert code == 2 and f"{index}: not UTF-8 text" in output
    index.write_text("path,label\n" + "x" * 200_000 + ",yes\n")
    code, output = run("train", "--index", index, "--out", tmp_path / "run", *TINY)
    assert code == 2 and f"{index}:2: not a readable CSV row" in output and "Traceback" not in output


# ---------------------------------------------------------------------------------------- the environment


def test_an_out_that_cannot_be_written_is_one_line_naming_the_folder(data: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    target = locked / "run" if os.geteuid() != 0 else Path("/sys/brainscan-test-run")  # root writes anywhere else
    try:
        code, output = run("train", "--data", data, "--out", target, *TINY)
    finally:
        locked.chmod(0o700)
    if code == 0:
        pytest.skip(f"{target} was writable here")
    assert code == 1 and output.startswith(f"error: {target}: ") and "Traceback" not in output
    assert "Permission denied" in output or "not permitted" in output or "Read-only" in output, output


def test_out_that_is_a_file_is_refused(data: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    code, output = run("train", "--data", data, "--out", tmp_path / "file", *TINY)
    assert code == 2 and "is a file, not a folder" in output and (tmp_path / "file").read_text() == "mine"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_stdout_on_a_full_disk_is_one_error_line(tmp_path: Path) -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "brainscan", "models"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120
        )
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 1 and line.startswith("error: ") and line.endswith("No space left on device")


def test_history_never_runs_ahead_of_the_checkpoint_that_resume_continues_from(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"

    def block_last_checkpoint(row: dict) -> None:  # epoch 2's last.pt cannot be written: a full disk, say
        (out / "last.pt").rename(out / "last-epoch-1.pt")
        (out / "last.pt").mkdir()

    cfg = config(data, out)
    cfg = RunConfig(cfg.data, cfg.out, cfg.model, TrainConfig(epochs=2, batch_size=8))
    with pytest.raises(OSError):
        train(cfg, on_epoch_end=block_last_checkpoint)
    with (out / "history.csv").open() as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1"]


def test_a_table_whose_rows_fail_halfway_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    from brainscan.files import write_csv

    target = write_csv(tmp_path / "split.csv", ["path"], [{"path": "a.png"}])

    def rows():  # noqa: ANN202 - a generator that fails as a full disk would
        yield {"path": "b.png"}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_csv(target, ["path"], rows())
    assert target.read_bytes() == b"path\r\na.png\r\n" and sorted(tmp_path.iterdir()) == [target]
