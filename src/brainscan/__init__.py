"""brainscan: brain-tumour MRI slice classification — research software, not a medical device.

The public names are imported on first use (PEP 562), so that ``brainscan predict`` and ``brainscan serve`` start
without importing what training and evaluation need (scikit-learn, matplotlib).
"""

from __future__ import annotations

import importlib
import sys
import types
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


class _Face(types.ModuleType):
    """Importing the submodule ``brainscan.train`` (or ``brainscan.evaluate``) binds it to the package under the
    name of the public function it defines; keep the function there, as an eager import would have."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'brainscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
