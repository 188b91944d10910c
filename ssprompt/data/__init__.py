"""Datasets: the embedded scene tasks and COCO-format data, behind one ``open_dataset``."""

from __future__ import annotations

from ..errors import UserError
from .scenes import TASKS, SceneSplit


def open_dataset(spec: str, split: str, shots: int = 16, seed: int = 0,
                 n_test: int | None = None, size: int = 96):
    """A named embedded task (``shift``, ``novel``, ``stuff``, ``source``) or ``coco:PATH``
    (a COCO-layout folder: ``train`` draws ``shots`` images, ``test`` keeps the first
    ``n_test``, or all)."""
    if spec.startswith("coco:"):
        from .coco import CocoDataset

        if not spec[5:]:
            raise UserError(f"{spec}: give the dataset folder, as in coco:/data/coco")
        return CocoDataset(spec[5:], split, size=size,
                           shots=shots if split == "train" else None, seed=seed,
                           n=n_test if split == "test" else None)
    if spec not in TASKS:
        raise UserError(f"--task {spec}: unknown task; choose one of {', '.join(TASKS)} "
                        "or coco:PATH")
    return SceneSplit(spec, split, n=n_test, shots=shots, seed=seed, size=size)
