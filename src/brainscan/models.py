"""Model registry: our from-scratch CNN and torchvision backbones, each described by a :class:`ModelSpec`.

Builders are registered with :func:`register_model`; :func:`create_model` is the one entry point. The spec says
what normalisation the model expects, which module is the classifier (replaced for the dataset's classes and
trained alone while the backbone is frozen) and which layers Grad-CAM should look at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from .errors import BrainscanError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of brainscan needs to know about an architecture."""

    name: str
    builder: Callable[[], nn.Module]  # the architecture with its original head (ImageNet: 1000 classes)
    classifier: str  # dotted name of the final Linear layer
    cam_layers: tuple[str, ...]  # Grad-CAM target layers, last one first
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_enum: str | None = None  # torchvision weights enum name for the official pretrained download
    dropout_module: str | None = None  # dotted name of the Dropout before the classifier, if any
    # leading pretrained blocks (up to stride 4) that fine-tuning may leave frozen: generic edge and texture
    # filters whose backward pass, at full resolution, costs about half of a CPU training step
    early_layers: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add an architecture to the registry; a duplicate name is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise BrainscanError(f"Unknown model {name!r}; choose one of: {', '.join(list_models())}.")
    return _REGISTRY[name]


class SmallCNN(nn.Module):
    """A compact CNN trained from scratch: conv–BN–ReLU–max-pool blocks, adaptive pooling, dropout, linear.

    Each block halves the resolution and doubles the width, so most compute sits at low resolution (about
    100 training images/s at 128 px on two CPU cores).
    """

    def __init__(
        self, num_classes: int = 1000, channels: tuple[int, ...] = (16, 32, 64, 128, 256), dropout: float = 0.3
    ):
        super().__init__()
        blocks, in_ch = [], 3
        for out_ch in channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_ch),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_ch, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


register_model(
    ModelSpec(
        "cnn",
        SmallCNN,
        classifier="classifier.2",
        cam_layers=("features.4", "features.3"),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        dropout_module="classifier.1",
    )
)
register_model(
    ModelSpec(
        "mobilenet_v2",
        torchvision.models.mobilenet_v2,
        "classifier.1",
        ("features.18", "features.13", "features.6"),
        weights_enum="MobileNet_V2_Weights",
        dropout_module="classifier.0",
        early_layers=("features.0", "features.1", "features.2", "features.3"),
    )
)
register_model(
    ModelSpec(
        "mobilenet_v3_small",
        torchvision.models.mobilenet_v3_small,
        "classifier.3",
        ("features.12", "features.8"),
        weights_enum="MobileNet_V3_Small_Weights",
        dropout_module="classifier.2",
        early_layers=("features.0", "features.1"),
    )
)
register_model(
    ModelSpec(
        "mobilenet_v3_large",
        torchvision.models.mobilenet_v3_large,
        "classifier.3",
        ("features.16", "features.12"),
        weights_enum="MobileNet_V3_Large_Weights",
        dropout_module="classifier.2",
        early_layers=("features.0", "features.1", "features.2", "features.3"),
    )
)
register_model(
    ModelSpec(
        "resnet18",
        torchvision.models.resnet18,
        "fc",
        ("layer4", "layer3"),
        weights_enum="ResNet18_Weights",
        early_layers=("conv1", "bn1", "layer1"),
    )
)
register_model(
    ModelSpec(
        "resnet50",
        torchvision.models.resnet50,
        "fc",
        ("layer4", "layer3"),
        weights_enum="ResNet50_Weights",
        early_layers=("conv1", "bn1", "layer1"),
    )
)
register_model(
    ModelSpec(
        "efficientnet_b0",
        torchvision.models.efficientnet_b0,
        "classifier.1",
        ("features.8", "features.6"),
        weights_enum="EfficientNet_B0_Weights",
        dropout_module="classifier.0",
        early_layers=("features.0", "features.1", "features.2"),
    )
)


