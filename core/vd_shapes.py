"""The published models' architectures with random weights: for timing where the weights are absent.

Latency depends on the architecture, not on the weight values, so a GPU host without the
published files can still measure what the `paper` profile will cost: the Versatile Diffusion
image UNet (with dual attention), the SD AutoencoderKL, CLIP ViT-L/14 towers, and the
imagenet64 VDVAE. Configs are those of `shi-labs/versatile-diffusion` (diffusers layout) and
`openai/clip-vit-large-patch14`. The images such models make are noise: never use them for
anything but timing. The tokenizer is the tiny one (token ids only have to be in range).

Built straight on the target device (`torch.device` context), so no multi-GB CPU copy is made.
"""
from __future__ import annotations

import torch

from .config import CLIP_TEXT_TOKENS
from .vd_loader import VDComponents, quiet_hf_logging

PAPER_EMBED_DIM = 768
_UNET_COMMON = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=PAPER_EMBED_DIM, norm_num_groups=32, sample_size=64,
)
PAPER_IMAGE_UNET = dict(
    in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **_UNET_COMMON,
)
PAPER_TEXT_UNET = dict(
    in_channels=(PAPER_EMBED_DIM, 1, 1), out_channels=(PAPER_EMBED_DIM, 1, 1),
    down_block_types=("CrossAttnDownBlockFlat",) * 3 + ("DownBlockFlat",),
    up_block_types=("UpBlockFlat",) + ("CrossAttnUpBlockFlat",) * 3, **_UNET_COMMON,
)
PAPER_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=224, patch_size=14,
                       projection_dim=PAPER_EMBED_DIM, hidden_act="quick_gelu")
CLIP_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=CLIP_TEXT_TOKENS, vocab_size=49408,
                     projection_dim=PAPER_EMBED_DIM, hidden_act="quick_gelu")


def paper_image_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**PAPER_IMAGE_UNET)


def paper_text_unet():
    from .vd_compat import UNetFlatConditionModel

    return UNetFlatConditionModel(**PAPER_TEXT_UNET)


def paper_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**PAPER_VAE)


def clip_l14_towers(eos_id: int):
    """(text, vision) CLIP ViT-L/14 towers with projections, random weights."""
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    text = CLIPTextConfig(**CLIP_L14_TEXT, eos_token_id=eos_id, pad_token_id=eos_id)
    return CLIPTextModelWithProjection(text), CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14_VISION))


def paper_shaped_components(device: str = "cpu", dtype: torch.dtype | None = None,
                            seed: int = 0) -> VDComponents:
    """Versatile Diffusion at the published sizes, random weights, ready for `Refiner.from_components`."""
    from .tiny import CLIP_MEAN, CLIP_STD, image_processor_class
    from .tiny_tokenizers import clip_tokenizer
    from .tiny_vd import SCHEDULE
    from .vd_compat import Transformer2DModel, to_dual_attention

    tokenizer = clip_tokenizer()
    with quiet_hf_logging(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            image_unet, vae = paper_image_unet(), paper_vae()
            text_encoder, image_encoder = clip_l14_towers(tokenizer.eos_token_id)
        # The text UNet (1.7B parameters) only lends its transformers to the dual attention:
        # build it without storage and give just those transformers real, freshly drawn weights.
        with torch.device("meta"):
            text_unet = paper_text_unet()
        for module in text_unet.modules():
            if isinstance(module, Transformer2DModel):
                materialise(module, device)
    to_dual_attention(image_unet, text_unet)
    del text_unet
    processor = image_processor_class("CLIPImageProcessor")(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   image_mean=CLIP_MEAN, image_std=CLIP_STD)
    components = VDComponents(
        image_unet=image_unet.eval(), vae=vae.eval(), scheduler_config=dict(SCHEDULE),
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), image_encoder=image_encoder.eval(),
        image_feature_extractor=processor, source="paper-shaped (random weights)")
    with quiet_hf_logging():  # diffusers warns about casting with to(); these are fresh models
        return components.to(dtype=dtype)


def materialise(model: torch.nn.Module, device) -> int:
    """Give every module of `model` still on the meta device storage on `device` and fresh
    default-initialised weights (`reset_parameters`); returns how many modules it touched."""
    touched = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if any(t.is_meta for t in own):
            if not hasattr(module, "reset_parameters"):
                raise TypeError(f"cannot initialise a {type(module).__name__} left on the meta device")
            module.to_empty(device=device, recurse=False)
            module.reset_parameters()
            touched += 1
    return touched


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
