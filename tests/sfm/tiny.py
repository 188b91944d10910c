"""Tiny random checkpoints of every packaged backend, saved the way a user's are (a safetensors
file for ``embedded``, a ``save_pretrained`` folder for the transformers backends): the one
place the backend tests and the conformance suite get them from (``SAVE[name](path, seed)``)."""

from __future__ import annotations

import torch

from cli_helpers import save_tiny_embedded, save_tiny_sam

SAM2_D, SAM2_SIZE = 32, 64           # SAM 2: hidden size; input (embedding 4 x 4, masks 16 x 16)
SAM3_H, SAM3_SIZE, SAM3_Q, SAM3_T = 64, 224, 50, 32   # SAM 3: hidden, input, queries, tokens


def sam2_config():
    from transformers import Sam2Config

    D, SIZE = SAM2_D, SAM2_SIZE
    hiera = dict(model_type="sam2_hiera_det_model", hidden_size=8, image_size=[SIZE, SIZE],
                 blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                 num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 2, 2],
                 global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2])
    return Sam2Config(
        vision_config=dict(model_type="sam2_vision_model", backbone_config=hiera,
                           backbone_channel_list=[64, 32, 16, 8],
                           backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=D),
        prompt_encoder_config=dict(hidden_size=D, image_size=SIZE, patch_size=16,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=D, mlp_dim=32, num_hidden_layers=2,
                                 num_attention_heads=2, iou_head_hidden_dim=16),
    )


def save_tiny_sam2(path, seed: int = 0):
    """A tiny random Sam2Model saved with save_pretrained (a ``--sfm sam2 --checkpoint``)."""
    from transformers import Sam2Model

    torch.manual_seed(seed)
    Sam2Model(sam2_config()).eval().save_pretrained(path)
    return path


def sam3_config():
    from transformers import Sam3Config

    H, SIZE, Q, T = SAM3_H, SAM3_SIZE, SAM3_Q, SAM3_T
    sub = dict(hidden_size=H, num_attention_heads=2, intermediate_size=128)
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=H,
                                 intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=SIZE, patch_size=14,
                                 window_size=8, global_attn_indexes=[1],
                                 pretrain_image_size=SIZE),
            fpn_hidden_size=H, backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]]),
        text_config=dict(vocab_size=514, hidden_size=H, intermediate_size=128,
                         projection_dim=H, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=T, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        geometry_encoder_config=dict(num_layers=1, **sub),
        detr_encoder_config=dict(num_layers=1, **sub),
        detr_decoder_config=dict(num_layers=2, num_queries=Q, **sub),
        mask_decoder_config=dict(hidden_size=H, num_attention_heads=2),
    )


def sam3_tokenizer():
    """A CLIP BPE tokenizer with the 256 byte symbols and no merges (one token a character)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    vocab = {s: i for i, s in enumerate(chars + [c + "</w>" for c in chars]
                                        + ["<|startoftext|>", "<|endoftext|>"])}
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=vocab, merges=[])


def save_tiny_sam3(path, seed: int = 0):
    """A tiny random Sam3Model and a tiny CLIP tokenizer saved with save_pretrained."""
    from transformers import Sam3Model

    torch.manual_seed(seed)
    model = Sam3Model(sam3_config()).eval()
    with torch.no_grad():  # spread the reference boxes over the image, as trained ones are
        ref = model.detr_decoder.reference_points.weight
        ref.copy_(torch.randn(ref.shape) * torch.tensor([1.5, 1.5, 0.5, 0.5])
                  - torch.tensor([0.0, 0.0, 1.5, 1.5]))
    model.save_pretrained(path)
    sam3_tokenizer().save_pretrained(path)
    return path

def _save_embedded(path, seed: int = 0):
    path.mkdir(parents=True, exist_ok=True)
    return save_tiny_embedded(path / "tiny.safetensors", seed)


SAVE = {"embedded": _save_embedded, "sam": save_tiny_sam, "sam2": save_tiny_sam2,
        "sam3": save_tiny_sam3}
