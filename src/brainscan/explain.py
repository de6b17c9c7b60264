"""Class activation maps (Grad-CAM and relatives, via pytorch-grad-cam) and how well they point at the tumour.

:func:`explain` computes the map of one slice on the model's own input (the prepared square slice); layer-based
methods take their target layers from the model registry (:attr:`brainscan.models.ModelSpec.cam_layers`).
The default method, FullGrad, was chosen by measurement (see :data:`DEFAULT_METHOD`). :func:`overlay` and
:func:`save_overlay` draw it over the slice. :func:`localization_scores` scores maps against tumour bounding
boxes (pointing game, energy in box), mapping each box from the original image into the prepared slice through
the background crop, the square padding and the resize (:func:`slice_geometry`).

A map shows where the model's evidence lies, not where the tumour is: it is a check on the model, never a
segmentation. Research software, not a medical device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import (
    EigenCAM,
    EigenGradCAM,
    FullGrad,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torch.nn import functional as F

from .data.boxes import row_box
from .data.readers import ImageReadError, read_image
from .data.transforms import Box, to_model_input
from .errors import BrainscanError, unknown_choice
from .metrics import negative_class
from .models import get_spec, list_models
from .predict import ImageLike, Predictor, Skipped


def _rescale(values: np.ndarray) -> np.ndarray:
    """Each image's values (N×...) mapped onto [0, 1] jointly over all its channels and positions."""
    flat = values.reshape(len(values), -1)
    low = flat.min(axis=1).reshape(-1, *([1] * (values.ndim - 1)))
    high = flat.max(axis=1).reshape(-1, *([1] * (values.ndim - 1)))
    return (values - low) / (high - low + 1e-6)


