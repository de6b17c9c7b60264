"""``brainscan serve``: a REST API and a web page over one model, for this computer by default.

Example:
    >>> from brainscan.serve import ServeConfig, serve
    >>> serve(ServeConfig(checkpoint="runs/yesno/best.pt"))  # doctest: +SKIP

Research software, not a medical device.
"""

from .app import create_app
from .config import ServeConfig
from .server import make_server, serve

__all__ = ["ServeConfig", "create_app", "make_server", "serve"]
