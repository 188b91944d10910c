"""Datasets: the embedded scene tasks and COCO-format data, behind one ``open_dataset``."""

from __future__ import annotations

from ..errors import UserError
from .scenes import TASKS, VOID, Scene, SceneSplit

# The role of a split (what ssprompt does with it) -> its default name in a COCO folder.
COCO_SPLITS = {"train": "train", "test": "test"}


def open_dataset(spec: str, split: str, shots: int = 16, seed: int = 0,
                 n_test: int | None = None, split_name: str | None = None, test_from: int = 0):
    """A named embedded task (``shift``, ``novel``, ``stuff``, ``source``) or ``coco:PATH``
    (a COCO-layout folder). ``split`` is the role: ``train`` draws ``shots`` images, ``test``
    keeps the first ``n_test`` (or all), ``val`` (scene tasks) is for tuning. ``split_name`` is
    the COCO split's own name for that role (default: the role, e.g. ``train2017``).
    ``test_from``: scene tasks' test split starts at this scene index (0: the usual test
    scenes; a new value gives scenes no study has scored)."""
    if spec.startswith("coco:"):
        from .coco import CocoDataset

        if not spec[5:]:
            raise UserError(f"{spec}: give the dataset folder, as in coco:/data/coco")
        return CocoDataset(spec[5:], split_name or COCO_SPLITS.get(split, split),
                           shots=shots if split == "train" else None, seed=seed,
                           n=n_test if split == "test" else None)
    if spec not in TASKS:
        raise UserError(f"task {spec}: unknown task; choose one of {', '.join(TASKS)} "
                        "or coco:PATH", field="task")
    return SceneSplit(spec, split, n=n_test, shots=shots, seed=seed, test_from=test_from)


__all__ = ["COCO_SPLITS", "Scene", "SceneSplit", "VOID", "open_dataset"]