class FullGradCAM(FullGrad):
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019) with the paper's post-processing.

    The map sums ``|input-gradient × input|`` and, for every bias layer (BatchNorm, biased Conv2d),
    ``|bias × gradient|``. As in the authors' implementation each term is rescaled to [0, 1] over all its channels
    and positions, summed over channels and upsampled once; pytorch-grad-cam's ``FullGrad`` instead upsamples and
    rescales every channel separately, which is about a hundred times slower on a CPU. Target layers are not
    used: every bias layer contributes.
    """

    def __init__(self, model: nn.Module, target_layers: list[nn.Module], reshape_transform: Any = None) -> None:
        super().__init__(model, [], reshape_transform)  # no target layers: FullGrad finds the bias layers itself

    def compute_cam_per_layer(self, input_tensor: torch.Tensor, target_category: Any, eigen_smooth: bool) -> np.ndarray:
        width, height = self.get_target_width_height(input_tensor)
        terms = [_rescale(np.abs(input_tensor.grad.cpu().numpy() * input_tensor.detach().cpu().numpy())).sum(axis=1)]
        for bias, grads in zip(self.bias_data, self.activations_and_grads.gradients, strict=True):
            terms.append(_rescale(np.abs(bias[None, :, None, None] * grads.cpu().numpy())).sum(axis=1))
        total = sum(
            F.interpolate(
                torch.from_numpy(t[:, None]).float(), size=(height, width), mode="bilinear", align_corners=True
            )
            for t in terms
        )
        return total.numpy()


METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "gradcam-elementwise": GradCAMElementWise,
    "fullgrad": FullGradCAM,
}
LAYERLESS = {"fullgrad"}  # methods that choose their own layers
# Chosen by the pointing game on Figshare (Cheng 2015) fold-1 test slices, MobileNetV2 fine-tuned at 160 px on the
# other folds, 534 correctly classified tumour slices: fullgrad 41.9% strict / 50.7% within 15 px (chance 2.9%);
# layercam on the registry layers (features.18, .13, .6) 30.1% / 36.7%; gradcam on features.18 20.2% / 30.1%.
# Layer combinations tuned on a 200-slice subsample (layercam features.3 + features.16: 37.2% there) fell back to
# 31-37% on the other slices; fullgrad has nothing to tune and held 43.6% on them.
DEFAULT_METHOD = "fullgrad"


@dataclass(frozen=True)
class Explanation:
    """One slice's class activation map.

    Attributes:
        image: the prepared slice the model saw (S×S ``uint8``).
        cam: the activation map on the same grid (S×S ``float32`` in [0, 1]).
        label: the predicted class.
        probability: the calibrated probability of the predicted class.
        target: the class the map explains (the predicted one unless another was asked for).
        target_probability: the calibrated probability of ``target``.
        method: the :data:`METHODS` name.
        layers: the target layers (dotted module names).
        path: the input file, when the input was a path.
    """

    image: np.ndarray
    cam: np.ndarray
    label: str
    probability: float
    target: str
    target_probability: float
    method: str
    layers: tuple[str, ...]
    path: str | None = None


# --------------------------------------------------------------------------------------------------- CAMs


def _torch_model(predictor: Predictor) -> nn.Module:
    model = getattr(predictor, "model", None)
    if not isinstance(model, nn.Module):
        raise BrainscanError("Class activation maps need the PyTorch model: load the predictor with backend='torch'.")
    return model


def model_arch(predictor: Predictor) -> str:
    """The registry name of the predictor's architecture.

    Uses ``predictor.arch`` (set by :meth:`Predictor.from_checkpoint`); a predictor built by hand without it is
    matched against the registry by module type and parameter names.

    Raises:
        BrainscanError: the model matches no registered architecture.
    """
    arch = getattr(predictor, "arch", None)
    if arch:
        return str(arch)
    model = _torch_model(predictor)
    keys = set(model.state_dict())
    for name in list_models():
        spec = get_spec(name)
        with torch.device("meta"):  # the architecture without allocating its weights
            candidate = spec.builder()
        if type(candidate) is type(model) and set(candidate.state_dict()) == keys:
            return name
    raise BrainscanError(
        f"Cannot tell which registered architecture this {type(model).__name__} is; pass layers=[...] explicitly."
    )


def resolve_layers(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """Dotted module names → the modules, with an error that lists the valid names."""
    modules = []
    for name in names:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError:
            examples = ", ".join(n for n, _ in list(model.named_modules())[1:7])
            raise BrainscanError(f"No layer {name!r} in {type(model).__name__} (layers are e.g. {examples}).") from None
    if not modules:
        raise BrainscanError("Give at least one target layer.")
    return modules


def check_method(method: str | None) -> str:
    """``method`` if it is a :data:`METHODS` name (None: :data:`DEFAULT_METHOD`); the one place an unknown name
    is refused, suggesting the nearest one."""
    if method is None:
        return DEFAULT_METHOD
    if method not in METHODS:
        raise unknown_choice("CAM method", method, METHODS)
    return method


def _method_class(method: str) -> type[BaseCAM]:
    return METHODS[check_method(method)]


def _target_index(predictor: Predictor, target: int | str) -> int:
    if isinstance(target, str):
        if target not in predictor.class_names:
            raise BrainscanError(f"Unknown target class {target!r}; classes: {', '.join(predictor.class_names)}.")
        return predictor.class_names.index(target)
    if not 0 <= int(target) < len(predictor.class_names):
        raise BrainscanError(f"Target index {target} is outside 0..{len(predictor.class_names) - 1}.")
    return int(target)


def layer_names(predictor: Predictor, method: str, layers: Sequence[str] | None = None) -> list[str]:
    """The target layers ``method`` uses: ``layers``, else the registry's ``cam_layers`` of the architecture;
    none for methods that pick their own (:data:`LAYERLESS`), which refuse ``layers``."""
    _method_class(method)  # an unknown method is an error even when layers are given
    if method in LAYERLESS:
        if layers:
            raise BrainscanError(f"{method} uses every bias layer of the model; it takes no target layers.")
        return []
    return list(layers) if layers is not None else list(get_spec(model_arch(predictor)).cam_layers)


def compute_cams(
    predictor: Predictor,
    slices: np.ndarray,
    *,
    method: str = DEFAULT_METHOD,
    targets: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """Activation maps for a batch of prepared slices, and the model's uncalibrated logits from the same pass.

    The model is left as it was found: its train/eval mode, ``requires_grad`` flags and ``.grad`` fields are
    restored, and the CAM's hooks are released. Gradients flow to the input only, never into the parameters.

    Args:
        predictor: the classifier.
        slices: ``uint8`` N×S×S prepared slices (:meth:`Predictor.prepare`).
        method: a :data:`METHODS` name.
        targets: the class index to explain for each slice (None: each slice's predicted class).
        layers: dotted names of the target layers (None: the registry's ``cam_layers`` of the architecture;
            :data:`LAYERLESS` methods take none).

    Returns:
        ``float32`` N×S×S maps in [0, 1], and the N×C logits.
    """
    cam_class = _method_class(method)
    model = _torch_model(predictor)
    names = layer_names(predictor, method, layers)
    modules = resolve_layers(model, names) if names else []
    if targets is not None and len(targets) != len(slices):
        raise BrainscanError(f"{len(targets)} targets for {len(slices)} slices.")
    device = next(model.parameters()).device
    batch = torch.from_numpy(np.array(slices, dtype=np.uint8)).unsqueeze(1).to(device)  # a writable copy
    inputs = to_model_input(batch, predictor.preprocess).requires_grad_(True)
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad(), cam_class(model=model, target_layers=modules) as cam:
            chosen = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
            maps = cam(input_tensor=inputs, targets=chosen)
            logits = cam.outputs.detach().float().cpu()
    finally:
        model.train(was_training)
        for p, (requires_grad, grad) in zip(params, saved, strict=True):
            p.requires_grad_(requires_grad)
            p.grad = grad
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    # pytorch-grad-cam divides by (max + 1e-7): maps of tiny activations (untrained models) end far below 1
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    maps = np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)
    return maps, logits


def explain(
    predictor: Predictor,
    image_or_path: ImageLike,
    *,
    method: str = DEFAULT_METHOD,
    target: int | str | None = None,
    layers: Sequence[str] | None = None,
) -> Explanation:
    """The class activation map of one slice.

    Args:
        predictor: the classifier (e.g. :meth:`Predictor.from_checkpoint`).
        image_or_path: a path (any supported format), PIL image or array, prepared as for prediction.
        method: a :data:`METHODS` name; the default (:data:`DEFAULT_METHOD`) was chosen by its pointing game on
            Figshare tumour boxes.
        target: class name or index to explain (None: the predicted class).
        layers: dotted names of the target layers (None: the registry's ``cam_layers``).

    Example:
        >>> p = Predictor.from_checkpoint("runs/figshare/best.pt")  # doctest: +SKIP
        >>> e = explain(p, "scan.jpg")  # doctest: +SKIP
        >>> save_overlay(e, "scan-cam.png")  # doctest: +SKIP
    """
    path = str(image_or_path) if isinstance(image_or_path, str | Path) else None
    prepared = predictor.prepare(image_or_path)
    return explain_slice(predictor, prepared, method=method, target=target, layers=layers, path=path)


def explain_slice(
    predictor: Predictor,
    prepared: np.ndarray,
    *,
    method: str = DEFAULT_METHOD,
    target: int | str | None = None,
    layers: Sequence[str] | None = None,
    path: str | None = None,
) -> Explanation:
    """:func:`explain` for a slice already prepared for the model (:meth:`Predictor.prepare`), e.g. one a server
    decoded once for both its prediction and its map."""
    wanted = None if target is None else _target_index(predictor, target)
    cams, logits = compute_cams(
        predictor, prepared[None], method=method, targets=None if wanted is None else [wanted], layers=layers
    )
    probs = (logits[0] / predictor.temperature).softmax(0).numpy()
    index = int(np.argmax(probs))
    explained = index if wanted is None else wanted
    names = layer_names(predictor, method, layers)
    return Explanation(
        image=prepared,
        cam=cams[0],
        label=predictor.class_names[index],
        probability=float(probs[index]),
        target=predictor.class_names[explained],
        target_probability=float(probs[explained]),
        method=method,
        layers=tuple(names),
        path=path,
    )


# ------------------------------------------------------------------------------------------------ overlays


def overlay(explanation: Explanation, *, colormap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """The map in ``colormap`` blended over the gray slice: RGB ``uint8`` S×S×3.

    The colour's weight grows with the map (``alpha`` at its maximum), so the anatomy stays visible where the
    model's evidence is weak.
    """
    import matplotlib

    cam = np.clip(np.asarray(explanation.cam, dtype=np.float32), 0.0, 1.0)
    heat = matplotlib.colormaps[colormap](cam)[..., :3]
    gray = np.repeat((np.asarray(explanation.image, dtype=np.float32) / 255.0)[..., None], 3, axis=-1)
    weight = alpha * (0.35 + 0.65 * cam)[..., None]
    blended = (1.0 - weight) * gray + weight * heat
    return np.rint(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_overlay(explanation: Explanation, path: str | Path, *, colormap: str = "jet", alpha: float = 0.5) -> Path:
    """Write :func:`overlay` as a PNG file (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(explanation, colormap=colormap, alpha=alpha), mode="RGB").save(path, format="PNG")
    return path


def overlay_paths(inputs: Sequence[str | Path], out: str | Path, *, method: str) -> list[Path]:
    """Where each input's overlay goes: ``out`` itself when it is a ``.png`` file name and there is one input;
    otherwise ``out/<input stem>-<method>.png`` (``-2``, ``-3`` appended when inputs share a stem).

    Raises:
        BrainscanError: ``out`` names one ``.png`` file but several inputs were given.
    """
    out = Path(out)
    if out.suffix.lower() == ".png" and not out.is_dir():
        if len(inputs) != 1:
            raise BrainscanError(
                f"{out} names one overlay file but {len(inputs)} images were given; give a folder instead "
                f"(one <image>-{method}.png per image)."
            )
        return [out]
    taken: set[str] = set()
    paths = []
    for path in map(Path, inputs):
        name, n = f"{path.stem}-{method}.png", 1
        while name in taken:  # the same file name in two folders
            n += 1
            name = f"{path.stem}-{method}-{n}.png"
        taken.add(name)
        paths.append(out / name)
    return paths


@dataclass(frozen=True)
class SavedOverlay:
    """An input's explanation and the overlay PNG written for it."""

    explanation: Explanation
    path: Path


def explain_files(
    predictor: Predictor,
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    method: str | None = None,
    target: int | str | None = None,
    layers: Sequence[str] | None = None,
) -> Iterator[SavedOverlay | Skipped]:
    """Explain each file and write its overlay where :func:`overlay_paths` says, in input order; a file that
    cannot be read yields :class:`~brainscan.predict.Skipped` with the reason and the others go on.

    The method and the overlay names are checked before any map is computed.

    Example:
        >>> for done in explain_files(predictor, discover_images(["scans/"]), "cams"):  # doctest: +SKIP
        ...     print(done.path if isinstance(done, SavedOverlay) else f"skipped {done.path}: {done.reason}")
    """
    method = check_method(method)
    destinations = overlay_paths(paths, out, method=method)
    return _explain_each(predictor, zip(paths, destinations, strict=True), method, target, layers)


def _explain_each(
    predictor: Predictor,
    jobs: Iterable[tuple[str | Path, Path]],
    method: str,
    target: int | str | None,
    layers: Sequence[str] | None,
) -> Iterator[SavedOverlay | Skipped]:
    for path, destination in jobs:
        try:
            explanation = explain(predictor, path, method=method, target=target, layers=layers)
        except ImageReadError as exc:
            yield Skipped(str(path), exc.reason)
            continue
        yield SavedOverlay(explanation, save_overlay(explanation, destination))


# ----------------------------------------------------------------------------------------------- geometry


# ------------------------------------------------------------------------------------------- localisation


def box_mask(shape: tuple[int, int], box: Box) -> np.ndarray:
    """Boolean mask of the pixels whose centres lie inside ``box`` (inclusive edges)."""
    rows = np.arange(shape[0]) + 0.5
    cols = np.arange(shape[1]) + 0.5
    inside_r = (rows >= box[1]) & (rows <= box[3])
    inside_c = (cols >= box[0]) & (cols <= box[2])
    return inside_r[:, None] & inside_c[None, :]


def pointing_game(cam: np.ndarray, box: Box, tolerance_px: float = 0) -> bool:
    """Whether the map's maximum lies in ``box`` or within ``tolerance_px`` of it (Zhang et al. 2018).

    The maximum is the centre of the first maximal pixel (row-major). A constant map points nowhere: a miss.

    Args:
        cam: H×W map.
        box: ``(x0, y0, x1, y1)`` in the map's pixels.
        tolerance_px: allowed distance from the box, in the map's pixels (the customary 15 px at 512 px).
    """
    cam = np.asarray(cam, dtype=np.float64)
    if not np.isfinite(cam).all() or cam.max() <= cam.min():
        return False
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    x, y = col + 0.5, row + 0.5
    dx = max(box[0] - x, 0.0, x - box[2])
    dy = max(box[1] - y, 0.0, y - box[3])
    return math.hypot(dx, dy) <= tolerance_px


def energy_in_box(cam: np.ndarray, box: Box) -> float:
    """The share of the map's total (non-negative) mass inside ``box`` (Wang et al. 2020, Score-CAM); 0 for an
    empty map."""
    cam = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float64)), 0.0, None)
    total = cam.sum()
    return float(cam[box_mask(cam.shape, box)].sum() / total) if total > 0 else 0.0