def replace_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``dotted`` inside ``model`` (e.g. ``features.0.0``)."""
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def check_weights(spec: ModelSpec, weights: str) -> Path | WeightsEnum:
    """Where ``weights`` come from, checked before anything is loaded: a state_dict file (its path), or an entry
    of the architecture's torchvision weights enum.

    Raises:
        BrainscanError: neither a file nor a weights name of ``spec``, naming the choices.
    """
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if spec.weights_enum is None:
        raise BrainscanError(f"{weights!r}: no such weights file, and {spec.name} has no torchvision weights.")
    enum = getattr(torchvision.models, spec.weights_enum)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))  # DEFAULT is also an alias member
        raise BrainscanError(f"{weights!r}: no such weights file, nor a {spec.weights_enum} name ({names}).") from None


def load_pretrained(model: nn.Module, spec: ModelSpec, weights: str) -> str:
    """Load ``weights`` into the original-head model: a state_dict file, or a torchvision weights name.

    Returns a description of where the weights came from (recorded in the checkpoint).
    """
    source = check_weights(spec, weights)
    if isinstance(source, Path):
        return _load_state_file(model, spec, source)
    try:
        model.load_state_dict(source.get_state_dict(progress=False, check_hash=True))
    except OSError as exc:  # no internet: urllib errors subclass OSError
        raise BrainscanError(
            f"Could not download {spec.weights_enum}.{source.name} ({exc}). "
            "Offline, pass --weights PATH to a state_dict."
        ) from exc
    return f"torchvision:{spec.weights_enum}.{source.name}"


def _load_state_file(model: nn.Module, spec: ModelSpec, path: Path) -> str:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BrainscanError(f"{path}: not a loadable state_dict ({type(exc).__name__}: {exc}).") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BrainscanError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}.")
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise BrainscanError(f"{path} does not fit {spec.name}: {'; '.join(problems)}.")
    return f"file:{path.name}"


def create_model(name: str, num_classes: int, weights: str | None = None, *, dropout: float | None = None) -> nn.Module:
    """Build a registered architecture with a fresh ``num_classes`` head.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the new classifier.
        weights: pretrained weights for the backbone — a state_dict file path, or a torchvision weights name
            (``DEFAULT``, ``IMAGENET1K_V1`` ...) downloaded by torchvision. None: random initialisation.
        dropout: overrides the dropout before the classifier.

    Example:
        >>> model = create_model("mobilenet_v2", 4)
        >>> model.classifier[1].out_features
        4
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise BrainscanError(f"Need at least two classes to train a classifier, got {num_classes}.")
    model = spec.builder()
    if weights:
        load_pretrained(model, spec, weights)
    old = model.get_submodule(spec.classifier)
    replace_module(model, spec.classifier, nn.Linear(old.in_features, num_classes))
    if dropout is not None and spec.dropout_module:
        replace_module(model, spec.dropout_module, nn.Dropout(dropout))
    return model


def head_parameters(model: nn.Module, spec: ModelSpec) -> list[nn.Parameter]:
    return list(model.get_submodule(spec.classifier).parameters())


def backbone_parameters(model: nn.Module, spec: ModelSpec) -> list[nn.Parameter]:
    head = {id(p) for p in head_parameters(model, spec)}
    return [p for p in model.parameters() if id(p) not in head]


def set_backbone_frozen(model: nn.Module, spec: ModelSpec, frozen: bool) -> None:
    """Freeze (or release) everything but the classifier; frozen BatchNorm layers keep their running statistics."""
    for p in backbone_parameters(model, spec):
        p.requires_grad_(not frozen)
    if frozen:
        head = model.get_submodule(spec.classifier)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module is not head:
                module.eval()


def freeze_early_layers(model: nn.Module, spec: ModelSpec) -> None:
    """Keep the spec's early pretrained blocks out of fine-tuning (no gradients, so no backward pass through them).

    Their BatchNorm layers stay in training mode, so normalisation still adapts to the new images.
    """
    for name in spec.early_layers:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
