"""A bounded LRU cache of ViT outputs keyed by the exact pixel tiles, so a second question skips the ViT."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class VitCache:
    """Features (tiles, tokens, hidden) by a digest of the tiles they came from; holds at most max_bytes."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(pixels: np.ndarray) -> str:
        """The tiles' content: the same media with the same preprocessing settings gives the same key."""
        digest = hashlib.sha256(np.ascontiguousarray(pixels).view(np.uint8).data)
        digest.update(repr(pixels.shape).encode())
        return digest.hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return features

    def put(self, key: str, features: np.ndarray) -> None:
        if features.nbytes > self.max_bytes or key in self._entries:
            return
        self._entries[key] = features
        self._bytes += features.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
