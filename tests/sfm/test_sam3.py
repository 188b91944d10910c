"""The SAM 3 backend, on a tiny randomly initialised Sam3Model (+ a tiny CLIP tokenizer) saved
and loaded back through the user's path, ``load_sfm("sam3", DIR)``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Sam3Model  # noqa: E402

from ssprompt.errors import UserError  # noqa: E402
from ssprompt.prompts.layout import grid_layout  # noqa: E402
from ssprompt.prompts.promptset import (PromptConfig, PromptSet, load_prompts,  # noqa: E402
                                        save_prompts)
from ssprompt.sfm import load_sfm  # noqa: E402
from ssprompt.sfm.base import PromptableSFM  # noqa: E402
from ssprompt.sfm.sam3 import Sam3SFM, log1m_product_sigmoid  # noqa: E402

from sfm.tiny import (SAM3_H as H, SAM3_Q as Q, SAM3_SIZE as SIZE, SAM3_T as T,  # noqa: E402
                      sam3_tokenizer as tiny_tokenizer,
                      save_tiny_sam3 as save_tiny)

torch.set_num_threads(1)
NAMES = ["cat", "traffic light", "sky"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("sam3"))


@pytest.fixture(scope="module")
def sam3(ckpt):
    return load_sfm("sam3", str(ckpt), device="cpu")


@pytest.fixture(scope="module")
def ref_model(ckpt):
    """transformers' own Sam3Model on the same checkpoint: the reference."""
    return Sam3Model.from_pretrained(str(ckpt), local_files_only=True).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def feats(sam3, images):
    return sam3.encode_image(images)


def _ref_forward(ref_model, images, names, queries=None):
    """Sam3Model.forward on pixels with the tokenizer's ids, one concept per image batch."""
    tok = tiny_tokenizer()(names, padding="max_length", max_length=T, return_tensors="pt")
    x = (images - 0.5) / 0.5
    outs = []
    with torch.no_grad():
        for c in range(len(names)):
            ids = tok.input_ids[c:c + 1].expand(len(images), -1)
            am = tok.attention_mask[c:c + 1].expand(len(images), -1)
            if queries is None:
                outs.append(ref_model(pixel_values=x, input_ids=ids, attention_mask=am))
            else:
                outs.append(torch.func.functional_call(
                    ref_model, {"detr_decoder.query_embed.weight": queries[:, :H],
                                "detr_decoder.reference_points.weight": queries[:, H:]},
                    kwargs=dict(pixel_values=x, input_ids=ids, attention_mask=am)))
    return outs


def test_protocol_sizes_and_frozen(sam3):
    assert isinstance(sam3, Sam3SFM) and isinstance(sam3, PromptableSFM)
    assert sam3.has_text_encoder is True
    assert sam3.embed_dim == H + 4 and sam3.text_dim == T * H and sam3.image_size == SIZE
    assert all(not p.requires_grad for p in sam3.parameters()) and not sam3.training


