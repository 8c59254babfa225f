"""The REST service of excp: a FastAPI app over :mod:`excp.api` and a store.

``excp serve`` runs it; ``create_app(ServeConfig(...))`` builds it.
"""

from server.app import create_app
from server.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
