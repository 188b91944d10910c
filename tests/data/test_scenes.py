"""The embedded scene generator: determinism, label consistency, k-shot draws, task traits."""

from __future__ import annotations

import numpy as np
import pytest

from ssprompt.data import open_dataset
from ssprompt.data.fewshot import kshot_indices, kshot_indices_covering
from ssprompt.data.scenes import (CLASS_NAMES, HELD_OUT, VOID, TASKS, SceneSplit, get_task,
                                  make_scene)
from ssprompt.errors import UserError


def _same(a, b) -> bool:
    return (np.array_equal(a.image, b.image) and np.array_equal(a.semantic, b.semantic)
            and np.array_equal(a.instance, b.instance) and a.segments == b.segments)


def test_deterministic_per_index():
    spec = get_task("source")
    a, b = make_scene(spec, "test", 3), make_scene(spec, "test", 3)
    assert _same(a, b)
    assert not np.array_equal(a.image, make_scene(spec, "test", 4).image)
    assert not np.array_equal(a.image, make_scene(spec, "train", 3).image)


@pytest.mark.parametrize("task", list(TASKS))
def test_masks_match_maps(task):
    ds = SceneSplit(task, "test", n=3)
    nvocab = len(ds.class_names)
    assert len(ds.is_thing) == nvocab
    for i in range(len(ds)):
        s = ds[i]
        assert s.image.dtype == np.uint8 and s.image.shape == (96, 96, 3)
        assert s.semantic.dtype == np.int32 and s.instance.dtype == np.int32
        ids = [seg["id"] for seg in s.segments]
        assert len(set(ids)) == len(ids) and 0 not in ids
        for seg in s.segments:
            m = s.instance == seg["id"]
            assert m.sum() == seg["area"] > 0
            assert (s.semantic[m] == seg["category"]).all()
            assert seg["isthing"] == ds.is_thing[seg["category"]]
        void = s.instance == 0
        assert sum(seg["area"] for seg in s.segments) + void.sum() == 96 * 96
        assert (s.semantic[void] == VOID).all()
        assert set(np.unique(s.instance).tolist()) <= set(ids) | {0}
        assert (s.semantic[~void] < nvocab).all()
        labels, masks = s.targets()
        assert labels.shape == (len(ids),) and masks.shape == (len(ids), 96, 96)


def test_kshot_reproducible_and_seeded():
    a = SceneSplit("shift", "train", shots=8, seed=0).indices
    assert a == SceneSplit("shift", "train", shots=8, seed=0).indices
    assert a != SceneSplit("shift", "train", shots=8, seed=1).indices
    assert kshot_indices(100, 5, 3) == kshot_indices(100, 5, 3)
    assert kshot_indices(100, 5, 3) != kshot_indices(100, 5, 4)
    draw = kshot_indices(10, 10, 0)
    assert draw == list(range(10))


@pytest.mark.parametrize("k,n", [(0, 10), (-1, 10), (11, 10), (1, 0)])
def test_kshot_bad_k(k, n):
    with pytest.raises(UserError, match="shots"):
        kshot_indices(n, k, 0)


def test_kshot_covering_prefers_new_categories():
    cats = [[0]] * 8 + [[1], [2]]
    draw = kshot_indices_covering(cats, 3, seed=0)
    assert len(draw) == 3 and {8, 9} <= set(draw)
    assert draw == kshot_indices_covering(cats, 3, seed=0)


def test_novel_has_held_out_class():
    ds = SceneSplit("novel", "test", n=4)
    held = {ds.class_names.index(CLASS_NAMES[c]) for c in HELD_OUT}
    for i in range(len(ds)):
        present = {seg["category"] for seg in ds[i].segments}
        assert present & held, f"scene {i} has no held-out class"


def test_shift_is_degraded():
    """Shifted scenes lose contrast on average (darkness, fog and blur all shrink the pixel
    spread; mean brightness alone is no test, since fog brightens)."""
    def contrast(task: str) -> float:
        return float(np.mean([make_scene(get_task(task), "test", i).image.astype(np.float32).std()
                              for i in range(10)]))

    assert contrast("shift") < 0.7 * contrast("source")


def test_open_dataset_embedded_and_unknown():
    ds = open_dataset("stuff", "test", n_test=2)
    assert len(ds) == 2 and ds.class_names == SceneSplit("stuff", "test", n=2).class_names
    assert len(open_dataset("novel", "train", shots=3, seed=1)) == 3
    with pytest.raises(UserError, match="nosuchtask"):
        open_dataset("nosuchtask", "test")
