"""``brainscan serve``'s REST API, over a real socket: uvicorn serves a tiny trained model (its checkpoint, its ONNX
export, and the export alone) on a free loopback port, and httpx talks to it as the web page does.

What it promises: the JSON contract of ``/v1/health``, ``/v1/model`` and ``/v1/predict`` for every format; errors
as ``{"detail": words}`` with their codes (413 whatever the headers say, 415 by the bytes, never the name, 422 with
the reader's reason, 409, 503 with Retry-After); the next request is unaffected by a failed one; uploads live only
in the app's temporary folder, briefly; the server listens on loopback by default; concurrent requests are batched
and each gets its own answer; the OpenAPI schema is accurate (schemathesis finds no 5xx and no undocumented answer).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import logging
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime")
httpx = pytest.importorskip("httpx")
nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from brainscan import train  # noqa: E402
from brainscan.about import DISCLAIMER  # noqa: E402
from brainscan.errors import BrainscanError  # noqa: E402
from brainscan.export import export_model  # noqa: E402
from brainscan.predict import Predictor  # noqa: E402
from brainscan.serve import ServeConfig, create_app, make_server  # noqa: E402
from brainscan.serve.batching import BoundedExecutor, MicroBatcher, QueueFull  # noqa: E402
from brainscan.serve.service import ModelService  # noqa: E402
from brainscan.serve.sniff import FORMATS, sniff  # noqa: E402

from .conftest import synthetic_slice, write_class_folders  # noqa: E402
from .test_train import tiny_config  # noqa: E402

LIMIT_MB = 0.25  # the checkpoint server's upload limit: every test image is far below it
LIMIT = int(LIMIT_MB * 2**20)
PREDICT_KEYS = {"label", "probabilities", "decision", "model", "file", "slice_png", "cam", "disclaimer", "elapsed_ms"}


# ------------------------------------------------------------------------------------------------- servers


@dataclass
class Served:
    """A running server: its base URL, the app (for its state) and the uvicorn server."""

    url: str
    app: FastAPI
    server: uvicorn.Server
    model_file: Path

    @property
    def service(self) -> ModelService:
        return self.app.state.service

    def post(self, data: bytes, name: str = "scan.png", content_type: str = "image/png", **params: Any):
        query = {k: str(v).lower() for k, v in params.items()}
        return httpx.post(
            f"{self.url}/v1/predict", params=query, files={"file": (name, data, content_type)}, timeout=60
        )

    def get(self, path: str, **kwargs: Any):
        return httpx.get(f"{self.url}{path}", timeout=60, **kwargs)


@contextmanager
def serving(config: ServeConfig) -> Iterator[Served]:
    """uvicorn serving ``config`` in a background thread until the block ends."""
    app = create_app(config)
    urls: list[str] = []
    server = make_server(config, app=app, on_ready=urls.append)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not urls:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Served(urls[0], app, server, config.checkpoint)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained model as a checkpoint alone, as an ONNX export beside its checkpoint, and as an export alone."""
    root = tmp_path_factory.mktemp("serve")
    data = write_class_folders(root / "data", {"yes": 16, "no": 16}, size=40)
    run = train(tiny_config(data, root / "run", epochs=1)).run_dir
    onnx = export_model(run / "best.pt", fmt="onnx")
    (root / "pt").mkdir()
    (root / "onnx-alone").mkdir()
    shutil.copy(run / "best.pt", root / "pt" / "best.pt")  # no export beside it: served through accelerate()
    for name in ("best.onnx", "best.json"):
        shutil.copy(run / name, root / "onnx-alone" / name)
    return {"pt": root / "pt" / "best.pt", "onnx": onnx, "onnx_alone": root / "onnx-alone" / "best.onnx"}


@pytest.fixture(scope="module")
def pt_server(models: dict[str, Path]) -> Iterator[Served]:
    with serving(ServeConfig(models["pt"], port=0, max_upload_mb=LIMIT_MB, cam_queue=1)) as served:
        yield served


@pytest.fixture(scope="module")
def onnx_server(models: dict[str, Path]) -> Iterator[Served]:
    with serving(ServeConfig(models["onnx"], port=0)) as served:
        yield served


@pytest.fixture(scope="module")
def onnx_alone_server(models: dict[str, Path]) -> Iterator[Served]:
    with serving(ServeConfig(models["onnx_alone"], port=0)) as served:
        yield served


