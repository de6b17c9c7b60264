"""The served model and the work around one request: decoding in worker threads, inference through the
micro-batcher, activation maps on their own bounded queue, uploads in one temporary folder."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import HTTPException
from PIL import Image

from ..about import DISCLAIMER
from ..errors import BrainscanError
from ..explain import explain_slice, overlay
from ..hardware import available_cpus
from ..predict import Predictor, export_format, source_checkpoint
from .batching import BoundedExecutor, MicroBatcher, QueueFull
from .config import ServeConfig
from .sniff import FORMATS
from .uploads import Decoded, parse_form, prepare_upload

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1


@dataclass
class _Running:
    """What exists only while the app runs (between lifespan start and stop)."""

    upload_dir: Path
    batcher: MicroBatcher
    cams: BoundedExecutor
    decoders: anyio.CapacityLimiter


class ModelService:
    """Loads the model once; :meth:`running` starts the threads and the upload folder for the app's lifetime."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.predictor = Predictor.load(config.checkpoint, device=config.device)
        # A checkpoint served on a CPU is exported on the fly: its forward pass becomes an in-memory ONNX Runtime
        # graph, parity-checked against PyTorch, with nothing written to disk.
        self.predictor.accelerate()
        self.cam_predictor, self.cam_unavailable = _cam_predictor(self.predictor, config)
        self.sha256 = self.predictor.sha256
        self.card = self._card()
        self.started = time.monotonic()
        self._running: _Running | None = None

    @property
    def upload_dir(self) -> Path | None:
        """The one folder uploads are written to while the app runs (None before and after)."""
        return self._running.upload_dir if self._running else None

    @property
    def cams(self) -> BoundedExecutor | None:
        return self._running.cams if self._running else None

    @property
    def batcher(self) -> MicroBatcher | None:
        return self._running.batcher if self._running else None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The upload folder, the inference thread and the activation-map thread, removed and stopped on exit."""
        config = self.config
        with tempfile.TemporaryDirectory(prefix="brainscan-serve-") as folder:  # also removed if never exited
            batcher = MicroBatcher(
                lambda stack: self.predictor.predict_proba(stack, batch_size=len(stack)),
                max_batch=config.max_batch,
                max_wait_s=config.batch_wait_ms / 1000,
            )
            cams = BoundedExecutor(config.cam_queue, name="brainscan-cam")
            self._running = _Running(Path(folder), batcher, cams, anyio.CapacityLimiter(max(2, available_cpus())))
            await anyio.to_thread.run_sync(self._warm_up)
            self.started = time.monotonic()
            try:
                yield
            finally:
                self._running = None
                await anyio.to_thread.run_sync(batcher.close)
                await anyio.to_thread.run_sync(cams.close)

    def _warm_up(self) -> None:
        """One full batch before the first request, so that the runtime's memory reaches its working size at start
        rather than during the first minutes under load (a load test then sees a flat RSS)."""
        size = self.predictor.preprocess.image_size
        self.predictor.predict_proba(np.zeros((self.config.max_batch, size, size), np.uint8))

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model_sha256": self.sha256, "uptime_s": time.monotonic() - self.started}

    async def predict(self, body: bytes, content_type: str | None, *, cam: bool, show_slice: bool) -> dict[str, Any]:
        """One upload's prediction, as the ``/v1/predict`` JSON.

        Raises:
            HTTPException: 409 cam without a PyTorch model; 503 the activation-map queue is full; see
                :func:`~brainscan.serve.uploads.parse_form` and :func:`~brainscan.serve.uploads.prepare_upload`.
        """
        start = time.perf_counter()
        running = self._running
        if running is None:
            raise RuntimeError("the app is not running: serve it with an ASGI server (its lifespan starts it)")
        if cam and self.cam_unavailable:
            raise HTTPException(409, f"No activation map for this model: {self.cam_unavailable}")
        if cam and running.cams.full:  # before decoding, so a refusal costs nothing
            raise _busy(self.config)
        decoded = await anyio.to_thread.run_sync(self._decode, body, content_type, running, limiter=running.decoders)
        prediction = self.predictor.result(decoded.name, await running.batcher.submit(decoded.slice))
        cam_json = None
        if cam:
            try:
                future = running.cams.submit(self._draw_cam, decoded.slice, prediction.index)
            except QueueFull:
                raise _busy(self.config) from None
            cam_json = await asyncio.wrap_future(future)
        slice_png = await anyio.to_thread.run_sync(png_base64, decoded.slice) if show_slice or cam else None
        return {
            "label": prediction.label,
            "probabilities": prediction.probabilities,
            "decision": prediction.decision,
            "model": {"name": self.predictor.arch, "sha256": self.sha256},
            "file": {"name": decoded.name, "format": decoded.format, "bytes": decoded.size},
            "slice_png": slice_png,
            "cam": cam_json,
            "disclaimer": DISCLAIMER,
            "elapsed_ms": (time.perf_counter() - start) * 1000,
        }

    def _decode(self, body: bytes, content_type: str | None, running: _Running) -> Decoded:
        upload = parse_form(body, content_type, max_file_bytes=self.config.max_upload_bytes)
        return prepare_upload(self.predictor, upload, running.upload_dir)

    def _draw_cam(self, image: np.ndarray, target: int) -> dict[str, str]:
        """The map of the served prediction's class over the slice (runs on the activation-map thread)."""
        model, method = self.cam_predictor, self.config.cam_method
        assert model is not None
        explanation = explain_slice(model, image, method=method, target=target)
        return {"method": method, "target": explanation.target, "overlay_png": png_base64(overlay(explanation))}

    def _card(self) -> dict[str, Any]:
        card = _finite(self.predictor.describe())
        protocol = (card.get("metrics") or {}).get("protocol") or {}
        if protocol.get("dataset"):  # the data set's name, not where it sits on the server's disk
            protocol["dataset"] = Path(str(protocol["dataset"])).name
        return card | {
            "name": card.get("arch"),
            "disclaimer": DISCLAIMER,
            "cam_available": self.cam_unavailable is None,
            "cam_unavailable_reason": self.cam_unavailable,
            "cam_method": self.config.cam_method,
            "max_upload_bytes": self.config.max_upload_bytes,
            "formats": list(FORMATS),
        }