def test_default_embeddings_come_from_sam3s_own_encoders(sam3, ref_model):
    # class prompts: SAM 3's per-token text features, padding zeroed, flattened
    got = sam3.encode_texts(NAMES)
    assert got.shape == (3, T * H)
    tok = tiny_tokenizer()(NAMES, padding="max_length", max_length=T, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model.get_text_features(input_ids=tok.input_ids,
                                          attention_mask=tok.attention_mask).pooler_output
    seq = got.view(3, T, H)
    valid = tok.attention_mask.bool()
    torch.testing.assert_close(seq[valid], ref[valid])
    assert (seq[~valid] == 0).all() and (seq[valid].abs().sum(-1) > 0).all()
    assert (valid.sum(1) == torch.tensor([5, 14, 5])).all()   # a token a letter, + 2
    # spatial prompts: N = Q grid points give exactly SAM 3's Q learned queries, one each
    own = torch.cat([ref_model.detr_decoder.query_embed.weight,
                     ref_model.detr_decoder.reference_points.weight], -1).detach()
    sp = sam3.encode_points(grid_layout(Q))
    assert sp.shape == (Q, H + 4)
    match = (sp[:, None, :] == own[None]).all(-1)               # (Q, Q)
    assert (match.sum(1) == 1).all() and (match.sum(0) == 1).all()
    # N < Q: distinct learned queries, each the closest free one to its point
    sp25 = sam3.encode_points(grid_layout(25))
    idx = ((sp25[:, None, :] == own[None]).all(-1)).float().argmax(1)
    assert len(set(idx.tolist())) == 25
    centres = own[idx, H:H + 2].sigmoid()
    d_assigned = (centres - grid_layout(25)).norm(dim=1).mean()
    d_random = (own[torch.randperm(Q)[:25], H:H + 2].sigmoid() - grid_layout(25)).norm(dim=1)
    assert d_assigned < d_random.mean()
    # N > Q reuses queries in rounds
    assert sam3.encode_points(grid_layout(200)).shape == (200, H + 4)


def test_decode_with_defaults_matches_sam3_forward(sam3, ref_model, images, feats):
    """C classes = C SAM 3 forwards, one per class text: pair (c, n) (at c * Q + n) has query
    n's mask and SAM 3's own score p(c, n) from concept c's forward (class probabilities
    [0, .., p, .., 0, 1 - p]), and the semantic maps are each forward's semantic head."""
    spatial = sam3.encode_points(grid_layout(Q))
    semantic = sam3.encode_texts(NAMES)
    with torch.no_grad():
        out = sam3.decode(feats, spatial, semantic)
    refs = _ref_forward(ref_model, images, NAMES)
    own = torch.cat([ref_model.detr_decoder.query_embed.weight,
                     ref_model.detr_decoder.reference_points.weight], -1).detach()
    perm = ((spatial[:, None, :] == own[None]).all(-1)).float().argmax(1)  # grid -> model order
    c = len(NAMES)
    assert out.own_scores and out.mask_logits.shape == (2, c * Q, 64, 64)
    assert out.class_logits.shape == (2, c * Q, c + 1)
    score = torch.stack([r.pred_logits[:, perm].sigmoid() * r.presence_logits.sigmoid()
                         for r in refs], 1).flatten(1)                  # (B, C * Q)
    concept = torch.arange(c).repeat_interleave(Q)
    want = torch.zeros(2, c * Q, c + 1)
    want[:, torch.arange(c * Q), concept] = score
    want[..., -1] = 1 - score
    torch.testing.assert_close(out.class_logits.softmax(-1), want, atol=1e-5, rtol=1e-4)
    masks = torch.cat([r.pred_masks[:, perm] for r in refs], 1)
    torch.testing.assert_close(out.mask_logits, masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.semantic_logits, torch.cat([r.semantic_seg for r in refs], 1),
                               atol=1e-4, rtol=1e-4)
    # one concept: the pairs are the queries, scored by SAM 3's own score exactly
    with torch.no_grad():
        one = sam3.decode(feats, spatial, semantic[1:2])
    torch.testing.assert_close(one.class_logits.softmax(-1)[..., 0], score[:, Q:2 * Q],
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one.mask_logits, refs[1].pred_masks[:, perm], atol=1e-4,
                               rtol=1e-4)


def _post_process_instance_segmentation(out, threshold: float, target_size) -> dict:
    """``Sam3ImageProcessor.post_process_instance_segmentation`` (transformers
    models/sam3/image_processing_sam3.py) of one image, replicated without torchvision: score =
    sigmoid(pred_logits) * sigmoid(presence_logits), kept above ``threshold``; masks = sigmoid,
    bilinearly resized (align_corners=False) to the target size, > 0.5."""
    scores = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid())[0]
    keep = scores > threshold
    masks = torch.nn.functional.interpolate(out.pred_masks[:, keep].sigmoid(),
                                            size=target_size, mode="bilinear",
                                            align_corners=False)[0]
    return {"scores": scores[keep], "masks": masks > 0.5}


