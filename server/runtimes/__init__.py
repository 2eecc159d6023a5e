"""The runtime SPI and the built-in runtimes."""

from meshserve.server.runtimes.base import Model

__all__ = ["Model"]
