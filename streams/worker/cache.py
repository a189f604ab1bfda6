"""Clipper's prediction cache: LRU over (model, version, input digest)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np


class PredictionCache:
    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._items: OrderedDict[bytes, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model: str, version: int, features: np.ndarray | bytes) -> bytes:
        if isinstance(features, np.ndarray):
            features = np.ascontiguousarray(features, dtype="<f8").tobytes()
        h = hashlib.blake2b(features, digest_size=16, person=b"clipstream-c1")
        h.update(f"\x00{model}\x00{version}".encode())
        return h.digest()

    def get(self, key: bytes) -> Any | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: bytes, value: Any) -> None:
        if self.capacity == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