@dataclass
class BoxedSlices:
    """Prepared tumour slices with their boxes mapped into slice pixels, ready for scoring maps."""

    slices: np.ndarray  # N×S×S uint8
    boxes: list[Box]  # in slice pixels
    tolerances: np.ndarray  # the tolerant pointing game's distance in each slice's pixels
    targets: np.ndarray  # true class index
    paths: list[str]


def load_boxed_slices(
    predictor: Predictor,
    rows: Iterable[Mapping[str, Any]],
    *,
    root: str | Path | None = None,
    tolerance_px: float = 15.0,
    limit: int | None = None,
    seed: int = 0,
) -> BoxedSlices:
    """Read the tumour rows that carry a box and prepare them as the predictor does (see
    :func:`localization_scores` for the arguments)."""
    negative = negative_class(predictor.class_names)
    candidates = []
    for row in rows:
        box = row_box(row)
        label = row.get("label")
        if box is None or label not in predictor.class_names:
            continue
        if negative is not None and predictor.class_names.index(label) == negative:
            continue
        candidates.append((Path(root) / row["path"] if root else Path(row["path"]), label, box))
    if limit is not None and len(candidates) > limit:
        pick = np.sort(np.random.default_rng(seed).choice(len(candidates), size=limit, replace=False))
        candidates = [candidates[i] for i in pick]
    pre = predictor.preprocess
    slices, boxes, tolerances = [], [], []
    for path, _, box in candidates:
        gray = read_image(path)
        geometry = pre.geometry(gray)
        slices.append(pre.prepare(gray))
        boxes.append(geometry.yolo_box_to_slice(*box))
        tolerances.append(tolerance_px * geometry.scale)
    size = pre.image_size
    return BoxedSlices(
        np.stack(slices) if slices else np.zeros((0, size, size), np.uint8),
        boxes,
        np.asarray(tolerances, dtype=np.float64),
        np.array([predictor.class_names.index(label) for _, label, _ in candidates], dtype=np.int64),
        [str(path) for path, _, _ in candidates],
    )