def test_replicated_post_processing_is_the_processors(ref_model):
    """``_post_process_instance_segmentation`` (which the test above uses so that it runs
    without torchvision) equals ``Sam3ImageProcessor.post_process_instance_segmentation``."""
    from sfm import conformance

    conformance.torchvision_or_skip()
    from transformers import Sam3ImageProcessor

    image = conformance.images()["wide"]
    proc = Sam3ImageProcessor(size={"height": SIZE, "width": SIZE})
    tok = tiny_tokenizer()(["cat"], padding="max_length", max_length=T, return_tensors="pt")
    with torch.no_grad():
        out = ref_model(pixel_values=proc(images=[image], return_tensors="pt")["pixel_values"],
                        input_ids=tok.input_ids, attention_mask=tok.attention_mask)
    threshold = float((out.pred_logits.sigmoid() * out.presence_logits.sigmoid()).median())
    want = proc.post_process_instance_segmentation(out, threshold=threshold,
                                                   target_sizes=[image.shape[:2]])[0]
    got = _post_process_instance_segmentation(out, threshold, image.shape[:2])
    assert len(got["scores"]) > 0
    torch.testing.assert_close(got["scores"], want["scores"])
    assert torch.equal(got["masks"], want["masks"].bool())


def test_zero_shot_instances_and_semantics_are_sam3s_per_class_outputs(sam3, ref_model):
    """ssprompt's zero-shot SAM 3 with 3 classes on a non-square image (224 x 160): its
    instances (masks, scores, classes) are those of 3 separate Sam3Model forwards, one per
    class text, each post-processed as post_process_instance_segmentation does, concatenated;
    its semantic map is the per-pixel argmax of the 3 forwards' semantic heads."""
    from sfm import conformance

    from ssprompt.evaluation.postprocess import postprocess
    from ssprompt.geometry import geometry_of
    from ssprompt.prompts.spatial import default_spatial
    from ssprompt.sfm.base import encode_images

    image = conformance.images()["tall"]
    hw = image.shape[:2]
    # SAM 3's preprocessing (the parity test checks it against Sam3ImageProcessor's)
    pixels = sam3.processor([image])
    tok = tiny_tokenizer()(NAMES, padding="max_length", max_length=T, return_tensors="pt")
    with torch.no_grad():
        refs = [ref_model(pixel_values=pixels, input_ids=tok.input_ids[c:c + 1],
                          attention_mask=tok.attention_mask[c:c + 1])
                for c in range(len(NAMES))]
    # the tiny random model scores every pair ~0.25: cut in the widest gap near the median so
    # that about half the pairs are kept and no pair sits on the threshold
    all_scores = torch.cat([(r.pred_logits.sigmoid() * r.presence_logits.sigmoid())[0]
                            for r in refs]).sort().values
    mid = len(all_scores) // 2
    gaps = all_scores[mid - 10:mid + 10].diff()
    i = mid - 10 + int(gaps.argmax())
    threshold = float(all_scores[i:i + 2].mean())
    assert float(gaps.max()) > 1e-4
    ref = [_post_process_instance_segmentation(r, threshold, hw) for r in refs]
    ref_scores = torch.cat([r["scores"] for r in ref])
    ref_classes = torch.cat([torch.full((len(r["scores"]),), c) for c, r in enumerate(ref)])
    ref_masks = torch.cat([r["masks"] for r in ref])
    nonempty = ref_masks.flatten(1).any(1)           # ssprompt drops empty masks
    order = ref_scores[nonempty].argsort(descending=True)
    ref_scores, ref_classes = ref_scores[nonempty][order], ref_classes[nonempty][order]
    ref_masks = ref_masks[nonempty][order]

    with torch.no_grad():
        out = sam3.decode(encode_images(sam3, [image]), default_spatial(sam3),
                          sam3.encode_texts(NAMES))
    pred = postprocess(out, [hw], geometry_of(sam3), [True] * len(NAMES), threshold)[0]
    inst = pred.instances
    assert 20 <= len(ref_scores) <= 100 and len(set(ref_classes.tolist())) == len(NAMES)
    assert torch.equal(inst.categories, ref_classes)
    row = conformance.compare("sam3 3 classes", "tall", inst.masks, inst.scores, ref_masks,
                              ref_scores)
    assert row["n"] == len(ref_scores)
    # semantic: the class whose own semantic map is most probable, at the image's size
    probs = torch.cat([torch.nn.functional.interpolate(
        r.semantic_seg.sigmoid(), size=hw, mode="bilinear", align_corners=False)[0]
        for r in refs])
    agree = (pred.semantic == probs.argmax(0)).float().mean()
    assert agree >= 0.999 and len(pred.semantic.unique()) > 1
    # panoptic: from the kept pairs only
    assert all(s["score"] > threshold for s in pred.segments)
    # pruning (not training) keeps each image's best pairs, in pair order
    sam3.max_pairs = 20
    try:
        with torch.no_grad():
            few = sam3.decode(encode_images(sam3, [image]), default_spatial(sam3),
                              sam3.encode_texts(NAMES))
    finally:
        sam3.max_pairs = 1000
    best = out.class_logits[0, :, :-1].max(-1).values.topk(20).indices.sort().values
    torch.testing.assert_close(few.class_logits[0], out.class_logits[0, best])
    torch.testing.assert_close(few.mask_logits[0], out.mask_logits[0, best])