def _cam_predictor(predictor: Predictor, config: ServeConfig) -> tuple[Predictor | None, str | None]:
    """The predictor whose PyTorch model draws the maps, or None and the reason there is none."""
    path = config.checkpoint
    if export_format(path) is None:
        if predictor.model is not None and predictor.backend.name != "torch":
            return predictor, None  # inference runs on ONNX Runtime: the PyTorch model is free for the maps
        checkpoint: Path | None = path
    else:
        checkpoint = source_checkpoint(path)
        if checkpoint is None:
            return None, (
                f"{path.name} is an exported model and the checkpoint it was exported from is not beside it with the "
                "same bytes; maps need that checkpoint's PyTorch model (serve the .pt, or put it back)."
            )
    try:  # a model of its own: a map's hooks and gradients must never meet a concurrent inference pass
        return Predictor.from_checkpoint(checkpoint, backend="torch", device=config.device), None
    except BrainscanError as exc:
        logger.warning("Activation maps unavailable: %s", exc)
        return None, str(exc)


def _busy(config: ServeConfig) -> HTTPException:
    return HTTPException(
        503,
        f"The activation-map queue is full ({config.cam_queue} waiting behind the one being drawn); "
        f"retry in {RETRY_AFTER_S} s, or ask without cam.",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def png_base64(array: np.ndarray) -> str:
    """A grey (H×W) or RGB (H×W×3) ``uint8`` array as base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats as None: JSON has no such numbers (an AUC undefined on one class)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
