"""The REST API and the web page of ``brainscan serve``: :func:`create_app` builds the FastAPI app.

Endpoints: ``GET /`` (the page), ``GET /v1/health``, ``GET /v1/model``, ``POST /v1/predict`` (multipart ``file``;
``?cam=true`` adds an activation map, ``?slice=true`` the prepared slice). Every error is ``{"detail": "<words>"}``.
Research software, not a medical device.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from ..about import DISCLAIMER, __version__
from .config import ServeConfig
from .schemas import ErrorResponse, Health, ModelCard, PredictResponse
from .service import ModelService
from .sniff import FORMATS
from .uploads import FIELD, upload_too_large

STATIC = Path(__file__).with_name("static")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and part headers around the file, on top of the file's own limit


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, **extra}


PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    409: _error("cam=true, but this model has no PyTorch model to draw maps with (an export without its checkpoint)"),
    413: _error("the upload is larger than max_upload_bytes (the bytes received are counted, whatever the headers)"),
    415: _error(f"not a supported image, by its content ({', '.join(FORMATS)}), or not a multipart/form-data body"),
    422: _error(
        f"no '{FIELD}' field, a malformed form or query, or a file the reader refuses (corrupt, truncated, too many "
        "pixels), with the reason"
    ),
    503: _error(
        "cam=true while the activation-map queue is full",
        headers={"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    ),
}
PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [FIELD],
                "properties": {
                    FIELD: {
                        "type": "string",
                        "format": "binary",
                        "description": "the image; its format is told from its bytes, never from its name",
                    }
                },
            }
        }
    },
}


async def request_body(request: Request) -> bytes:
    """The raw body, refused (413) once it exceeds the file limit plus :data:`FORM_OVERHEAD`: at once when the
    Content-Length header says so, else as soon as the bytes received say so, whatever the header claimed (it may
    be absent, with chunked encoding, or lie behind a proxy). A dependency runs before the query is validated, so
    nothing else is looked at first."""
    limit = request.app.state.service.config.max_upload_bytes + FORM_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413)
    body, received = [], 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPException(413)
            body.append(chunk)
    except ClientDisconnect:  # nobody left to answer; not a server error worth a traceback
        raise HTTPException(400, "The client disconnected during the upload.") from None
    return b"".join(body)


def create_app(config: ServeConfig) -> FastAPI:
    """The app serving ``config.checkpoint``, loaded now (once); it runs under any ASGI server, whose lifespan
    starts the inference threads and the upload folder (see :func:`brainscan.serve.serve`).

    Raises:
        BrainscanError: the model cannot be loaded.
    """
    service = ModelService(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.running():
            yield

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 413:
            # the rest of the body is never read, so the connection cannot carry another request: say so, or a
            # client's pool may reuse it and fail its next request
            headers["Connection"] = "close"
        detail = upload_too_large(config.max_upload_bytes) if exc.status_code == 413 else str(exc.detail)
        return JSONResponse({"detail": detail}, exc.status_code, headers=headers or None)

    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{_where(error.get('loc', ()))}: {error.get('msg')}" for error in exc.errors())
        return JSONResponse({"detail": f"Invalid request: {problems}."}, 422)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server's log (Starlette re-raises to the server), never to the client
        return JSONResponse({"detail": "Internal error; the server logged the details."}, 500)

    app = FastAPI(
        title="brainscan",
        version=__version__,
        description=f"Brain-tumour MRI slice classification. {DISCLAIMER}",
        lifespan=lifespan,
        exception_handlers={
            StarletteHTTPException: http_error,
            RequestValidationError: invalid_request,
            Exception: server_error,
        },
    )
    app.state.service = service
    if config.loopback:  # a web page elsewhere cannot reach this server through a DNS name rebound to 127.0.0.1
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=sorted({"127.0.0.1", "localhost", config.host}))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        index = STATIC / "index.html"
        if not index.is_file():
            raise StarletteHTTPException(404, "The web page is not installed; the API under /v1 works.")
        return FileResponse(index)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/health", response_model=Health)
    async def health() -> dict[str, Any]:
        """Liveness, and the fingerprint of the model being served."""
        return service.health()

    @app.get("/v1/model", response_model=ModelCard)
    async def model() -> dict[str, Any]:
        """The served model: architecture, classes, preprocessing, calibration, operating point, test metrics with
        their protocol, and the server's limits; with the disclaimer."""
        return service.card

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=PREDICT_ERRORS,
        openapi_extra={"requestBody": PREDICT_BODY},
    )
    async def predict(
        request: Request,
        body: Annotated[bytes, Depends(request_body)],
        cam: Annotated[bool, Query(description="add an activation map of the predicted class")] = False,
        show_slice: Annotated[
            bool, Query(alias="slice", description="add the prepared slice the model saw (always with cam)")
        ] = False,
    ) -> dict[str, Any]:
        """Classify one slice sent as the multipart field ``file`` (JPEG, PNG, BMP, TIFF, DICOM, NIfTI)."""
        return await service.predict(body, request.headers.get("content-type"), cam=cam, show_slice=show_slice)

    return app


def _where(loc: tuple[Any, ...] | list[Any]) -> str:
    """A validation error's location in words: ``("query", "cam")`` → ``query parameter 'cam'``."""
    if len(loc) >= 2 and loc[0] in ("query", "path", "header", "cookie"):
        return f"{loc[0]} parameter '{'.'.join(map(str, loc[1:]))}'"
    return ".".join(map(str, loc)) or "request"
