"""brainscan: brain-tumour MRI slice classification — research software, not a medical device."""

from .about import DISCLAIMER, __version__
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .errors import BrainscanError
from .evaluate import evaluate
from .models import create_model, list_models
from .predict import Prediction, Predictor
from .progress import Progress
from .train import train

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
