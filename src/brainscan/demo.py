"""The demo: the whole pipeline on the sample shipped inside the package, offline, in a few minutes on a CPU."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .console import info
from .evaluate import evaluate
from .predict import Predictor
from .train import train


def sample_dir() -> Path:
    """Folder of the embedded Figshare sample (``index.csv``, ``images/``, ``LICENSE.md``)."""
    return Path(str(resources.files("brainscan") / "sample"))


def demo_config(out: str | Path, *, quiet: bool = False) -> RunConfig:
    """The demo recipe: the from-scratch CNN (no weights file needed) at 128 px on the sample's patient-wise split."""
    sample = sample_dir()
    return RunConfig(
        data=DataConfig(index=str(sample / "index.csv"), group_column="cv_fold", image_size=128),
        out=str(out),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(epochs=20, batch_size=16, lr=2e-3, seed=0),
        quiet=quiet,
    )


def run_demo(out: str | Path = "runs/demo", *, quiet: bool = False) -> dict[str, Any]:
    """Train on the sample, evaluate on its held-out fold and predict one slice — the same calls as the CLI.

    An existing demo run directory at ``out`` is replaced only if it holds a previous demo.
    """
    out = Path(out)
    if (out / "last.pt").exists():
        previous = RunConfig.load(out / "config.yaml") if (out / "config.yaml").exists() else None
        if previous is None or previous.data.index != str(sample_dir() / "index.csv"):
            from .errors import BrainscanError

            raise BrainscanError(f"{out} holds another run; choose another --out for the demo.")
        for name in ("last.pt", "best.pt"):
            (out / name).unlink(missing_ok=True)
    result = train(demo_config(out, quiet=quiet))
    metrics = evaluate(result.best_checkpoint, split="test", quiet=quiet)
    example = next(p for p in sorted((sample_dir() / "images").rglob("*.jpg")))
    prediction = Predictor.from_checkpoint(result.best_checkpoint).predict(example).to_dict()
    info(f"Predicted {example.name}: {prediction['label']}", quiet=quiet)
    return {"run_dir": str(result.run_dir), "metrics": metrics, "prediction": prediction}