@pytest.fixture(params=["pt", "onnx"])
def server(request: pytest.FixtureRequest) -> Served:
    """The checkpoint server and the ONNX-export server in turn."""
    return request.getfixturevalue(f"{request.param}_server")


# -------------------------------------------------------------------------------------------------- images


def head_slice(seed: int = 0, label: str = "yes", size: int = 40) -> np.ndarray:
    return synthetic_slice(label, np.random.default_rng(seed), size)


def pil_bytes(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def dicom_bytes(array: np.ndarray) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (array.astype(np.uint16) * 16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def nifti_bytes(array: np.ndarray) -> bytes:
    volume = np.stack([np.rot90(array, -1).astype(np.int16) * k for k in range(1, 6)], axis=-1)
    return nib.Nifti1Image(volume, np.eye(4)).to_bytes()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` × ``height`` pixels, with a few bytes of data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


UPLOADS = {  # format: (file name, content type the browser might claim, bytes)
    "png": ("scan.png", "image/png", pil_bytes(head_slice(), "PNG")),
    "jpeg": ("scan.jpg", "image/jpeg", pil_bytes(head_slice(), "JPEG")),
    "bmp": ("scan.bmp", "image/bmp", pil_bytes(head_slice(), "BMP")),
    "tiff": ("scan.tif", "image/tiff", pil_bytes(head_slice(), "TIFF")),
    "dicom": ("scan.dcm", "application/dicom", dicom_bytes(head_slice())),
    "nifti": ("scan.nii", "application/octet-stream", nifti_bytes(head_slice())),
    "nifti-gz": ("scan.nii.gz", "application/gzip", gzip.compress(nifti_bytes(head_slice()))),
}
PNG = UPLOADS["png"][2]


def decode_png(text: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    assert image.format == "PNG"
    return np.asarray(image)


def assert_answers_correctly(served: Served, expected: dict[str, float] | None = None) -> None:
    """The server still predicts (the same probabilities as before, when given) and reports itself healthy."""
    response = served.post(PNG)
    assert response.status_code == 200, response.text
    if expected is not None:
        assert response.json()["probabilities"] == pytest.approx(expected, abs=1e-6)
    assert served.get("/v1/health").json()["status"] == "ok"


# ------------------------------------------------------------------------------------------ health, model


def test_health_says_ok_with_the_fingerprint_of_the_served_file_and_the_uptime(server: Served) -> None:
    body = server.get("/v1/health").json()
    assert body["status"] == "ok"
    assert body["model_sha256"] == hashlib.sha256(server.model_file.read_bytes()).hexdigest()
    assert body["uptime_s"] >= 0


def test_model_card_describes_the_model_its_test_metrics_and_the_servers_limits(pt_server: Served) -> None:
    card = pt_server.get("/v1/model").json()
    assert card["name"] == card["arch"] == "cnn"
    assert card["class_names"] == ["no", "yes"]
    assert card["disclaimer"] == DISCLAIMER
    assert card["metrics"]["protocol"]["held_out_test"] == "yes"
    assert {"accuracy", "balanced_accuracy", "roc_auc"} <= set(card["metrics"])
    assert card["preprocess"]["image_size"] == 32 and card["calibration"]["temperature"] > 0
    assert card["operating_point"]["negative_class"] == "no"
    assert card["backend"] == "onnxruntime", "a checkpoint served on a CPU runs as an in-memory ONNX graph"
    assert card["file"] == "best.pt" and card["sha256"] == pt_server.get("/v1/health").json()["model_sha256"]
    assert card["cam_available"] is True and card["cam_unavailable_reason"] is None
    assert card["cam_method"] == "fullgrad"
    assert card["max_upload_bytes"] == LIMIT
    assert card["formats"] == list(FORMATS) == ["jpeg", "png", "bmp", "tiff", "dicom", "nifti"]


def test_model_card_of_an_export_without_its_checkpoint_says_why_maps_are_unavailable(
    onnx_alone_server: Served,
) -> None:
    card = onnx_alone_server.get("/v1/model").json()
    assert card["cam_available"] is False
    assert "checkpoint" in card["cam_unavailable_reason"]
    assert card["backend"] == "onnxruntime" and card["file"] == "best.onnx"


# ------------------------------------------------------------------------------------------------ predict


@pytest.mark.parametrize("kind", list(UPLOADS))
def test_predict_answers_the_json_contract_for_every_format(server: Served, kind: str) -> None:
    name, content_type, data = UPLOADS[kind]
    response = server.post(data, name, content_type)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == PREDICT_KEYS
    assert body["label"] in ("no", "yes")
    assert set(body["probabilities"]) == {"no", "yes"}
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    decision = body["decision"]
    assert decision["tumour_probability"] == pytest.approx(body["probabilities"]["yes"], abs=1e-6)
    assert decision["tumour"] == (decision["tumour_probability"] >= decision["threshold"])
    assert body["model"] == {"name": "cnn", "sha256": hashlib.sha256(server.model_file.read_bytes()).hexdigest()}
    assert body["file"] == {"name": name, "format": kind.removesuffix("-gz"), "bytes": len(data)}
    assert body["slice_png"] is None and body["cam"] is None
    assert body["disclaimer"] == DISCLAIMER
    assert body["elapsed_ms"] > 0


def test_predict_gives_the_librarys_prediction_for_the_same_file(server: Served, tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(PNG)
    expected = Predictor.load(server.model_file).predict(path)
    body = server.post(PNG).json()
    assert body["label"] == expected.label
    assert body["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)


def test_slice_true_returns_the_prepared_slice_the_model_saw_as_png(server: Served) -> None:
    body = server.post(PNG, slice=True).json()
    assert decode_png(body["slice_png"]).shape == (32, 32)
    assert body["cam"] is None


def test_cam_true_returns_an_overlay_of_the_slice_explaining_the_predicted_label(server: Served) -> None:
    body = server.post(UPLOADS["dicom"][2], "scan.dcm", cam=True).json()
    assert body["cam"]["method"] == "fullgrad"
    assert body["cam"]["target"] == body["label"]
    overlay = decode_png(body["cam"]["overlay_png"])
    assert overlay.shape == (32, 32, 3) and overlay.dtype == np.uint8
    assert decode_png(body["slice_png"]).shape == (32, 32), "a map comes with the slice it is drawn over"


def test_the_format_comes_from_the_bytes_never_the_file_name_or_content_type(pt_server: Served) -> None:
    body = pt_server.post(PNG, name="scan.dcm", content_type="application/dicom").json()
    assert body["file"]["format"] == "png"
    assert pt_server.post(UPLOADS["nifti-gz"][2], name="photo.jpg").json()["file"]["format"] == "nifti"


# ------------------------------------------------------------------------------------------------- errors


def assert_error(response: Any, status: int, *words: str) -> str:
    """``response`` is the JSON error ``{"detail": <words>}`` with ``status``; returns the detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    assert "Traceback" not in body["detail"]
    for word in words:
        assert word in body["detail"]
    return body["detail"]


def test_a_body_above_the_limit_is_413_as_its_content_length_declares(pt_server: Served) -> None:
    baseline = pt_server.post(PNG).json()["probabilities"]
    detail = assert_error(pt_server.post(b"\x89PNG\r\n\x1a\n" + bytes(4 * LIMIT)), 413, "limit", f"{LIMIT:,}")
    assert "0.25 MiB" in detail
    assert_answers_correctly(pt_server, baseline)


def test_a_chunked_body_without_content_length_is_counted_and_413_once_over_the_limit(pt_server: Served) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(64):  # 4 MiB in all, far above the limit
            sent += 1
            yield bytes(64 * 1024)

    response = httpx.post(
        f"{pt_server.url}/v1/predict",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=x"},
        timeout=60,
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "limit")
    assert_answers_correctly(pt_server)


def test_a_content_length_that_understates_the_body_is_not_trusted(pt_server: Served) -> None:
    """Behind a proxy (or over HTTP/2) the ASGI app may receive more than the header declared: it counts the bytes."""

    async def lie() -> Any:
        transport = httpx.ASGITransport(app=pt_server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post(
                "/v1/predict",
                content=bytes(4 * LIMIT),
                headers={"content-type": "multipart/form-data; boundary=x", "content-length": "100"},
            )

    response = asyncio.run(lie())
    assert response.request.headers["content-length"] == "100"
    assert_error(response, 413, "limit")


def test_a_file_above_the_limit_is_413_even_when_the_whole_body_fits_the_form_allowance(pt_server: Served) -> None:
    assert_error(pt_server.post(b"\x89PNG\r\n\x1a\n" + bytes(LIMIT)), 413, "limit")
    assert_answers_correctly(pt_server)


def test_text_named_scan_png_is_415_whatever_its_name_and_content_type_claim(pt_server: Served) -> None:
    response = pt_server.post(b"patient notes, not an image\n" * 20, name="scan.png", content_type="image/png")
    assert_error(response, 415, "scan.png", "not a supported image")
    assert_answers_correctly(pt_server)


def test_gzip_data_that_is_no_nifti_volume_is_415(pt_server: Served) -> None:
    assert_error(pt_server.post(gzip.compress(b"hello " * 100), name="scan.nii.gz"), 415)


def test_a_body_that_is_not_a_multipart_form_is_415(pt_server: Served) -> None:
    response = httpx.post(f"{pt_server.url}/v1/predict", json={"file": "scan.png"}, timeout=60)
    assert_error(response, 415, "multipart/form-data")


def test_a_truncated_png_is_422_with_the_readers_reason(pt_server: Served) -> None:
    baseline = pt_server.post(PNG).json()["probabilities"]
    big = pil_bytes(np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8), "PNG")
    detail = assert_error(pt_server.post(big[: len(big) // 2], name="cut.png"), 422, "cut.png", "truncated")
    assert "brainscan-serve-" not in detail, "the server's temporary file name is not the client's business"
    assert_answers_correctly(pt_server, baseline)


@pytest.mark.parametrize(("side", "reason"), [(100_000, "decompression bomb"), (5000, "above the limit")])
def test_a_png_whose_header_declares_too_many_pixels_is_422_before_decoding(
    pt_server: Served, side: int, reason: str
) -> None:
    data = png_declaring(side, side)
    assert len(data) < 200
    start = time.perf_counter()
    assert_error(pt_server.post(data, name="bomb.png"), 422, "bomb.png", "pixels", reason)
    assert time.perf_counter() - start < 5, "refused from the header, without decoding"
    assert_answers_correctly(pt_server)


def test_a_form_without_the_file_field_is_422_in_words(pt_server: Served) -> None:
    response = httpx.post(f"{pt_server.url}/v1/predict", files={"image": ("scan.png", PNG, "image/png")}, timeout=60)
    assert_error(response, 422, "no 'file' field")
    text_only = httpx.post(f"{pt_server.url}/v1/predict", files={"note": (None, "hello")}, timeout=60)
    assert_error(text_only, 422, "no 'file' field")
    assert_answers_correctly(pt_server)


def test_an_invalid_query_is_422_in_words(pt_server: Served) -> None:
    response = httpx.post(
        f"{pt_server.url}/v1/predict", params={"cam": "perhaps"}, files={"file": ("a.png", PNG)}, timeout=60
    )
    assert_error(response, 422, "query parameter 'cam'", "boolean")


def test_cam_on_an_export_without_its_checkpoint_is_409_and_plain_predictions_still_work(
    onnx_alone_server: Served,
) -> None:
    assert_error(onnx_alone_server.post(PNG, cam=True), 409, "checkpoint")
    assert_answers_correctly(onnx_alone_server)
    assert onnx_alone_server.post(PNG, slice=True).json()["slice_png"]


def test_a_full_cam_queue_is_503_with_retry_after_while_predictions_and_health_go_on(pt_server: Served) -> None:
    cams = pt_server.service.cams
    assert cams is not None and cams.capacity == 2  # the one being drawn and cam_queue=1 waiting
    gate = threading.Event()
    held = [cams.submit(gate.wait, 30) for _ in range(cams.capacity)]  # the drawing thread busy, its queue full
    try:
        response = pt_server.post(PNG, cam=True)
        assert_error(response, 503, "queue is full")
        assert response.headers["retry-after"] == "1"
        start = time.perf_counter()
        assert_answers_correctly(pt_server)  # inference does not wait for maps, nor does the event loop
        assert time.perf_counter() - start < 5
    finally:
        gate.set()
        for future in held:
            future.result(timeout=30)
    assert pt_server.post(PNG, cam=True).json()["cam"]["overlay_png"]


def test_an_internal_failure_is_a_json_500_without_a_traceback_and_the_next_request_is_answered(
    pt_server: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    baseline = pt_server.post(PNG).json()["probabilities"]

    def broken(*args: Any, **kwargs: Any) -> np.ndarray:
        raise RuntimeError("secret internal state /srv/models")

    with monkeypatch.context() as patch:
        patch.setattr(pt_server.service.predictor, "predict_proba", broken)
        detail = assert_error(pt_server.post(PNG), 500, "logged")
    assert "secret" not in detail and "RuntimeError" not in detail
    assert_answers_correctly(pt_server, baseline)


# ------------------------------------------------------------------------------------- files and binding


def test_an_upload_lives_only_in_the_apps_folder_with_its_sniffed_suffix_until_it_is_read(
    pt_server: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = pt_server.service.upload_dir
    assert folder is not None and folder.name.startswith("brainscan-serve-")
    seen: list[list[str]] = []
    prepare = pt_server.service.predictor.prepare

    def spy(path: Any) -> np.ndarray:
        seen.append(sorted(p.name for p in folder.iterdir()))
        assert Path(path).parent == folder
        return prepare(path)

    monkeypatch.setattr(pt_server.service.predictor, "prepare", spy)
    assert pt_server.post(UPLOADS["dicom"][2], name="../../etc/scan.png").status_code == 200
    pt_server.post(PNG[:100], name="cut.png")  # fails in the reader
    assert [len(names) for names in seen] == [1, 1]
    assert seen[0][0].endswith(".dcm") and seen[1][0].endswith(".png"), "the suffix is the sniffed format's"
    assert "etc" not in seen[0][0] and "scan" not in seen[0][0], "the client's name is never a path"
    assert list(folder.iterdir()) == [], "each upload is deleted once read, failed or not"


def test_the_upload_folder_exists_while_serving_and_is_removed_at_shutdown(
    models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="brainscan.serve")
    with serving(ServeConfig(models["onnx_alone"], port=0)) as served:
        folder = served.service.upload_dir
        assert folder is not None and folder.is_dir()
        served.post(PNG)
    assert not folder.exists()
    assert served.service.upload_dir is None
    logged = caplog.text
    assert served.url in logged and "loopback" in logged
    assert hashlib.sha256(models["onnx_alone"].read_bytes()).hexdigest() in logged


def test_the_server_listens_on_loopback_by_default_and_refuses_other_host_names(pt_server: Served) -> None:
    assert ServeConfig(Path("best.pt")).host == "127.0.0.1"
    assert ServeConfig(Path("best.pt")).loopback and not ServeConfig(Path("best.pt"), host="0.0.0.0").loopback
    assert pt_server.server.servers[0].sockets[0].getsockname()[0] == "127.0.0.1"
    assert pt_server.url.startswith("http://127.0.0.1:")
    # a page on another site reaching it through a DNS name rebound to 127.0.0.1 is refused
    assert pt_server.get("/v1/health", headers={"host": "attacker.example"}).status_code == 400
    assert pt_server.get("/v1/health", headers={"host": "localhost"}).status_code == 200


def test_the_web_page_and_its_assets_are_served(pt_server: Served) -> None:
    page = pt_server.get("/")
    if page.status_code == 404:
        pytest.skip("the web page (brainscan/serve/static/index.html) is not there yet")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert pt_server.get("/static/app.js").status_code == 200


def test_unknown_paths_are_json_404(pt_server: Served) -> None:
    assert_error(pt_server.get("/v1/nothing"), 404)


# ----------------------------------------------------------------------------------------------- concurrency


def test_concurrent_requests_each_get_their_own_answer(pt_server: Served) -> None:
    images = [pil_bytes(head_slice(seed, "yes" if seed % 2 else "no"), "PNG") for seed in range(8)]
    expected = [pt_server.post(data).json()["probabilities"] for data in images]

    async def many() -> list[Any]:
        async with httpx.AsyncClient(base_url=pt_server.url, timeout=60) as client:
            requests = [
                client.post("/v1/predict", files={"file": (f"{i}.png", images[i % 8], "image/png")}) for i in range(48)
            ]
            return await asyncio.gather(*requests)

    responses = asyncio.run(many())
    assert [r.status_code for r in responses] == [200] * 48
    for i, response in enumerate(responses):
        assert response.json()["probabilities"] == pytest.approx(expected[i % 8], abs=1e-6)
        assert response.json()["file"]["name"] == f"{i}.png"


def test_the_batcher_stacks_waiting_requests_into_one_pass_and_returns_each_its_row() -> None:
    started, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def forward(stack: np.ndarray) -> np.ndarray:
        sizes.append(len(stack))
        started.set()
        release.wait(10)
        return stack.reshape(len(stack), -1).sum(axis=1, keepdims=True)

    batcher = MicroBatcher(forward, max_batch=4, max_wait_s=0)

    async def submit_all() -> list[np.ndarray]:
        first = asyncio.ensure_future(batcher.submit(np.full((2, 2), 0)))
        await asyncio.to_thread(started.wait, 10)  # the first pass is running: the rest must wait and stack up
        rest = [asyncio.ensure_future(batcher.submit(np.full((2, 2), k))) for k in range(1, 10)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *rest)

    try:
        rows = asyncio.run(submit_all())
    finally:
        release.set()
        batcher.close()
    assert [int(row[0]) for row in rows] == [4 * k for k in range(10)], "each request gets its own row"
    assert sizes == [1, 4, 4, 1], "up to max_batch waiting slices per pass"


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    calls: list[int] = []

    def forward(stack: np.ndarray) -> np.ndarray:
        calls.append(len(stack))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return stack.reshape(len(stack), -1)

    batcher = MicroBatcher(forward, max_batch=8, max_wait_s=0)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            asyncio.run(batcher.submit(np.zeros((1, 1))))
        assert asyncio.run(batcher.submit(np.ones((1, 1)))).tolist() == [1.0]
    finally:
        batcher.close()


def test_the_map_queue_refuses_beyond_its_bound_and_frees_places_as_jobs_finish() -> None:
    pool = BoundedExecutor(1, name="test-cam")
    gate = threading.Event()
    try:
        running, waiting = pool.submit(gate.wait, 10), pool.submit(lambda: 42)
        assert pool.full
        with pytest.raises(QueueFull):
            pool.submit(lambda: 0)
        gate.set()
        assert running.result(10) is True and waiting.result(10) == 42
        deadline = time.monotonic() + 5
        while pool.full and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.submit(lambda: 7).result(10) == 7
    finally:
        gate.set()
        pool.close()


# ------------------------------------------------------------------------------------------ units, schema


@pytest.mark.parametrize("kind", list(UPLOADS))
def test_sniffing_names_each_format_from_its_first_bytes(kind: str) -> None:
    suffix = {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "tiff": ".tif", "dicom": ".dcm", "nifti": ".nii"}
    expected = ("nifti", ".nii.gz") if kind == "nifti-gz" else (kind, suffix[kind])
    assert sniff(UPLOADS[kind][2]) == expected


@pytest.mark.parametrize(
    "data", [b"", b"hello", b"\x1f\x8b\x08\x00broken", gzip.compress(b"not nifti" * 50), b"\0" * 400]
)
def test_sniffing_refuses_anything_else(data: bytes) -> None:
    assert sniff(data) is None


def test_config_refuses_nonsense_and_unknown_map_methods() -> None:
    for bad in ({"port": 70000}, {"max_upload_mb": 0}, {"max_batch": 0}, {"cam_queue": -1}, {"cam_method": "x"}):
        with pytest.raises(BrainscanError):
            ServeConfig(Path("best.pt"), **bad)
    assert ServeConfig(Path("best.pt"), max_upload_mb=1).max_upload_bytes == 2**20


def test_openapi_documents_the_bodies_the_answers_and_every_error_code(pt_server: Served) -> None:
    schema = pt_server.get("/openapi.json").json()
    predict = schema["paths"]["/v1/predict"]["post"]
    form = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and form["properties"]["file"]["format"] == "binary"
    assert {p["name"] for p in predict["parameters"]} == {"cam", "slice"}
    responses = predict["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictResponse")
    for code in ("409", "413", "415", "422", "503"):
        assert responses[code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), code
    assert "Retry-After" in responses["503"]["headers"]
    assert "HTTPValidationError" not in schema["components"]["schemas"], "422 is words, as documented"
    for path, model in (("/v1/health", "Health"), ("/v1/model", "ModelCard")):
        assert schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
            "$ref"
        ].endswith(model)
    properties = schema["components"]["schemas"]["PredictResponse"]["properties"]
    assert set(properties) == PREDICT_KEYS


def test_generated_requests_never_get_a_server_error_or_an_undocumented_answer(pt_server: Served) -> None:
    """Schemathesis generates requests from the served /openapi.json, valid and invalid (missing or mistyped fields,
    other content types); each answer must be documented there, with its schema, and none may be a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{pt_server.url}/openapi.json")
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]

    @given(case=st.one_of(*(schema.as_strategy(mode) for mode in modes)))
    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def answered_as_documented(case: Any) -> None:
        case.validate_response(case.call(timeout=30), checks=checks)

    answered_as_documented()