def test_fewer_queries_match_sam3_with_those_queries(sam3, ref_model, images, feats):
    spatial = sam3.encode_points(grid_layout(25))
    with torch.no_grad():
        out = sam3.decode(feats, spatial, sam3.encode_texts(NAMES[:1]))
    ref = _ref_forward(ref_model, images, NAMES[:1], queries=spatial)[0]
    torch.testing.assert_close(out.mask_logits, ref.pred_masks, atol=1e-4, rtol=1e-4)


def test_chunking_and_batched_prompt_sets_do_not_change_outputs(sam3, feats):
    spatial = sam3.encode_points(grid_layout(25))
    semantic = sam3.encode_texts(NAMES)
    with torch.no_grad():
        whole = sam3.decode(feats, spatial, semantic)
        sam3.concept_chunk = 1
        try:
            chunked = sam3.decode(feats, spatial, semantic)
        finally:
            sam3.concept_chunk = 8
        # two prompt sets along the batch (train_many): image 0 with set A, image 1 with set B
        other = spatial.flip(0).clone()
        sp = torch.stack([spatial, other])
        se = torch.stack([semantic, semantic.flip(0)])
        mixed = sam3.decode(feats, sp, se)
        alone_b = sam3.decode(feats.index(slice(1, 2)), other, semantic.flip(0))
    torch.testing.assert_close(whole.mask_logits, chunked.mask_logits)
    torch.testing.assert_close(whole.class_logits, chunked.class_logits)
    torch.testing.assert_close(mixed.mask_logits[:1], whole.mask_logits[:1], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(mixed.mask_logits[1:], alone_b.mask_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed.class_logits[1:], alone_b.class_logits, atol=1e-5,
                               rtol=1e-5)


def test_gradients_reach_only_the_prompts(sam3, feats):
    spatial = torch.nn.Parameter(sam3.encode_points(grid_layout(25)))
    semantic = torch.nn.Parameter(sam3.encode_texts(NAMES))
    out = sam3.decode(feats, spatial, semantic)
    (out.mask_logits.sigmoid().mean() + out.class_logits.log_softmax(-1)[..., 0].mean()
     ).backward()
    assert spatial.grad is not None and spatial.grad[:, :H].abs().sum() > 0
    assert spatial.grad[:, H:].abs().sum() > 0                     # the reference boxes too
    g = semantic.grad.view(3, T, H)
    valid = (semantic.detach().view(3, T, H) != 0).any(-1)
    assert g[valid].abs().sum() > 0 and (g[~valid] == 0).all()     # padding gets no gradient
    assert all(p.grad is None and not p.requires_grad for p in sam3.parameters())


@pytest.mark.parametrize("learners", ["spatial", "semantic", "spatial,semantic"])
@pytest.mark.parametrize("kind", ["zero_shot", "average", "weighted", "learned_only"])
def test_every_learner_and_fusion_mode_trains(sam3, feats, kind, learners):
    cfg = PromptConfig(kind=kind, learners=learners, n_prompts=25)
    ps = PromptSet(sam3, NAMES, cfg, generator=torch.Generator().manual_seed(0))
    spatial, semantic = ps()
    assert spatial.shape == (25, H + 4) and semantic.shape == (3, T * H)
    out = sam3.decode(feats, spatial, semantic)
    assert out.mask_logits.shape == (2, 75, 64, 64) and out.class_logits.shape == (2, 75, 4)
    assert torch.isfinite(out.mask_logits).all() and torch.isfinite(out.class_logits).all()
    if kind == "zero_shot":
        assert ps.num_trainable() == 0
        return
    (out.mask_logits.mean() + out.class_logits.mean()).backward()
    names = {n for n, p in ps.named_parameters() if p.requires_grad}
    assert names and all(p.grad is not None for p in ps.parameters() if p.requires_grad)
    assert any(n.startswith("spatial") for n in names) == ("spatial" in learners)
    assert any(n.startswith("semantic") for n in names) == ("semantic" in learners)
    assert all(p.grad is None for p in sam3.parameters())


@pytest.mark.parametrize("n", [25, 200])
def test_any_number_of_queries(sam3, feats, n):
    spatial = sam3.encode_points(grid_layout(n)).requires_grad_()
    out = sam3.decode(feats, spatial, sam3.encode_texts(NAMES[:2]))
    assert out.mask_logits.shape == (2, 2 * n, 64, 64)          # (class, query) pairs
    assert out.class_logits.shape == (2, 2 * n, 3)
    assert torch.isfinite(out.mask_logits).all()
    out.mask_logits.mean().backward()
    assert spatial.grad.shape == (n, H + 4) and spatial.grad.abs().sum() > 0


def test_class_agnostic_and_prompt_engineering(sam3, feats):
    spatial = sam3.encode_points(grid_layout(25))
    with torch.no_grad():
        agnostic = sam3.decode(feats, spatial, None)
        obj = sam3.decode(feats, spatial, sam3.encode_texts(["object"]))
    assert agnostic.class_logits.shape == (2, 25, 2)
    torch.testing.assert_close(agnostic.class_logits, obj.class_logits)
    pe = PromptSet(sam3, NAMES, PromptConfig(kind="prompt_engineering"))
    eng = pe()[1]
    assert eng.shape == (3, T * H) and not torch.allclose(eng, sam3.encode_texts(NAMES))


def test_prompts_save_and_reload(sam3, feats, tmp_path):
    ps = PromptSet(sam3, NAMES, PromptConfig(kind="weighted", n_prompts=25),
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ps.semantic.learned.add_(0.01 * torch.randn_like(ps.semantic.learned)
                                 * (ps.semantic.default != 0))
        ps.spatial.learned.add_(0.01)
    save_prompts(tmp_path / "p.safetensors", ps, {"weights_hash": sam3.weights_hash()})
    loaded = load_prompts(tmp_path / "p.safetensors")
    spatial, semantic = loaded[0], loaded[1]
    with torch.no_grad():
        a = sam3.decode(feats, *ps())
        b = sam3.decode(feats, spatial, semantic)
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    torch.testing.assert_close(a.class_logits, b.class_logits)


def test_log1m_product_sigmoid_is_stable():
    a = torch.tensor([-30.0, 0.0, 3.0, 40.0])
    b = torch.tensor([5.0, 0.0, -2.0, 40.0])
    want = torch.log1p(-(a.double().sigmoid() * b.double().sigmoid())).float()
    got = log1m_product_sigmoid(a, b)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:3], want[:3])
    assert got[3] < -35                              # log(1 - ~1), not -inf or nan