def score_boxed_slices(
    predictor: Predictor,
    boxed: BoxedSlices,
    *,
    method: str = DEFAULT_METHOD,
    layers: Sequence[str] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Localisation scores of ``method`` on prepared boxed slices; see :func:`localization_scores`."""
    names = layer_names(predictor, method, layers)
    hits, tolerant, energy, chance, wrong = [], [], [], [], 0
    for start in range(0, len(boxed.slices), batch_size):
        stop = start + batch_size
        targets = boxed.targets[start:stop]
        cams, logits = compute_cams(
            predictor, boxed.slices[start:stop], method=method, targets=targets.tolist(), layers=names
        )
        predicted = logits.argmax(1).numpy()
        for cam, box, tol, want, got in zip(
            cams, boxed.boxes[start:stop], boxed.tolerances[start:stop], targets, predicted, strict=True
        ):
            if want != got:
                wrong += 1
                continue
            hits.append(pointing_game(cam, box))
            tolerant.append(pointing_game(cam, box, float(tol)))
            energy.append(energy_in_box(cam, box))
            chance.append(float(box_mask(cam.shape, box).mean()))
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    return {
        "pointing_game": mean(hits),
        "pointing_game_tolerant": mean(tolerant),
        "energy_in_box": mean(energy),
        "chance": mean(chance),
        "n": len(hits),
        "n_candidates": len(boxed.slices),
        "n_misclassified": wrong,
        "method": method,
        "layers": names,
    }


def localization_scores(
    predictor: Predictor,
    rows: Iterable[Mapping[str, Any]],
    *,
    root: str | Path | None = None,
    method: str = DEFAULT_METHOD,
    layers: Sequence[str] | None = None,
    tolerance_px: float = 15.0,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Pointing game and energy in box over the correctly classified tumour slices of ``rows``.

    Each map explains the true (= predicted) class; each box is mapped from the original image into the
    prepared slice (:func:`slice_geometry`).

    Args:
        predictor: the classifier.
        rows: index rows with ``path``, ``label`` and ``box_x_center, box_y_center, box_width, box_height``
            normalised to the original image. Rows without a box, of the 'no tumour' class or of a class the
            model does not know are left out.
        root: folder that relative paths are relative to.
        method: a :data:`METHODS` name.
        layers: target layers (None: the registry's ``cam_layers``).
        tolerance_px: the tolerant pointing game's distance, in ORIGINAL image pixels (15 px at 512 px is
            customary); scaled into each slice.
        limit: score a seeded random subsample of at most this many candidate rows (before the correctness filter).
        seed: the subsample's seed.
        batch_size: slices per forward/backward pass.

    Returns:
        ``pointing_game`` (strict), ``pointing_game_tolerant``, ``energy_in_box``, ``chance`` (mean box area
        fraction of the slice: the expected strict pointing game and energy of a uniform map), ``n`` (slices
        scored), ``n_candidates``, ``n_misclassified``, ``method``, ``layers``, ``tolerance_px``. Scores are
        None when nothing was scored.
    """
    boxed = load_boxed_slices(predictor, rows, root=root, tolerance_px=tolerance_px, limit=limit, seed=seed)
    scores = score_boxed_slices(predictor, boxed, method=method, layers=layers, batch_size=batch_size)
    return {**scores, "tolerance_px": tolerance_px}
