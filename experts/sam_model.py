"""The segmenter's model: the small SAM's config, build and weights, or an official SAM checkpoint.

The embedded default is a small SAM trained on the shapes world (``models/segmenter``: ``config.json``
+ ``segmenter.pt``), built from ``segment_anything.modeling`` with the official module structure so its
state-dict keys match the official layout. An official checkpoint (vit_b, vit_l, vit_h) loads through
``segment_anything.sam_model_registry``; both run through ``experts.sam_runner.SamRunner``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from switchboard.errors import SwitchboardError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


class SegmenterUnavailable(SwitchboardError):
    """The segmenter's weights are missing or cannot be loaded."""

    code = "segmenter_unavailable"
    status = 503


@dataclass
class SmallSamConfig:
    """Dimensions of a small SAM built from ``segment_anything.modeling`` (stored as config.json)."""

    img_size: int = 256
    patch_size: int = 16
    encoder_embed_dim: int = 128
    encoder_depth: int = 4
    encoder_num_heads: int = 4
    encoder_global_attn_indexes: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    window_size: int = 0
    use_rel_pos: bool = True
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 128
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 512
    decoder_num_heads: int = 4
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 128
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    # Inference: edge-aware refinement of the upsampled masks (see ``refine_mask``); radius in cells
    # of the decoder's low-resolution mask (0 = off), eps in (0-1 colour)^2.
    refine_cells: float = 1.5
    refine_eps: float = 0.01

    @classmethod
    def from_json(cls, path: Path) -> SmallSamConfig:
        data = json.loads(Path(path).read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_small_sam(cfg: SmallSamConfig) -> Sam:
    """A ``Sam`` with the official module structure (so the state-dict keys match the official layout)."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    emb = cfg.img_size // cfg.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.encoder_embed_dim,
            depth=cfg.encoder_depth, num_heads=cfg.encoder_num_heads, mlp_ratio=cfg.mlp_ratio,
            out_chans=cfg.prompt_embed_dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=cfg.use_rel_pos, window_size=cfg.window_size,
            global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(emb, emb),
            input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
    )


WEIGHTS_FILE = "segmenter.pt"
CONFIG_FILE = "config.json"


def load_small_sam(directory: Path) -> Sam:
    """The embedded segmenter: ``config.json`` + ``segmenter.pt`` (a half-precision state dict)."""
    import torch

    directory = Path(directory)
    cfg = SmallSamConfig.from_json(directory / CONFIG_FILE)
    sam = build_small_sam(cfg)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    sam.load_state_dict({k: v.float() for k, v in state.items()})
    return sam.eval()


def load_official_sam(checkpoint: Path, model_type: str) -> Sam:
    """An official SAM checkpoint through ``segment_anything.sam_model_registry`` (vit_b, vit_l, vit_h)."""
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise SegmenterUnavailable(f"unknown SAM model type {model_type!r}; "
                                   f"types: {', '.join(sorted(sam_model_registry))}")
    if not checkpoint.is_file():
        raise SegmenterUnavailable(f"SAM checkpoint {checkpoint} does not exist")
    try:
        return sam_model_registry[model_type](checkpoint=str(checkpoint)).eval()
    except RuntimeError as e:  # wrong type for the file: size mismatches in load_state_dict
        raise SegmenterUnavailable(f"{checkpoint} is not a {model_type} checkpoint: {str(e).splitlines()[0]}") from e
