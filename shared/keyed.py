"""One synchronisation primitive per key (a mailbox, an account), made on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerKey(Generic[T]):
    """``get(key)`` returns the same primitive for a key every time. Past ``max_keys`` keys, those that
    ``idle`` says are not in use are dropped, so memory stays bounded with many accounts; with ``idle=None``
    nothing is ever dropped (a primitive whose state cannot be read safely) and no sweep is attempted."""

    def __init__(self, factory: Callable[[], T], *, idle: Callable[[T], bool] | None,
                 max_keys: int = 10_000) -> None:
        self._factory = factory
        self._idle = idle
        self._max = max_keys
        self._guard = threading.Lock()
        self._items: dict[str, T] = {}

    def get(self, key: str) -> T:
        with self._guard:
            item = self._items.get(key)
            if item is None:
                if self._idle is not None and len(self._items) > self._max:
                    self._items = {k: v for k, v in self._items.items() if not self._idle(v)}
                item = self._items[key] = self._factory()
            return item
