"""The REST front: a thin ASGI layer over the data plane."""

from meshserve.server.rest.front import build_rest_app

__all__ = ["build_rest_app"]
