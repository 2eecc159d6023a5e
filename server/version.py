"""The installed distribution's version."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("meshserve")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
