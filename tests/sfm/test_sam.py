"""The SAM backend, on a tiny randomly initialised SamModel saved and loaded like a real one."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import SamConfig, SamModel  # noqa: E402

from cli_helpers import save_tiny_sam, tiny_sam_config  # noqa: E402
from ssprompt.errors import UserError  # noqa: E402
from ssprompt.sfm.base import Features, PromptableSFM  # noqa: E402
from ssprompt.sfm.sam import SamSFM, load_sam  # noqa: E402

torch.set_num_threads(1)
D = 16        # prompt encoder / mask decoder hidden size
SIZE = 64     # SAM input size; image embeddings are SIZE / 16 = 4 x 4, masks 16 x 16


def tiny_config() -> SamConfig:
    return tiny_sam_config()   # shared with other tests (cli_helpers)


save_tiny = save_tiny_sam      # save_tiny(path, seed): a tiny random SamModel, save_pretrained


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("sam_a"), seed=0)


@pytest.fixture(scope="module")
def sam(ckpt):
    return load_sam(ckpt)


@pytest.fixture(scope="module")
def ref_model(ckpt):
    """transformers' own SamModel on the same checkpoint: the reference."""
    return SamModel.from_pretrained(str(ckpt), local_files_only=True).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, SIZE, SIZE, generator=g)


def test_protocol_and_sizes(sam):
    assert isinstance(sam, PromptableSFM)
    assert sam.embed_dim == D and sam.image_size == SIZE
    assert sam.encode_texts(["cat", "dog"]) is None and sam.has_text_encoder is False
    assert sam.object_mask_threshold == 0.8
    assert all(not p.requires_grad for p in sam.parameters())
    assert not sam.training


