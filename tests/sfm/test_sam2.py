"""The SAM 2 backend, on a tiny randomly initialised Sam2Model saved and loaded back through the
user's path, ``load_sfm("sam2", DIR)``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Sam2Model  # noqa: E402

from ssprompt.errors import UserError  # noqa: E402
from ssprompt.prompts.promptset import PromptConfig, PromptSet  # noqa: E402
from ssprompt.sfm import load_sfm  # noqa: E402
from ssprompt.sfm.base import PromptableSFM  # noqa: E402
from ssprompt.sfm.sam2 import Sam2SFM  # noqa: E402
from sfm.test_sam import check_point_embeddings_are_the_prompt_encoders  # noqa: E402

from sfm.tiny import SAM2_D as D, SAM2_SIZE as SIZE, save_tiny_sam2 as save_tiny  # noqa: E402
from sfm.tiny import sam2_config as tiny_config  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("sam2"))


@pytest.fixture(scope="module")
def sam2(ckpt):
    return load_sfm("sam2", str(ckpt), device="cpu")


@pytest.fixture(scope="module")
def ref_model(ckpt):
    return Sam2Model.from_pretrained(str(ckpt), local_files_only=True).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_protocol_sizes_and_frozen(sam2):
    assert isinstance(sam2, Sam2SFM) and isinstance(sam2, PromptableSFM)
    assert sam2.embed_dim == D and sam2.image_size == SIZE
    assert sam2.encode_texts(["cat"]) is None and sam2.has_text_encoder is False
    assert all(not p.requires_grad for p in sam2.parameters()) and not sam2.training


def test_encode_image_is_sam2s_own(sam2, ref_model, images):
    feats = sam2.encode_image(images)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = ref_model.get_image_embeddings((images - mean) / std)
    for key, want in zip(("feat_s0", "feat_s1", "image_embeddings"), ref):
        torch.testing.assert_close(feats.tensors[key], want)
    # another size is letterboxed (longest side to SIZE, zero padding), not stretched
    wide = torch.rand(1, 3, 32, 64)
    padded = torch.zeros(1, 3, SIZE, SIZE)
    padded[:, :, :32] = wide
    torch.testing.assert_close(sam2.encode_image(wide).tensors["image_embeddings"],
                               sam2.encode_image(padded).tensors["image_embeddings"])


def test_point_embeddings_are_sam2s_own(sam2, ref_model):
    check_point_embeddings_are_the_prompt_encoders(sam2, ref_model, SIZE, D)


def test_decode_of_point_embeddings_equals_sam2_forward(sam2, ref_model, images):
    n = 5
    pts = torch.rand(2, n, 2, generator=torch.Generator().manual_seed(3))
    feats = sam2.encode_image(images)
    spatial = torch.stack([sam2.encode_points(pts[b]) for b in range(2)])   # (B, N, D)
    emb = [feats.tensors[k] for k in ("feat_s0", "feat_s1", "image_embeddings")]
    with torch.no_grad():
        out = sam2.decode(feats, spatial, None)
        ref = ref_model(image_embeddings=emb, input_points=(pts * SIZE).unsqueeze(2),
                        multimask_output=False)
        sam2.prompt_chunk = 2                           # chunked decoding: same numbers
        try:
            chunked = sam2.decode(feats, spatial, None)
        finally:
            sam2.prompt_chunk = 64
    assert out.mask_logits.shape == (2, n, SIZE // 4, SIZE // 4)
    assert out.class_logits.shape == (2, n, 2)
    torch.testing.assert_close(out.mask_logits, ref.pred_masks[:, :, 0], atol=1e-4, rtol=1e-4)
    iou = ref.iou_scores[:, :, 0]
    torch.testing.assert_close(out.class_logits[..., 0], torch.logit(iou), atol=1e-4, rtol=1e-4)
    assert (out.class_logits[..., 1] == 0).all()
    torch.testing.assert_close(chunked.mask_logits, out.mask_logits)
    # an (N, D) spatial is shared by every image
    with torch.no_grad():
        shared = sam2.decode(feats, spatial[0], None)
        ref0 = ref_model(image_embeddings=emb,
                         input_points=(pts[:1] * SIZE).unsqueeze(2).expand(2, -1, -1, -1),
                         multimask_output=False)
    torch.testing.assert_close(shared.mask_logits, ref0.pred_masks[:, :, 0], atol=1e-4,
                               rtol=1e-4)


def test_gradients_reach_only_the_prompts_through_chunks(sam2, images):
    feats = sam2.encode_image(images[:1])
    spatial = torch.nn.Parameter(sam2.encode_points(torch.rand(5, 2)))
    sam2.prompt_chunk = 2                               # checkpointed chunks in backward
    try:
        out = sam2.decode(feats, spatial, None)
        (out.mask_logits.sigmoid().mean() + out.class_logits[..., 0].mean()).backward()
    finally:
        sam2.prompt_chunk = 64
    assert spatial.grad is not None and (spatial.grad.abs().sum(-1) > 0).all()
    assert all(p.grad is None and not p.requires_grad for p in sam2.parameters())


@pytest.mark.parametrize("n", [25, 200])
@pytest.mark.parametrize("mode", ["weighted", "vanilla_2d"])
def test_spaprompt_and_vanilla_run_for_any_n(sam2, images, n, mode):
    feats = sam2.encode_image(images)
    ps = PromptSet(sam2, ["thing"], PromptConfig(kind=mode, learners="spatial", n_prompts=n))
    spatial, semantic = ps()
    assert semantic is None and spatial.shape == (n, D)
    out = sam2.decode(feats, spatial, None)
    assert out.mask_logits.shape == (2, n, SIZE // 4, SIZE // 4)
    assert torch.isfinite(out.mask_logits).all()
    out.mask_logits.mean().backward()
    assert all(p.grad is not None for p in ps.trainable())


def test_semantic_prompts_and_bad_checkpoints_are_one_line_errors(sam2, images, tmp_path):
    with pytest.raises(UserError, match="SAM 2 has none"):
        sam2.decode(sam2.encode_image(images[:1]), torch.randn(2, D), torch.randn(3, D))
    with pytest.raises(UserError, match="no text encoder"):
        PromptSet(sam2, ["a", "b"], PromptConfig(kind="weighted", learners="semantic"))
    with pytest.raises(UserError, match="needs a checkpoint"):
        load_sfm("sam2", None, device="cpu")
    with pytest.raises(UserError) as e:
        load_sfm("sam2", str(tmp_path / "nope"), device="cpu")
    assert "not found" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam"}))
    with pytest.raises(UserError, match="not a SAM 2 checkpoint"):
        load_sfm("sam2", str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(tiny_config().to_json_string())
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt or incompatible SAM 2") as e:
        load_sfm("sam2", str(tmp_path), device="cpu")
    assert "\n" not in str(e.value)


def test_registry_lists_every_backend_in_the_cli_help():
    from cli_helpers import ssprompt
    from ssprompt.sfm import REGISTRY

    assert {"embedded", "sam", "sam2", "sam3"} <= set(REGISTRY)
    for command in (("train", "--help"), ("--help",)):   # a command's help and the top level
        r = ssprompt(*command)
        assert r.returncode == 0
        text = " ".join(r.stdout.split())
        for name, backend in REGISTRY.items():
            assert f"{name}: {backend.description}" in text
    with pytest.raises(UserError, match="unknown backend; choose one of embedded, sam, sam2"):
        load_sfm("sam4", None, device="cpu")


@pytest.mark.parametrize("shape", ["tall", "wide", "square"])
def test_parity_with_sam2_processor_model_and_post_process_masks(sam2, ref_model, shape):
    """Default prompts (SAM's 32 x 32 grid): ssprompt's masks and scores equal
    ``Sam2ImageProcessor -> Sam2Model -> post_process_masks``, and its preprocessing equals the
    processor's bit for bit."""
    from sfm import conformance

    conformance.torchvision_or_skip()
    from transformers import Sam2ImageProcessor

    from ssprompt.prompts.layout import grid_layout

    image = conformance.images()[shape]
    proc = Sam2ImageProcessor(size={"height": SIZE, "width": SIZE})
    inputs = proc(images=[image], return_tensors="pt")
    assert torch.equal(sam2.processor([image]), inputs["pixel_values"])
    masks, scores, _ = conformance.ours(sam2, image)
    pts = grid_layout(sam2.default_n_prompts) * SIZE
    with torch.no_grad():
        out = ref_model(pixel_values=inputs["pixel_values"], input_points=pts.view(1, -1, 1, 2),
                        multimask_output=False)
    ref = proc.post_process_masks(out.pred_masks, inputs["original_sizes"])[0][:, 0]
    conformance.compare("sam2", shape, masks, scores, ref, out.iou_scores[0, :, 0])
