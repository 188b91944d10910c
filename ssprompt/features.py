"""Cache of frozen image features: the image encoder runs once per image, not once per step.

Keyed by (SFM weights hash, image content hash), so features are never reused across models;
kept in memory, and optionally on disk (one safetensors file per image).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .sfm.base import Features, PromptableSFM, sfm_device


def image_key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()
                        + str(image.shape).encode()).hexdigest()


def to_tensor(images: list[np.ndarray], device="cpu") -> torch.Tensor:
    arr = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(device)


class FeatureCache:
    def __init__(self, directory: str | Path | None = None, batch: int = 32):
        self.mem: dict[tuple[str, str], Features] = {}
        self.dir = Path(directory) if directory else None
        self.batch = batch
        self.encoder_calls = 0   # images actually run through the image encoder

    def get(self, sfm: PromptableSFM, images: list[np.ndarray]) -> Features:
        """Features for ``images`` (uint8 HxWx3 each), batched on dim 0."""
        h = sfm.weights_hash()
        keys = [(h, image_key(im)) for im in images]
        missing = [i for i, k in enumerate(keys) if k not in self.mem and not self._load(k)]
        device = sfm_device(sfm)
        for s in range(0, len(missing), self.batch):
            idx = missing[s:s + self.batch]
            with torch.no_grad():
                feats = sfm.encode_image(to_tensor([images[i] for i in idx], device))
            self.encoder_calls += len(idx)
            for j, i in enumerate(idx):
                one = Features({k: v[j:j + 1].detach() for k, v in feats.tensors.items()})
                self.mem[keys[i]] = one
                self._save(keys[i], one)
        return Features.cat([self.mem[k] for k in keys])

    def _path(self, key: tuple[str, str]) -> Path:
        return self.dir / key[0] / f"{key[1]}.safetensors"

    def _load(self, key) -> bool:
        if self.dir is None or not self._path(key).exists():
            return False
        from safetensors.torch import load_file
        try:
            self.mem[key] = Features(load_file(str(self._path(key))))
        except Exception:  # a damaged cache entry is recomputed, never trusted
            return False
        return True

    def _save(self, key, feats: Features) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_file
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        save_file({k: v.contiguous().cpu() for k, v in feats.tensors.items()}, str(tmp))
        tmp.replace(p)
