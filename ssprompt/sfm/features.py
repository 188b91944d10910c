"""Cache of frozen image features: the image encoder runs once per image, not once per step.

Keyed by (SFM weights hash, image content hash), so features are never reused across models.
Kept in memory up to ``max_bytes`` (least recently used entries are evicted) and, with a
``directory``, on disk too (one safetensors file per image): an evicted entry is read back from
there, always onto the SFM's device. A damaged disk entry is recomputed with a one-line warning.
Images of any size are preprocessed as the backend's own processor does (``base.encode_images``;
the embedded SFM letterboxes them to its square input, ``ssprompt.geometry``).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch

from ..io import write_bytes
from ..lru import LRUCache
from .base import Features, PromptableSFM, encode_images, sfm_device

DEFAULT_MAX_BYTES = 2 * 1024 ** 3  # in-memory features; past this, least recently used go


def image_key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()
                        + str(image.shape).encode()).hexdigest()


class FeatureCache:
    """``batch``: images per encoder pass. 1 (the default) makes an image's features
    independent of which images were requested with it: the encoder's float results depend on
    its batch size, and so would every number downstream (measured: trained cells moved)."""

    def __init__(self, directory: str | Path | None = None, batch: int = 1,
                 max_bytes: int | None = DEFAULT_MAX_BYTES):
        self.dir = Path(directory) if directory else None
        self.mem = LRUCache(max_bytes)
        self.batch = batch
        self.encoder_calls = 0   # images actually run through the image encoder

    def get(self, sfm: PromptableSFM, images: list[np.ndarray]) -> Features:
        """Features for ``images`` (uint8 HxWx3 each, any sizes), batched on dim 0, on the
        SFM's device."""
        h = sfm.weights_hash()
        device = sfm_device(sfm)
        keys = [(h, image_key(im)) for im in images]
        found: dict[tuple[str, str], Features] = {}
        missing = []
        for i, k in enumerate(keys):
            f = self.mem.get(k) if k in self.mem else self._load(k, device)
            if f is None:
                missing.append(i)
            else:
                found[k] = f
        for s in range(0, len(missing), self.batch):
            idx = missing[s:s + self.batch]
            with torch.no_grad():
                feats = encode_images(sfm, [images[i] for i in idx], device)
            self.encoder_calls += len(idx)
            for j, i in enumerate(idx):
                one = Features({k: v[j:j + 1].detach() for k, v in feats.tensors.items()})
                self.mem[keys[i]] = found[keys[i]] = one
                self._save(keys[i], one)
        return Features.cat([found[k] for k in keys])

    def _path(self, key: tuple[str, str]) -> Path:
        return self.dir / key[0] / f"{key[1]}.safetensors"

    def _load(self, key, device) -> Features | None:
        if self.dir is None or not self._path(key).exists():
            return None
        from safetensors.torch import load_file
        try:
            feats = Features(load_file(str(self._path(key)), device=str(device)))
        except Exception as e:  # any damage: recompute, never trust it
            warnings.warn(f"{self._path(key)}: damaged feature cache entry, recomputing "
                          f"({type(e).__name__})", stacklevel=3)
            return None
        self.mem[key] = feats
        return feats

    def _save(self, key, feats: Features) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save
        write_bytes(self._path(key),
                    save({k: v.contiguous().cpu() for k, v in feats.tensors.items()}))
