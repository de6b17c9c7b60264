"""What ``brainscan serve`` runs: one frozen record, checked when it is made."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..errors import BrainscanError
from ..explain import DEFAULT_METHOD, check_method


@dataclass(frozen=True)
class ServeConfig:
    """The server's settings.

    Attributes:
        checkpoint: the model: a checkpoint (``.pt``) or an exported ``.onnx`` / ``.torchscript.pt``.
        host: the address to listen on; the default, loopback, lets only this computer connect.
        port: the TCP port (0: any free port, reported once bound).
        max_upload_mb: the largest image file accepted, in MiB.
        cam_method: the activation-map method (a :data:`brainscan.explain.METHODS` name). FullGrad, the library's
            default for its pointing game (42% against Grad-CAM's 20%), costs 1.5-2x Grad-CAM on a CPU: 0.11 s
            against 0.05 s per MobileNetV2 slice at 224 px, 0.25 s against 0.16 s for ResNet-50 (2 cores), small
            beside an upload's round trip, so the server keeps it.
        max_batch: the most slices one inference pass stacks from concurrent requests.
        batch_wait_ms: how long the first request of a batch waits for others to join it (0: never wait; under
            load batches still fill while the previous one runs).
        cam_queue: activation maps that may wait behind the one being drawn; beyond that, 503 with Retry-After.
        device: ``auto``, ``cpu`` or ``cuda`` for a checkpoint's PyTorch model.
    """

    checkpoint: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 20.0
    cam_method: str = DEFAULT_METHOD
    max_batch: int = 32
    batch_wait_ms: float = 2.0
    cam_queue: int = 4
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        check_method(self.cam_method)
        if not 0 <= self.port <= 65535:
            raise BrainscanError(f"Port {self.port} is outside 0..65535.")
        if not self.max_upload_mb > 0:
            raise BrainscanError(f"max_upload_mb must be positive, not {self.max_upload_mb}.")
        if self.max_batch < 1 or self.cam_queue < 0 or not self.batch_wait_ms >= 0:
            raise BrainscanError("max_batch must be at least 1, cam_queue and batch_wait_ms at least 0.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def loopback(self) -> bool:
        """Whether only this computer can reach ``host``."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name other than localhost
            return False
