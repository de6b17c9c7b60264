"""brainscan: brain-tumour MRI slice classification — research software, not a medical device."""

__version__ = "0.1.0"

DISCLAIMER = "Research software, not a medical device: brainscan's outputs must not be used for diagnosis or treatment."

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from .errors import BrainscanError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .predict import Prediction, Predictor  # noqa: E402
from .train import train  # noqa: E402

__all__ = [
    "DISCLAIMER",
    "BrainscanError",
    "DataConfig",
    "ModelConfig",
    "Prediction",
    "Predictor",
    "RunConfig",
    "TrainConfig",
    "create_model",
    "evaluate",
    "list_models",
    "train",
]
