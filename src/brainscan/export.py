"""Export a checkpoint to ONNX or TorchScript, verified against PyTorch at export time.

The exported graph takes prepared slices as ``float32`` N×1×S×S in 0..255 and returns logits: normalisation and
channel expansion (folded into the first convolution where it can be) are inside the graph, so a runtime needs
no torch. Class names, preprocessing and calibration are written beside it (``<name>.json``) and, for ONNX, also
into the model's metadata.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import data_root, load_checkpoint
from .data.ingest import load_images
from .data.splits import read_split_file
from .data.transforms import Preprocess
from .errors import BrainscanError
from .models import replace_module

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
PARITY_TOLERANCE = 1e-4


class GreyStem(nn.Module):
    """A model's first convolution, applied to the grey slice instead of its normalised three-channel copy.

    With the same normalisation on every channel, x·a − b, the channels are identical: the stem's weights sum
    over them, the scale joins the weights, the offset joins the bias, and zero padding of the normalised image
    becomes padding of the raw one with b / a. Same output (to float rounding), a third of the widest layer's
    input, and the convolution still fuses with the BatchNorm after it.
    """

    def __init__(self, conv: nn.Conv2d, scale: float, shift: float) -> None:
        super().__init__()
        weight = conv.weight.detach().sum(1, keepdim=True)
        self.pad = [p for p in reversed(conv.padding) for _ in (0, 1)]  # F.pad order: last dimension first
        self.fill = shift / scale
        # skip_init: drawing initial weights would move the global RNG, and with it a training run that validates
        # through this graph
        self.conv = nn.utils.skip_init(
            nn.Conv2d, 1, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation, device=weight.device
        )
        self.conv.weight.data = weight * scale
        bias = torch.zeros_like(weight[:, 0, 0, 0]) if conv.bias is None else conv.bias.detach()
        self.conv.bias.data = bias - shift * weight.sum((1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.pad(x, self.pad, value=self.fill))


def _stem(model: nn.Module, channels: int, size: int) -> str | None:
    """Dotted name of the convolution that reads the model's input directly, when it can be folded."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return None
    name, conv = first
    if (
        conv.groups != 1
        or conv.in_channels != channels
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
    ):
        return None
    seen: list[bool] = []
    x = torch.zeros(1, channels, size, size, device=conv.weight.device)
    hook = conv.register_forward_pre_hook(lambda _, args: seen.append(args[0] is x))
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)  # eval: the probe must not move BatchNorm's running statistics
    finally:
        hook.remove()
        model.train(training)
    return name if seen == [True] else None


class ExportWrapper(nn.Module):
    """Raw slice (N×1×S×S, 0..255) → logits, with the checkpoint's normalisation baked in.

    Where every channel is normalised alike (the ``cnn``) and the model's first layer is a plain convolution of
    its input, the grey-to-channels expansion is folded into it (:class:`GreyStem`, on a copy of the model unless
    ``owned`` says the caller's model is already a private copy).
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess, *, owned: bool = False) -> None:
        super().__init__()
        self.channels = preprocess.channels
        scale = 1.0 / (255.0 * torch.tensor(preprocess.std))
        shift = torch.tensor(preprocess.mean) / torch.tensor(preprocess.std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", shift.view(1, -1, 1, 1))
        uniform = len(set(preprocess.mean)) == 1 and len(set(preprocess.std)) == 1
        stem = _stem(model, self.channels, preprocess.image_size) if uniform else None
        self.folded = stem is not None
        if stem is not None:
            model = model if owned else copy.deepcopy(model)
            replace_module(model, stem, GreyStem(model.get_submodule(stem), float(scale[0]), float(shift[0])))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self.model(x)
        x = x.expand(-1, self.channels, -1, -1)
        return self.model(x * self.scale - self.shift)


def exported_path(checkpoint: str | Path, fmt: str) -> Path:
    """Where :func:`export_model` writes ``fmt`` for ``checkpoint`` by default (beside it, same stem)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIX[fmt])


def metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    return {
        "arch": ckpt["arch"],
        "class_names": ckpt["class_names"],
        "preprocess": ckpt["preprocess"],
        "calibration": ckpt.get("calibration", {"temperature": 1.0}),
        "operating_point": ckpt.get("operating_point") or None,
        "input": "float32 N×1×S×S prepared slice in 0..255 (see brainscan.data.transforms.prepare_slice)",
        "output": "logits N×C (divide by calibration.temperature before softmax)",
    }


def export_model(
    checkpoint: str | Path,
    *,
    fmt: str = "onnx",
    out: str | Path | None = None,
    check_slices: np.ndarray | None = None,
) -> Path:
    """Export ``checkpoint`` and verify the result reproduces PyTorch within 1e-4 on ``check_slices``.

    Args:
        checkpoint: a brainscan checkpoint.
        fmt: ``onnx`` or ``torchscript``.
        out: output file (default: beside the checkpoint, e.g. ``best.onnx``).
        check_slices: prepared ``uint8`` slices (N×S×S) to compare on, ideally real images; default: the run's
            test images when available, else seeded noise.

    Raises:
        BrainscanError: unknown format, or outputs that differ from PyTorch by more than 1e-4.
    """
    from .predict import Predictor

    if fmt not in FORMATS:
        raise BrainscanError(f"Unknown export format {fmt!r}; choose {' or '.join(FORMATS)}.")
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    wrapper = ExportWrapper(predictor.model, predictor.preprocess).eval()
    size = predictor.preprocess.image_size
    out = Path(out) if out else exported_path(checkpoint, fmt)
    if fmt == "onnx":
        _write_onnx(wrapper, size, str(out))
        _add_onnx_metadata(out, metadata(ckpt))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer deprecation chatter
            traced = torch.jit.trace(wrapper, torch.zeros(2, 1, size, size))
        torch.jit.save(traced, str(out), _extra_files={"brainscan.json": json.dumps(metadata(ckpt))})

    if check_slices is None:
        check_slices = np.random.default_rng(0).integers(0, 256, (4, size, size), dtype=np.uint8)
    exported = Predictor.from_checkpoint(
        checkpoint, device="cpu", backend="onnxruntime" if fmt == "onnx" else "torchscript", model_path=out
    )
    reference = predictor.raw_logits(check_slices)
    candidate = exported.raw_logits(check_slices)
    diff = float(np.abs(reference - candidate).max())
    if diff > PARITY_TOLERANCE:
        out.unlink()
        raise BrainscanError(
            f"Exported {fmt} logits differ from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE}); not written."
        )
    out.with_suffix(".json").write_text(json.dumps(metadata(ckpt), indent=2))
    return out


def _write_onnx(wrapper: ExportWrapper, size: int, target: str | io.BytesIO) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter
        torch.onnx.export(
            wrapper,
            (torch.zeros(2, 1, size, size),),
            target,
            input_names=["slices"],
            output_names=["logits"],
            dynamic_axes={"slices": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def onnx_bytes(model: nn.Module, preprocess: Preprocess) -> bytes:
    """An in-memory ONNX graph of ``model`` (a CPU copy in eval mode; ``model`` itself is left as it is)."""
    wrapper = ExportWrapper(copy.deepcopy(model).cpu().float().eval(), preprocess, owned=True).eval()
    buffer = io.BytesIO()
    _write_onnx(wrapper, preprocess.image_size, buffer)
    return buffer.getvalue()


def _add_onnx_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "brainscan", json.dumps(meta)
    onnx.save(model, str(path))


def reference_slices(checkpoint: str | Path, *, limit: int = 16) -> np.ndarray | None:
    """Up to ``limit`` prepared real test images of the checkpoint's run, for parity checks; None if unavailable."""
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    root, split_file = data_root(ckpt), checkpoint.parent / "split.csv"
    if root is None or not split_file.is_file():
        return None
    rows = [r for r in read_split_file(split_file) if r["split"] == "test"][:limit]
    pre = Preprocess.from_dict(ckpt["preprocess"])
    table = load_images(
        [root / r["path"] for r in rows], image_size=pre.image_size, crop_background=pre.crop_background
    )
    return table.images if len(table.images) else None
