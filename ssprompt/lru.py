"""One bounded, least-recently-used cache for everything ssprompt keeps in memory (decoded
images with their labels, frozen image features), so a large dataset never fills the RAM."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch


def nbytes(obj: Any) -> int:
    """Bytes held by arrays / tensors inside ``obj`` (dataclasses, dicts, lists: recursively)."""
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.numel()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (bytes, bytearray)):  # e.g. the RLE masks of Scene.annotations
        return len(obj)
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return nbytes(vars(obj))
    return 0


class LRUCache:
    """A mapping that evicts the least recently used entries once it holds more than
    ``max_bytes`` (None: unbounded). ``on_evict(key, value)`` may spill an entry elsewhere."""

    def __init__(self, max_bytes: int | None = None,
                 on_evict: Callable[[Hashable, Any], None] | None = None):
        self.max_bytes, self.on_evict = max_bytes, on_evict
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self):
        """The keys, least recently used first."""
        return iter(list(self._data))

    def get(self, key: Hashable, default=None):
        if key not in self._data:
            return default
        self._data.move_to_end(key)
        return self._data[key][0]

    def __getitem__(self, key: Hashable):
        if key not in self._data:
            raise KeyError(key)
        return self.get(key)

    def __setitem__(self, key: Hashable, value: Any) -> None:
        if key in self._data:
            self.bytes -= self._data.pop(key)[1]
        size = nbytes(value)
        self._data[key] = (value, size)
        self.bytes += size
        while self.max_bytes is not None and self.bytes > self.max_bytes and len(self._data) > 1:
            old, (val, n) = self._data.popitem(last=False)
            self.bytes -= n
            if self.on_evict is not None:
                self.on_evict(old, val)
