"""Forward passes: a :class:`Backend` turns prepared ``uint8`` slices into logits — eager PyTorch, ONNX Runtime
or TorchScript — and the ONNX graph they share with export (normalisation baked in, :class:`ExportWrapper`).

Prediction (:mod:`brainscan.predict`), export (:mod:`brainscan.export`) and training's forward-only passes all
build on this module; it imports none of them.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .data.readers import optional_import
from .data.transforms import Preprocess, resize_batch, to_model_input
from .errors import BrainscanError, display_path
from .hardware import available_cpus
from .models import replace_module

SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
METADATA_KEY = "brainscan"  # an ONNX model's metadata_props entry holding the export metadata (JSON)
TORCHSCRIPT_METADATA = "brainscan.json"  # the same, as a TorchScript extra file
PARITY_TOLERANCE = 1e-4  # max abs logit difference an ONNX/TorchScript graph may have from the eager model


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BrainscanError(f"device {device!r} requested but CUDA is not available.")
    return torch.device(device)


class Backend(Protocol):
    name: str

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        """Prepared ``uint8`` slices N×S×S → float32 logits N×C."""
        ...


class TorchBackend:
    name = "torch"

    def __init__(
        self, model: nn.Module, preprocess: Preprocess, device: torch.device, *, input_size: int | None = None
    ) -> None:
        self.device = device
        self.model = model.to(device).to(memory_format=torch.channels_last).eval()
        self.preprocess = preprocess
        self.input_size = input_size  # a resolution other than the slices' (progressive resizing's validation)

    @torch.inference_mode()
    def __call__(self, slices: np.ndarray) -> np.ndarray:
        if not slices.flags.writeable:  # torch.from_numpy warns on read-only memory (e.g. memory-mapped caches)
            slices = slices.copy()
        batch = torch.from_numpy(slices).unsqueeze(1).to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(resize_batch(to_model_input(batch, self.preprocess), self.input_size))
        return logits.float().cpu().numpy()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: str | Path | bytes, *, threads: int | None = None, memory_arena: bool = True) -> None:
        ort = optional_import("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cpus()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = memory_arena  # an arena keeps its peak until the session is gone
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: slices[:, None].astype(np.float32)})[0]


def fast_backend(model: nn.Module, preprocess: Preprocess, device: torch.device) -> Backend:
    """The quickest forward pass for a model in memory: ONNX Runtime on a CPU (MobileNetV2 at 224 px about 3x
    eager PyTorch here), PyTorch on a GPU. ``model`` itself is not changed; the ONNX graph is built from a copy.
    The session has no memory arena, so what a pass allocates is freed with it instead of kept at its peak."""
    if device.type == "cpu" and has_module("onnxruntime"):
        try:
            return OnnxRuntimeBackend(onnx_bytes(model, preprocess), memory_arena=False)
        except Exception as exc:  # an exporter gap for some architecture must not stop a run: fall back
            warnings.warn(f"ONNX Runtime path unavailable ({exc}); running PyTorch eagerly.", stacklevel=2)
    return TorchBackend(model, preprocess, device)


def forward_batches(
    backend: Backend, images: np.ndarray, indices: np.ndarray | None = None, *, batch_size: int = 32
) -> np.ndarray:
    """``backend`` over ``images[indices]`` (all images when None) in batches, without copying the whole selection."""
    order = np.arange(len(images)) if indices is None else np.asarray(indices)
    return np.concatenate([backend(images[order[i : i + batch_size]]) for i in range(0, len(order), batch_size)])


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, model: str | Path | torch.jit.ScriptModule) -> None:
        if not isinstance(model, torch.jit.ScriptModule):
            model = _jit_load(str(model))
        self.module = model.eval()

    @torch.inference_mode()
    def __call__(self, slices: np.ndarray) -> np.ndarray:
        return self.module(torch.from_numpy(slices).unsqueeze(1).float()).numpy()


def _jit_load(source: str | io.BytesIO, extra_files: dict[str, str] | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, on every load
        return torch.jit.load(source, map_location="cpu", _extra_files=extra_files)


def load_exported(source: str | Path | bytes, fmt: str) -> tuple[Backend, dict[str, Any] | None]:
    """Open an exported model (a file, or its bytes) and read the brainscan metadata embedded in it (None when it
    has none).

    Raises:
        BrainscanError: the file is not a readable ``fmt`` model (e.g. truncated or not a model at all).
    """
    name = "the exported model" if isinstance(source, bytes) else display_path(source)
    try:
        if fmt == "onnx":
            session = OnnxRuntimeBackend(source)
            runner: Backend = session
            raw = session.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        else:
            extra = {TORCHSCRIPT_METADATA: ""}
            stream = io.BytesIO(source) if isinstance(source, bytes) else str(source)
            runner = TorchScriptBackend(_jit_load(stream, extra))
            raw = extra[TORCHSCRIPT_METADATA]
    except BrainscanError:
        raise
    except Exception as exc:  # onnxruntime and torch.jit raise their own types for a file that is not a model
        summary = " ".join(str(exc).split())[:200]
        raise BrainscanError(f"{name}: not a readable {fmt} model ({type(exc).__name__}: {summary})") from None
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    return runner, meta if isinstance(meta, dict) else None


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
        type(conv) is not nn.Conv2d  # e.g. timm's Conv2dSame pads inside its forward (TF "SAME"): not foldable
        or conv.groups != 1
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


def export_format(path: str | Path) -> str | None:
    """``onnx`` or ``torchscript`` for an exported model's file name (:data:`SUFFIX`), None for anything else (a
    checkpoint)."""
    name = str(path).lower()
    return next((fmt for fmt, suffix in SUFFIX.items() if name.endswith(suffix)), None)


def exported_path(checkpoint: str | Path, fmt: str) -> Path:
    """Where :func:`export_model` writes ``fmt`` for ``checkpoint`` by default (beside it, same stem)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIX[fmt])


def write_onnx(wrapper: ExportWrapper, size: int, target: str | io.BytesIO) -> None:
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
    write_onnx(wrapper, preprocess.image_size, buffer)
    return buffer.getvalue()


def has_module(name: str) -> bool:
    """Whether an optional library is installed (without importing it)."""
    return importlib.util.find_spec(name) is not None
