"""The demo: the whole pipeline on the sample shipped inside the package, offline, in a few minutes on a CPU."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from .checkpoint import RUN_FILES
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .data.splits import read_split_file
from .errors import BrainscanError
from .evaluate import evaluate
from .predict import Predictor
from .progress import Progress, no_progress
from .train import PLOTS, train

log = logging.getLogger(__name__)


def sample_dir() -> Path:
    """Folder of the embedded Figshare sample (``index.csv``, ``images/``, ``LICENSE.md``)."""
    return Path(str(resources.files("brainscan") / "sample"))


def demo_config(out: str | Path) -> RunConfig:
    """The demo recipe: the from-scratch CNN (no weights file needed) at 128 px on the sample's patient-wise split."""
    sample = sample_dir()
    return RunConfig(
        data=DataConfig(index=str(sample / "index.csv"), group_column="cv_fold", image_size=128),
        out=str(out),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(epochs=20, batch_size=16, lr=2e-3, seed=0),
    )


def run_demo(out: str | Path = "runs/demo", *, progress: Progress = no_progress) -> dict[str, Any]:
    """Train on the sample, evaluate on its held-out fold and predict one held-out slice — the same calls as the
    CLI. Returns the run directory, the test metrics and the prediction with the slice's true label.

    An existing run directory at ``out`` is replaced only if it holds a previous demo.
    """
    out = Path(out)
    if (out / "config.yaml").exists():
        previous = RunConfig.load(out / "config.yaml")
        if previous.data.index != demo_config(out).data.index:
            raise BrainscanError(f"{out} holds another run; choose another --out for the demo.")
        # what a demo (and a report on it) writes; anything else stays, and the run refuses the folder
        for name in (*RUN_FILES, *PLOTS, "evaluate-test.json", "report.html", "report.json"):
            (out / name).unlink(missing_ok=True)
    result = train(demo_config(out), progress=progress)
    metrics = evaluate(result.best_checkpoint, split="test", progress=progress)
    held_out = next(row for row in read_split_file(result.run_dir / "split.csv") if row["split"] == "test")
    prediction = Predictor.from_checkpoint(result.best_checkpoint).predict(sample_dir() / held_out["path"]).to_dict()
    prediction["true_label"] = held_out["label"]
    log.info("Predicted held-out %s: %s (true: %s)", held_out["path"], prediction["label"], held_out["label"])
    return {"run_dir": str(result.run_dir), "metrics": metrics, "prediction": prediction}
