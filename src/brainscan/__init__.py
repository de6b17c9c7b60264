"""brainscan: brain-tumour MRI slice classification — research software, not a medical device.

The public names are imported on first use (PEP 562), so that ``brainscan predict`` and ``brainscan serve`` start
without importing what training and evaluation need (scikit-learn, matplotlib).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .about import DISCLAIMER, __version__

if TYPE_CHECKING:
    from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from .errors import BrainscanError
    from .evaluate import evaluate
    from .models import create_model, list_models
    from .predict import Prediction, Predictor
    from .progress import Progress
    from .train import train

_WHERE = {
    "BrainscanError": "errors",
    "DataConfig": "config",
    "ModelConfig": "config",
    "RunConfig": "config",
    "TrainConfig": "config",
    "evaluate": "evaluate",
    "create_model": "models",
    "list_models": "models",
    "Prediction": "predict",
    "Predictor": "predict",
    "Progress": "progress",
    "train": "train",
}

__all__ = [
    "__version__",
    "DISCLAIMER",
    "BrainscanError",
    "DataConfig",
    "ModelConfig",
    "Prediction",
    "Predictor",
    "Progress",
    "RunConfig",
    "TrainConfig",
    "create_model",
    "evaluate",
    "list_models",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'brainscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
