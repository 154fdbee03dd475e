"""A tiny random-weight Versatile Diffusion, written as a diffusers-format folder.

Same layout as the published `shi-labs/versatile-diffusion` folder (image UNet, flat text UNet,
AutoencoderKL, scheduler, CLIP tokenizer / encoders / image processor), so the one loader
(`vd_loader.load_versatile_diffusion`) serves both profiles. Sizes are chosen for a laptop CPU:

- the VAE downsamples 8x like the published one (512x512 -> 4x64x64 latents);
- the image UNet has three levels (16, 32, 64 channels) with cross-attention only at the
  coarsest (16x16 at 512 px), so one UNet step on a CFG batch of 2 is tens of ms on one core;
- the text UNet mirrors it with flat blocks (only its transformers are used, for dual attention);
- cross-attention width is `EMBED_DIM["tiny"]` (64), the width of the tiny CLIP projections;
- the latent scale follows the rule that gave the published 0.18215 (scaled latents of images
  have unit variance), measured on fixed smooth random images: with random weights the raw
  latents are far smaller than the published VAE's, and 0.18215 would drown the preview in noise.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .config import EMBED_DIM
from .errors import UserError

log = logging.getLogger(__name__)

# Published VD schedule (scaled-linear betas, 1000 steps).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)

TINY_UNET = dict(
    sample_size=64, layers_per_block=1, block_out_channels=(16, 32, 64), attention_head_dim=4,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(8, 8, 16, 16), norm_num_groups=8, sample_size=512,
)


def tiny_image_unet(embed_dim: int = EMBED_DIM["tiny"]):
    """The tiny image UNet (a `UNet2DConditionModel`, 4 latent channels in and out)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=4, out_channels=4, cross_attention_dim=embed_dim,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), **TINY_UNET)


def tiny_text_unet(embed_dim: int = EMBED_DIM["tiny"]):
    """The tiny text UNet (`UNetFlatConditionModel`), block-for-block like the image UNet."""
    from .vd_compat import UNetFlatConditionModel

    return UNetFlatConditionModel(
        in_channels=(embed_dim, 1, 1), out_channels=(embed_dim, 1, 1), cross_attention_dim=embed_dim,
        down_block_types=("DownBlockFlat", "DownBlockFlat", "CrossAttnDownBlockFlat"),
        up_block_types=("CrossAttnUpBlockFlat", "UpBlockFlat", "UpBlockFlat"), **TINY_UNET)


def tiny_vae():
    """The tiny `AutoencoderKL`: 4 levels (8x downsampling), 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, **TINY_VAE)


def unit_variance_scale(vae, seed: int = 0, n_images: int = 8, size: int = 128) -> float:
    """1 / std of the VAE's latent means over smooth random images (the SD rule for 0.18215)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n_images, 3, 8, 8, generator=generator) * 2 - 1
    images = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
    return round(1.0 / float(latents.std()), 5)


def write_tiny_versatile_diffusion(out_dir, clip_dir, seed: int = 0) -> Path:
    """Write a tiny random Versatile Diffusion folder built around the tiny CLIP in `clip_dir`.

    `clip_dir` is a folder written by `spikevaediff.core.tiny.write_tiny_clip` (or any CLIP
    folder of the same layout); its tokenizer, text / vision towers and image processor become
    the pipeline's. Deterministic for a given seed. Returns the folder.
    """
    import torch
    from diffusers import DDIMScheduler, VersatileDiffusionPipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    from .clip import load_image_processor

    from .tiny import write_atomically
    from .vd_loader import quiet_hf_logging

    clip_dir = Path(clip_dir)
    if not (clip_dir / "config.json").is_file():
        raise UserError(f"no CLIP folder at {clip_dir} (expected config.json); "
                        "write it first with `spikevaediff models init-tiny`")

    def build(folder: Path):
        # The towers load out of a full CLIPModel folder (the other tower's keys are skipped).
        text_encoder = CLIPTextModelWithProjection.from_pretrained(clip_dir, local_files_only=True)
        embed_dim = int(text_encoder.config.projection_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image_unet, text_unet, vae = tiny_image_unet(embed_dim), tiny_text_unet(embed_dim), tiny_vae()
        vae.register_to_config(scaling_factor=unit_variance_scale(vae, seed))
        pipe = VersatileDiffusionPipeline(
            tokenizer=CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True),
            image_feature_extractor=load_image_processor(clip_dir),
            text_encoder=text_encoder,
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(clip_dir, local_files_only=True),
            image_unet=image_unet, text_unet=text_unet, vae=vae,
            scheduler=DDIMScheduler(**SCHEDULE),
        )
        pipe.save_pretrained(folder)

    log.info("writing tiny Versatile Diffusion to %s", out_dir)
    with quiet_hf_logging():
        return write_atomically(Path(out_dir), build)
