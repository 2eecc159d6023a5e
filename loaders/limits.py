"""What one fetch may spend: bytes downloaded, bytes unpacked, and whether it should stop.

Every download and extractor charges a ``LoadBudget`` as it streams, so a 200 KiB
archive that inflates to 200 GiB is refused at the limit, not after the disk fills,
and a load that timed out (or a server shutting down) ends at the next chunk or
archive member instead of running on in its thread.
"""

from __future__ import annotations

import threading
import time

from meshserve.protocol.errors import ModelLoadError


class ModelTooLarge(ModelLoadError):
    """A model's download or unpacked tree is larger than ``max_model_bytes``."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class LoadCancelled(ModelLoadError):
    """The load was told to stop (its timeout passed, or the server is shutting down)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class LoadBudget:
    def __init__(
        self,
        max_bytes: int | None = None,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
        setting: str = "max_model_bytes",
    ) -> None:
        self.max_bytes = max_bytes
        self.cancel = cancel or threading.Event()
        self.deadline = deadline  # time.monotonic() value
        self.setting = setting
        self.downloaded = 0
        self.unpacked = 0

    def check(self) -> None:
        """Raise if the load should stop; cheap enough to call per chunk."""
        if self.cancel.is_set():
            raise LoadCancelled("load cancelled (timed out or the server is stopping)")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise LoadCancelled("load ran past its deadline")

    def expect_download(self, n: int, what: str) -> None:
        """Refuse before downloading when the source says up front that it is too large."""
        if self.max_bytes is not None and self.downloaded + n > self.max_bytes:
            raise self._too_large(f"{what} is {n} bytes to download")

    def download(self, n: int, what: str = "the download") -> None:
        self.check()
        self.downloaded += n
        if self.max_bytes is not None and self.downloaded > self.max_bytes:
            raise self._too_large(f"{what} passed {self.max_bytes} downloaded bytes")

    def expect_unpack(self, n: int, what: str) -> None:
        """Refuse a member whose header alone says it would pass the limit."""
        if self.max_bytes is not None and self.unpacked + n > self.max_bytes:
            raise self._too_large(f"{what} of {n} bytes would unpack past {self.max_bytes} bytes")

    def unpack(self, n: int, what: str = "the archive") -> None:
        """Charge ``n`` inflated bytes as they are read, before they are written."""
        self.check()
        self.unpacked += n
        if self.max_bytes is not None and self.unpacked > self.max_bytes:
            raise self._too_large(f"{what} unpacks past {self.max_bytes} bytes")

    def _too_large(self, detail: str) -> ModelTooLarge:
        return ModelTooLarge(
            f"{detail}: larger than {self.setting} ({self.max_bytes} bytes); "
            f"raise --{self.setting.replace('_', '-')} to allow it"
        )
