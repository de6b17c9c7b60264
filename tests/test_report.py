"""Run reports are self-contained HTML with every section and decodable images; their numbers (bootstrap
intervals, calibration error, MACs) are right; comparisons refuse runs evaluated under different protocols."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18
from typer.testing import CliRunner

from brainscan import DataConfig, ModelConfig, RunConfig, TrainConfig, train
from brainscan.cli import app
from brainscan.compare import compare_runs, count_macs
from brainscan.errors import BrainscanError
from brainscan.report import SECTION_IDS, write_report

from .conftest import synthetic_slice, write_class_folders


def write_boxed_dataset(root: Path, n_per_class: int = 24, size: int = 48, seed: int = 0) -> Path:
    """Class folders yes/ no/ plus an index.csv whose 'yes' rows carry the bright blob's box (YOLO, normalised)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in ("no", "yes"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            image = synthetic_slice("no", rng, size)
            box = ["", "", "", ""]
            if label == "yes":
                cy, cx = rng.uniform(0.35, 0.65, 2) * size
                yy, xx = np.mgrid[:size, :size]
                blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.12 * size) ** 2
                image = np.clip(image + 140.0 * blob, 0, 255).astype(np.uint8)
                r = 0.12 * size
                box = [f"{cx / size:.4f}", f"{cy / size:.4f}", f"{2 * r / size:.4f}", f"{2 * r / size:.4f}"]
            path = f"{label}/{label}_{i:03d}.png"
            Image.fromarray(image).save(root / path)
            rows.append([path, label, *box])
    with (root / "index.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "box_x_center", "box_y_center", "box_width", "box_height"])
        writer.writerows(rows)
    return root


def tiny_run(data: Path, out: Path, *, index: Path | None = None, **train_kwargs) -> Path:
    config = RunConfig(
        data=DataConfig(root=str(data), index=str(index) if index else None, image_size=32),
        out=str(out),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 0, **train_kwargs}),
    )
    return train(config).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two runs under one protocol (boxed data, different learning rates) and one on other data."""
    base = tmp_path_factory.mktemp("runs")
    boxed = write_boxed_dataset(base / "boxed")
    other = write_class_folders(base / "other", {"yes": 30, "no": 30}, seed=1)
    return {
        "boxed": tiny_run(boxed, base / "boxed-run", index=boxed / "index.csv"),
        "boxed_slow": tiny_run(boxed, base / "boxed-slow", index=boxed / "index.csv", lr=1e-3),
        "other": tiny_run(other, base / "other-run"),
    }


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section":
            self.sections.append(values.get("id") or "")
        if tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("href", "src"):
            if values.get(key) and not values[key].startswith("data:"):
                self.urls.append(values[key])


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def assert_images_decode(sources: list[str]) -> None:
    prefix = "data:image/png;base64,"
    assert sources, "the page embeds figures"
    for src in sources:
        assert src.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True))) as image:
            image.verify()
            assert image.format == "PNG"


def test_report_is_self_contained_html_with_every_section(runs: dict[str, Path], tmp_path: Path) -> None:
    out = write_report(runs["boxed"], tmp_path / "report.html", n_resamples=50)
    page = parse(out)
    assert set(SECTION_IDS) <= set(page.sections)
    assert not page.urls, "no external resources: the page opens offline"
    assert_images_decode(page.images)
    assert "not a medical device" in out.read_text()

    numbers = json.loads(out.with_suffix(".json").read_text())
    assert 0 <= numbers["ece_before"] <= 1 and 0 <= numbers["ece_after"] <= 1
    assert numbers["temperature"] > 0
    recorded = json.loads((runs["boxed"] / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc"):
        entry = numbers["metrics"][key]
        assert entry["value"] == pytest.approx(recorded[key], abs=1e-6), "rebuilt predictions agree with training"
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    localization = numbers["localization"]
    assert {"pointing_game", "pointing_game_tolerant", "energy_in_box", "chance", "n"} <= set(localization)


def test_report_without_boxes_says_localisation_was_not_scored(runs: dict[str, Path], tmp_path: Path) -> None:
    out = write_report(runs["other"], tmp_path / "other.html", n_resamples=20, gallery_size=4)
    assert json.loads(out.with_suffix(".json").read_text())["localization"] is None
    assert set(SECTION_IDS) <= set(parse(out).sections)
    assert "carries no tumour boxes" in out.read_text()


def test_report_of_a_folder_that_is_not_a_run_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(BrainscanError, match="no best.pt"):
        write_report(tmp_path)


def test_compare_puts_runs_side_by_side(runs: dict[str, Path], tmp_path: Path) -> None:
    out = compare_runs([runs["boxed"], runs["boxed_slow"]], tmp_path / "compare.html", n_resamples=20)
    page = parse(out)
    assert {"disclaimer", "protocol", "comparison", "chart"} <= set(page.sections)
    assert "protocol-warning" not in page.sections
    assert not page.urls
    assert_images_decode(page.images)
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert [r["name"] for r in numbers["runs"]] == ["boxed-run", "boxed-slow"]
    for run in numbers["runs"]:
        assert run["parameters"] > 0 and run["macs"] > 0 and run["images_per_second"] > 0
        assert run["train_seconds"] is not None and run["metrics"]["accuracy"]["value"] is not None


def test_compare_refuses_runs_under_different_protocols_unless_allowed(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BrainscanError, match="different protocols"):
        compare_runs([runs["boxed"], runs["other"]], tmp_path / "refused.html", n_resamples=10)
    assert not (tmp_path / "refused.html").exists()
    out = compare_runs([runs["boxed"], runs["other"]], tmp_path / "warned.html", allow_mismatch=True, n_resamples=10)
    assert "protocol-warning" in parse(out).sections
    assert json.loads(out.with_suffix(".json").read_text())["protocol_mismatch"]


def test_report_and_compare_commands(runs: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    reported = runner.invoke(
        app, ["report", str(runs["other"]), "--out", str(tmp_path / "r.html"), "--resamples", "10"]
    )
    assert reported.exit_code == 0, reported.output
    assert (tmp_path / "r.html").is_file() and (tmp_path / "r.json").is_file()
    refused = runner.invoke(app, ["compare", str(runs["boxed"]), str(runs["other"]), "--out", str(tmp_path / "c.html")])
    assert refused.exit_code == 2 and "--allow-mismatch" in refused.output


def test_compare_page_escapes_names_it_did_not_write(runs: dict[str, Path], tmp_path: Path) -> None:
    hostile = tmp_path / "<img src=x onerror=alert(1)>"
    shutil.copytree(runs["boxed"], hostile)
    out = compare_runs([runs["boxed"], hostile], tmp_path / "escaped.html", n_resamples=10)
    page = out.read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_report_bootstrap_says_what_it_resampled(runs: dict[str, Path], tmp_path: Path) -> None:
    out = write_report(runs["boxed"], tmp_path / "r.html", n_resamples=10, gallery_size=0)
    bootstrap = json.loads(out.with_suffix(".json").read_text())["bootstrap"]
    assert bootstrap["resampling"] == "images (every image is its own group)"  # generated slices: no duplicates
    assert bootstrap["resampling"] in out.read_text()


def test_macs_of_a_known_network() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8×16×16 outputs × 3·3·3
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 8×16×16 × 1·3·3
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),  # 4 × 8
    )
    model.train()
    assert count_macs(model, (3, 16, 16)) == 8 * 256 * 27 + 8 * 256 * 9 + 32
    assert model.training and not any(m._forward_hooks for m in model.modules())


def test_macs_agree_with_torchvisions_published_operation_counts() -> None:
    weights = ResNet18_Weights.IMAGENET1K_V1  # meta only: nothing is downloaded
    assert count_macs(resnet18(), (3, 224, 224)) / 1e9 == pytest.approx(weights.meta["_ops"], rel=0.01)
