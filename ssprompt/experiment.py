"""One experiment cell: few-shot prompt learning of one variant on one task and seed, then
evaluation. Shared by ``ssprompt train`` and ``ssprompt study``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .data import open_dataset
from .features import FeatureCache
from .prompts.promptset import PromptConfig, PromptSet, config_dict
from .sfm.base import PromptableSFM
from .train import TrainConfig, train_many
from .distributed import shard
from .evaluate import evaluate


@dataclass
class CellSpec:
    task: str
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    shots: int = 16
    seed: int = 0
    n_test: int | None = None

    def as_dict(self) -> dict:
        return {"task": self.task, "prompt": config_dict(self.prompt), "train": asdict(self.train),
                "shots": self.shots, "seed": self.seed, "n_test": self.n_test}


class Workspace:
    """Datasets and image features shared by every cell of one process."""

    def __init__(self, sfm: PromptableSFM, cache: FeatureCache | None = None):
        self.sfm = sfm
        self.cache = cache if cache is not None else FeatureCache()
        self._data: dict[tuple, object] = {}

    def dataset(self, task: str, split: str, shots: int = 16, seed: int = 0,
                n_test: int | None = None):
        key = (task, split, shots if split == "train" else None,
               seed if split == "train" else None, n_test if split == "test" else None)
        if key not in self._data:
            self._data[key] = open_dataset(task, split, shots=shots, seed=seed, n_test=n_test,
                                           size=self.sfm.image_size)
        return self._data[key]


def run_cell(ws: Workspace, spec: CellSpec, progress: bool = False):
    """Returns (result dict, prompts, loss log)."""
    return run_cells(ws, [spec], progress)[0]


def run_cells(ws: Workspace, specs: list[CellSpec], progress: bool = False):
    """Several cells of one variant and task (e.g. its seeds), trained together in shared
    decoder passes (see ``train_many``), then evaluated one by one. Returns a list of
    (result dict, prompts, loss log)."""
    t0 = time.time()
    jobs = []
    for spec in specs:
        torch.manual_seed(spec.seed)
        g = torch.Generator().manual_seed(spec.seed)
        test = ws.dataset(spec.task, "test", n_test=spec.n_test)
        prompts = PromptSet(ws.sfm, test.class_names, spec.prompt, generator=g)
        train = ws.dataset(spec.task, "train", shots=spec.shots, seed=spec.seed) \
            if prompts.num_trainable() else None
        jobs.append((prompts, train, TrainConfig(**{**asdict(spec.train), "seed": spec.seed})))
    logs = train_many(ws.sfm, jobs, ws.cache, progress=progress)
    train_s = (time.time() - t0) / len(specs)
    out = []
    for spec, (prompts, _, _), log in zip(specs, jobs, logs):
        t1 = time.time()
        test = ws.dataset(spec.task, "test", n_test=spec.n_test)
        with torch.no_grad():
            spatial, semantic = prompts()
        metrics = evaluate(ws.sfm, spatial, semantic, test, ws.cache, indices=shard(len(test)))
        result = {**metrics, "trained_params": prompts.num_trainable(),
                  "wall_s": round(train_s + time.time() - t1, 2), "sfm": ws.sfm.weights_hash(),
                  "final_loss": log[-1]["loss"] if log else None, "spec": spec.as_dict()}
        out.append((result, prompts, log))
    return out
