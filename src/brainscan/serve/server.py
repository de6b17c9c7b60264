"""Running the app under uvicorn, with logs that say where it listens and which model it serves."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .config import ServeConfig

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, which logs the bound address and calls ``on_ready`` with the base URL once listening."""

    def __init__(self, config: uvicorn.Config, serve_config: ServeConfig, on_ready: Callable[[str], None] | None):
        super().__init__(config)
        self.serve_config = serve_config
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        app = self.config.app
        service = app.state.service if isinstance(app, FastAPI) else None
        if service is not None:
            logger.info(
                "Serving %s (%s, %s backend, sha256 %s) at %s",
                self.serve_config.checkpoint.name,
                service.predictor.arch,
                service.predictor.backend.name,
                service.sha256,
                url,
            )
        if self.serve_config.loopback:
            logger.info("Listening on %s, loopback: only this computer can connect.", host)
        else:
            logger.warning("Listening on %s: other computers on the network can connect, with no authentication.", host)
        if self.on_ready is not None:
            self.on_ready(url)


def make_server(
    config: ServeConfig, *, app: FastAPI | None = None, on_ready: Callable[[str], None] | None = None
) -> uvicorn.Server:
    """An unstarted uvicorn server for ``app`` (default: :func:`create_app`). ``.run()`` serves until interrupted
    (or ``.should_exit = True`` from another thread); ``on_ready(url)`` is called once it listens.

    Logging is left to the application (``log_config=None``): uvicorn's loggers propagate to its handlers.
    """
    app = app if app is not None else create_app(config)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, ws="none", lifespan="on", server_header=False
    )
    return _Server(uv_config, config, on_ready)


def serve(config: ServeConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Load the model and serve it until interrupted (Ctrl-C); ``on_ready(url)`` is called once it listens.

    Raises:
        BrainscanError: the model cannot be loaded.
    """
    make_server(config, on_ready=on_ready).run()
