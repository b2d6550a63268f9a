"""An azure-core transport over the connector's real one that subclasses can watch or disturb.

Tests and benchmarks inject faults or counters at the library boundary (the transport azure-core
lets every client take), never inside our own code: a subclass overrides :meth:`send` to count
requests, refuse them as an outage would, or lose a response after the write landed.
"""

from __future__ import annotations

from typing import Any


class WrappingTransport:
    def __init__(self) -> None:
        from shared._storage_transport import StorageTransport

        self._inner = StorageTransport()  # what shared.storage.Storage uses when nothing is injected

    def __enter__(self) -> WrappingTransport:
        return self

    def __exit__(self, *args: object) -> None:
        pass

    def open(self) -> None:
        self._inner.open()

    def close(self) -> None:
        pass  # the session is shared by every client of the test or benchmark

    def send(self, request: Any, **kwargs: Any) -> Any:
        return self._inner.send(request, **kwargs)
