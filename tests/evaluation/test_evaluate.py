"""evaluate_many: identical prompt sets are decoded once and score exactly as each alone."""

import torch

from ssprompt.data.scenes import SceneSplit
from ssprompt.evaluation.evaluate import evaluate, evaluate_many
from ssprompt.sfm.embedded import EmbeddedSFM
from ssprompt.sfm.features import FeatureCache


def test_identical_sets_are_scored_once_with_the_same_numbers():
    torch.manual_seed(0)
    sfm = EmbeddedSFM(embed_dim=32, mask_dim=16, layers=1, object_mask_threshold=0.05).eval()
    data = SceneSplit("shift", "test", n=4)
    c = len(data.class_names)
    a, b = (torch.randn(8, 32), torch.randn(c, 32)), (torch.randn(8, 32), torch.randn(c, 32))
    cache = FeatureCache()
    alone = [evaluate(sfm, *s, data, cache, batch=4) for s in (a, b)]
    samples = []
    decode = sfm.decode
    sfm.decode = lambda feats, *args, **kw: (samples.append(len(feats)), decode(feats, *args,
                                                                               **kw))[1]
    together = evaluate_many(sfm, [a, b, (a[0].clone(), a[1].clone()), a], data, cache, batch=8,
                             per_image=True)
    assert sum(samples) == 2 * len(data)          # two distinct sets decoded, not four
    for got, want in zip(together, [alone[0], alone[1], alone[0], alone[0]]):
        got.pop("per_image")
        assert got == want
    assert alone[0]["mIoU"] != alone[1]["mIoU"]      # the two sets really differ
    together[0]["mIoU"] = -1.0                       # copies, not one shared dict
    assert together[2]["mIoU"] == alone[0]["mIoU"]
