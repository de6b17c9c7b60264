"""The JSON the API answers with, as pydantic models: they validate the responses and make ``/openapi.json``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Format = Literal["jpeg", "png", "bmp", "tiff", "dicom", "nifti"]  # brainscan.serve.sniff.FORMATS

_PNG = {"contentEncoding": "base64", "contentMediaType": "image/png"}


class ErrorResponse(BaseModel):
    """Every error: what went wrong, in words."""

    detail: str = Field(examples=["scan.png: not a supported image (by its content, whatever its name)"])


class Health(BaseModel):
    status: Literal["ok"]
    model_sha256: str | None = Field(description="sha256 of the served model file: its fingerprint")
    uptime_s: float


class ModelCard(BaseModel):
    """The served model: what :meth:`brainscan.predict.Predictor.describe` says, and what the server allows."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str | None = Field(description="the architecture")
    arch: str | None
    class_names: list[str]
    preprocess: dict[str, Any]
    calibration: dict[str, Any]
    operating_point: dict[str, Any] | None = Field(description="the tumour/no-tumour threshold, when the model has one")
    metrics: dict[str, Any] | None = Field(description="held-out test metrics with their protocol, when recorded")
    pretrained: Any = None
    backend: str
    file: str | None
    sha256: str | None
    disclaimer: str
    cam_available: bool = Field(description="whether predict?cam=true can draw activation maps")
    cam_unavailable_reason: str | None = None
    cam_method: str
    max_upload_bytes: int
    formats: list[Format]


class Decision(BaseModel):
    tumour: bool
    tumour_probability: float
    threshold: float


class ModelRef(BaseModel):
    name: str | None
    sha256: str | None


class FileInfo(BaseModel):
    name: str = Field(description="the file name the client sent (never used on the server)")
    format: Format = Field(description="the format sniffed from the content")
    bytes: int


class Cam(BaseModel):
    method: str
    target: str = Field(description="the class the map explains: the predicted label")
    overlay_png: str = Field(description="PNG of the map over the slice, base64", json_schema_extra=_PNG)


class PredictResponse(BaseModel):
    label: str
    probabilities: dict[str, float] = Field(description="calibrated probability of every class")
    decision: Decision | None = Field(description="tumour yes/no at the model's operating point, when it has one")
    model: ModelRef
    file: FileInfo
    slice_png: str | None = Field(
        description="PNG of the prepared slice the model saw, base64 (with slice=true or cam=true)",
        json_schema_extra=_PNG,
    )
    cam: Cam | None
    disclaimer: str
    elapsed_ms: float = Field(description="server time from the received upload to the answer")