def test_vanilla_2d_and_bad_input_are_one_line_errors(sam3, feats, ckpt, tmp_path):
    ps = PromptSet(sam3, NAMES, PromptConfig(kind="vanilla_2d", learners="spatial",
                                             n_prompts=25))
    with pytest.raises(UserError, match="object queries") as e:
        ps()
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="all zeros"):
        sam3.decode(feats, sam3.encode_points(grid_layout(4)), torch.zeros(1, T * H))
    with pytest.raises(UserError, match="needs a checkpoint"):
        load_sfm("sam3", None, device="cpu")
    with pytest.raises(UserError, match="not found") as e:
        load_sfm("sam3", str(tmp_path / "nope"), device="cpu")
    assert "huggingface-cli download facebook/sam3" in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam"}))
    with pytest.raises(UserError, match="not a SAM 3 checkpoint"):
        load_sfm("sam3", str(tmp_path), device="cpu")
    notok = tmp_path / "no_tokenizer"
    notok.mkdir()
    for f in ckpt.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (notok / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError, match="tokenizer") as e:
        load_sfm("sam3", str(notok), device="cpu")
    assert "\n" not in str(e.value)


def test_cli_full_ssprompt_train_and_eval_on_coco_panoptic(ckpt, tmp_path):
    """`ssprompt train --sfm sam3 --learners spatial,semantic --kind weighted` on a COCO
    panoptic fixture (96 x 96 scenes, letterboxed up to 224), then `ssprompt eval` of the saved
    prompts: all three metrics, finite."""
    import math

    from cli_helpers import ssprompt
    from ssprompt.data.coco import export_coco
    from ssprompt.data.scenes import SceneSplit

    root = tmp_path / "coco"
    export_coco(SceneSplit("novel", "train", n=3), root, "train")
    export_coco(SceneSplit("novel", "test", n=2), root, "test")
    out = tmp_path / "run"
    r = ssprompt("train", "--sfm", "sam3", "--checkpoint", ckpt, "--device", "cpu",
                 "--data", f"coco:{root}", "--learners", "spatial,semantic", "--kind",
                 "weighted", "--n-prompts", 25, "--shots", 2, "--steps", 2, "--batch", 2,
                 "--no-select", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["trained_params"] > 25 * (H + 4)           # spatial + semantic prompts
    r = ssprompt("eval", "--sfm", "sam3", "--checkpoint", ckpt, "--device", "cpu",
                 "--data", f"coco:{root}", "--prompts", out / "prompts.safetensors",
                 "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for k in ("mIoU", "AP50", "PQ"):
        assert isinstance(m[k], float) and math.isfinite(m[k]) and 0.0 <= m[k] <= 100.0
    assert m["n_test"] == 2
    assert m["weights_hash"] == json.loads((out / "config.json").read_text())["weights_hash"]


@pytest.mark.parametrize("shape", ["tall", "wide", "square"])
def test_parity_with_sam3_processor_model_and_post_process(sam3, ref_model, shape):
    """Default prompts (all of SAM 3's own queries) and one class name: ssprompt's per-query
    masks and scores equal ``Sam3ImageProcessor -> Sam3Model -> post_process_instance_
    segmentation`` (every query kept), and its preprocessing equals the processor's."""
    from sfm import conformance

    conformance.torchvision_or_skip()
    from transformers import Sam3ImageProcessor

    image = conformance.images()[shape]
    proc = Sam3ImageProcessor(size={"height": SIZE, "width": SIZE})
    inputs = proc(images=[image], return_tensors="pt")
    assert torch.equal(sam3.processor([image]), inputs["pixel_values"])
    assert sam3.default_n_prompts == Q
    masks, scores, spatial = conformance.ours(sam3, image, sam3.encode_texts(["cat"]))
    # default_spatial gives SAM 3's queries in grid order: the same queries, permuted
    order = [int((sam3.queries() == row).all(1).nonzero()[0]) for row in spatial]
    assert sorted(order) == list(range(Q))
    tok = tiny_tokenizer()(["cat"], padding="max_length", max_length=T, return_tensors="pt")
    with torch.no_grad():
        out = ref_model(pixel_values=inputs["pixel_values"], input_ids=tok.input_ids,
                        attention_mask=tok.attention_mask)
    ref = proc.post_process_instance_segmentation(out, threshold=-1.0, mask_threshold=0.5,
                                                  target_sizes=[image.shape[:2]])[0]
    conformance.compare("sam3", shape, masks, scores, ref["masks"][order], ref["scores"][order])


def test_zero_shot_defaults_to_sam3s_own_number_of_queries(sam3, ckpt, tmp_path):
    """Without --n-prompts, `ssprompt eval` and the Predictor use the model's num_queries (Q = 50
    in the tiny config, neither the old default 100 nor the released 200); a PromptConfig
    without n_prompts takes it too."""
    from cli_helpers import ssprompt
    from ssprompt.data.coco import export_coco
    from ssprompt.data.scenes import SceneSplit
    from ssprompt.predictor import Predictor

    assert sam3.default_n_prompts == Q == sam3.model.config.detr_decoder_config.num_queries
    root = tmp_path / "coco"
    export_coco(SceneSplit("novel", "test", n=2), root, "test")
    r = ssprompt("eval", "--sfm", "sam3", "--checkpoint", ckpt, "--device", "cpu",
                 "--data", f"coco:{root}", "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["prompt_meta"]["n_prompts"] == Q
    assert Predictor(sam3, class_names=NAMES).spatial.shape[0] == Q
    cfg = PromptConfig(kind="zero_shot")
    PromptSet(sam3, NAMES, cfg)
    assert cfg.n_prompts == Q