def test_encode_image_matches_sam_preprocessing(sam, ref_model, images):
    feats = sam.encode_image(images)
    emb = feats.tensors["image_embeddings"]
    assert emb.shape == (2, D, SIZE // 16, SIZE // 16) and not emb.requires_grad
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = ref_model.get_image_embeddings((images - mean) / std)
    torch.testing.assert_close(emb, ref)
    # other sizes are resized to SAM's input
    big = sam.encode_image(torch.rand(1, 3, 96, 80))
    assert big.tensors["image_embeddings"].shape == (1, D, SIZE // 16, SIZE // 16)


def check_point_embeddings_are_the_prompt_encoders(sfm, ref_model, size: int, d: int):
    """``encode_points`` = the model's own prompt encoder on one positive point per prompt, and
    ``padding_embedding`` = the token it appends (SAM v1 and SAM 2 alike)."""
    pts = torch.rand(7, 2, generator=torch.Generator().manual_seed(2))
    got = sfm.encode_points(pts)
    assert got.shape == (7, d)
    with torch.no_grad():
        sparse, _ = ref_model.prompt_encoder(
            input_points=(pts * size).view(1, 7, 1, 2),
            input_labels=torch.ones(1, 7, 1, dtype=torch.int), input_boxes=None,
            input_masks=None)
    assert sparse.shape == (1, 7, 2, d)            # the point + the padding token
    torch.testing.assert_close(got, sparse[0, :, 0])
    # the padding token decode() appends is the one the prompt encoder appends
    torch.testing.assert_close(sfm.padding_embedding().expand(7, d), sparse[0, :, 1])
    # distinct points -> distinct embeddings (not a constant)
    assert (got[0] - got[1]).abs().max() > 1e-4


def test_point_embeddings_are_sams_own(sam, ref_model):
    check_point_embeddings_are_the_prompt_encoders(sam, ref_model, SIZE, D)


def test_decode_of_point_embeddings_equals_sam_forward(sam, ref_model, images):
    n = 5
    pts = torch.rand(2, n, 2, generator=torch.Generator().manual_seed(3))
    feats = sam.encode_image(images)
    spatial = torch.stack([sam.encode_points(pts[b]) for b in range(2)])  # (B, N, D)
    with torch.no_grad():
        out = sam.decode(feats, spatial, None)
        ref = ref_model(image_embeddings=feats.tensors["image_embeddings"],
                        input_points=(pts * SIZE).unsqueeze(2), multimask_output=False)
    assert out.mask_logits.shape == (2, n, SIZE // 4, SIZE // 4)
    assert out.class_logits.shape == (2, n, 2)
    torch.testing.assert_close(out.mask_logits, ref.pred_masks[:, :, 0], atol=1e-4, rtol=1e-4)
    iou = ref.iou_scores[:, :, 0]
    assert ((iou > 0.01) & (iou < 0.99)).all()     # the object logit is not at the clamp
    torch.testing.assert_close(out.class_logits[..., 0], torch.logit(iou), atol=1e-4, rtol=1e-4)
    assert (out.class_logits[..., 1] == 0).all()
    # an (N, D) spatial is shared by every image in the batch
    with torch.no_grad():
        shared = sam.decode(feats, spatial[0], None)
        ref0 = ref_model(image_embeddings=feats.tensors["image_embeddings"],
                         input_points=(pts[:1] * SIZE).unsqueeze(2).expand(2, -1, -1, -1),
                         multimask_output=False)
    torch.testing.assert_close(shared.mask_logits, ref0.pred_masks[:, :, 0], atol=1e-4,
                               rtol=1e-4)


def test_gradients_reach_only_the_prompts(sam, images):
    feats = sam.encode_image(images[:1])
    spatial = torch.nn.Parameter(torch.randn(3, D) * 0.1)
    out = sam.decode(feats, spatial, None)
    (out.mask_logits.sigmoid().mean() + out.class_logits[..., 0].mean()).backward()
    assert spatial.grad is not None and spatial.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in sam.parameters())

    points = torch.tensor([[0.3, 0.6], [0.7, 0.2]], requires_grad=True)
    out = sam.decode(feats, sam.encode_points(points), None)
    out.mask_logits.mean().backward()
    assert points.grad is not None and points.grad.abs().sum() > 0
    assert all(p.grad is None for p in sam.parameters())


@pytest.mark.parametrize("n", [25, 200])
def test_any_number_of_prompts(sam, images, n):
    feats = sam.encode_image(images)
    spatial = torch.randn(n, D, requires_grad=True)
    out = sam.decode(feats, spatial, None)
    assert out.mask_logits.shape == (2, n, SIZE // 4, SIZE // 4)
    assert out.class_logits.shape == (2, n, 2)
    assert torch.isfinite(out.mask_logits).all() and torch.isfinite(out.class_logits).all()
    out.mask_logits.mean().backward()
    assert spatial.grad.shape == (n, D)


def test_features_cache_roundtrip(sam, images):
    feats = sam.encode_image(images)
    part = Features.cat([feats.index(slice(0, 1)), feats.index(slice(1, 2))])
    spatial = torch.randn(4, D)
    with torch.no_grad():
        a, b = sam.decode(feats, spatial, None), sam.decode(part, spatial, None)
    torch.testing.assert_close(a.mask_logits, b.mask_logits)


def test_semantic_prompts_are_a_user_error(sam, images):
    feats = sam.encode_image(images[:1])
    with pytest.raises(UserError, match="text encoder"):
        sam.decode(feats, torch.randn(2, D), torch.randn(3, D))


def test_missing_or_wrong_checkpoint_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        load_sam(tmp_path / "nope")
    msg = str(e.value)
    assert "\n" not in msg and "not found" in msg and "as the checkpoint" in msg
    with pytest.raises(UserError, match="no config.json") as e:
        load_sam(tmp_path)                              # an empty directory
    assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="not a SAM checkpoint"):
        load_sam(tmp_path)
    (tmp_path / "config.json").write_text(tiny_config().to_json_string())
    with pytest.raises(UserError, match="no weights file"):
        load_sam(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError) as e:
        load_sam(tmp_path)
    assert "\n" not in str(e.value)


def test_weights_hash_is_stable_and_tracks_the_weights(ckpt, sam, tmp_path):
    h = sam.weights_hash()
    assert len(h) == 16 and int(h, 16) >= 0
    assert load_sam(ckpt).weights_hash() == h
    other = load_sam(save_tiny(tmp_path / "sam_b", seed=1))
    assert isinstance(other, SamSFM) and other.weights_hash() != h


@pytest.mark.parametrize("shape", ["tall", "wide", "square"])
def test_parity_with_sam_processor_model_and_post_process_masks(sam, ref_model, shape):
    """Default prompts (SAM's 32 x 32 grid): ssprompt's masks and scores equal
    ``SamImageProcessor -> SamModel -> post_process_masks`` on non-square images."""
    from transformers import SamImageProcessor

    from sfm import conformance

    image = conformance.images()[shape]
    assert sam.default_n_prompts == 1024
    masks, scores, _ = conformance.ours(sam, image)
    proc = SamImageProcessor(size={"longest_edge": SIZE}, pad_size={"height": SIZE, "width": SIZE})
    inputs = proc(images=[image], return_tensors="pt")
    from ssprompt.prompts.layout import grid_layout
    pts = grid_layout(1024) * SIZE       # the processor's coordinate rescaling, done
    with torch.no_grad():
        out = ref_model(pixel_values=inputs["pixel_values"], input_points=pts.view(1, -1, 1, 2),
                        multimask_output=False)
    ref = proc.post_process_masks(out.pred_masks, inputs["original_sizes"],
                                  inputs["reshaped_input_sizes"])[0][:, 0]
    conformance.compare("sam", shape, masks, scores, ref, out.iou_scores[0, :, 0])


def test_precision_is_fp32_by_default_and_bf16_on_request(ckpt, images):
    """Decoding runs in fp32 on every device unless bf16 is asked for (``load_sfm(precision=)``,
    the CLI's --precision); a bad value is a one-line UserError."""
    import contextlib

    from ssprompt.sfm import load_sfm
    from ssprompt.sfm.base import autocast

    assert isinstance(autocast(torch.device("cuda")), contextlib.nullcontext)
    fp32 = load_sfm("sam", str(ckpt), device="cpu")
    bf16 = load_sfm("sam", str(ckpt), device="cpu", precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    feats = fp32.encode_image(images)
    pts = torch.rand(4, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = fp32.decode(feats, fp32.encode_points(pts), None)
        b = bf16.decode(feats, bf16.encode_points(pts), None)
    assert a.mask_logits.dtype == torch.float32
    assert not torch.equal(a.mask_logits, b.mask_logits.float())      # bf16 really ran
    torch.testing.assert_close(a.mask_logits, b.mask_logits.float(), atol=0.1, rtol=0.05)
    with pytest.raises(UserError) as e:
        load_sfm("sam", str(ckpt), device="cpu", precision="fp16")
    assert "\n" not in str(e.value)
