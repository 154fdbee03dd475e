"""Versatile Diffusion on diffusers 0.42: the fixes we need, in our code (site-packages untouched).

Versatile Diffusion lives under `diffusers.pipelines.deprecated.versatile_diffusion` and is no
longer tested upstream. Two things broke; both are fixed here without patching diffusers:

1. `DualTransformer2DModel.forward` has no `encoder_attention_mask` parameter, but every
   cross-attention block of `UNet2DConditionModel` now passes one, so the dual-guided UNet
   fails on its first call. `CompatDualTransformer2DModel` accepts (and, like upstream does
   with `attention_mask`, ignores) it. `ensure_compat_dual_transformers` upgrades the dual
   transformers of a UNet that was loaded with `dual_cross_attention=True` already.
2. `from_pretrained` of a saved pipeline resolves `UNetFlatConditionModel` under `diffusers`
   (or, for the published folder, under the moved `versatile_diffusion` module) and fails.
   `load_text_unet` loads it with its own class; `vd_loader` passes it in explicitly.

The dual-guided model is the image UNet whose every `Transformer2DModel` is replaced by a dual
transformer holding [image transformer, text transformer-from-the-text-UNet]
(`to_dual_attention`, what the pipeline's `_convert_to_dual_attention` does), and whose outputs
are mixed inside every cross-attention layer (`set_mix_ratio`: the text share, 0.4 gives
vision 0.6 / text 0.4). The context is text (77) tokens then image (257) tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models import DualTransformer2DModel, Transformer2DModel, UNet2DConditionModel
from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

from .config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS

__all__ = [
    "CompatDualTransformer2DModel",
    "UNetFlatConditionModel",
    "dual_transformers",
    "ensure_compat_dual_transformers",
    "load_text_unet",
    "set_mix_ratio",
    "to_dual_attention",
]


class CompatDualTransformer2DModel(DualTransformer2DModel):
    """`DualTransformer2DModel` whose `forward` accepts the keywords today's UNet passes."""

    def forward(self, hidden_states, encoder_hidden_states, timestep=None, attention_mask=None,
                cross_attention_kwargs=None, encoder_attention_mask=None, return_dict: bool = True):
        # Upstream ignores masks here ("attention_mask is not used yet"); the two conditions
        # have fixed lengths, so there is nothing to mask. Dropping the keyword is the fix.
        return super().forward(hidden_states, encoder_hidden_states, timestep=timestep,
                               attention_mask=attention_mask,
                               cross_attention_kwargs=cross_attention_kwargs, return_dict=return_dict)


def dual_transformers(unet: torch.nn.Module) -> list[DualTransformer2DModel]:
    """Every dual transformer inside `unet`, in module order."""
    return [m for m in unet.modules() if isinstance(m, DualTransformer2DModel)]


def ensure_compat_dual_transformers(unet: torch.nn.Module) -> int:
    """Upgrade plain dual transformers in place (same weights, fixed `forward`); returns how many."""
    upgraded = 0
    for module in dual_transformers(unet):
        if not isinstance(module, CompatDualTransformer2DModel):
            module.__class__ = CompatDualTransformer2DModel  # adds no state, only the forward fix
            upgraded += 1
    return upgraded


def to_dual_attention(image_unet: UNet2DConditionModel, text_unet: UNetFlatConditionModel) -> int:
    """Give `image_unet` dual attention in place: [its own transformer, the text UNet's transformer].

    The text UNet's transformers work on the same hidden widths as the image UNet's (that is how
    Versatile Diffusion is trained), so they are moved over by module name. Only the
    transformers of `text_unet` are used afterwards. Returns the number of layers converted.
    """
    if dual_transformers(image_unet):  # saved after conversion: the text transformers are inside
        ensure_compat_dual_transformers(image_unet)
        return 0
    names = [name for name, module in image_unet.named_modules() if isinstance(module, Transformer2DModel)]
    for name in names:
        parent_name, index = name.rsplit(".", 1)
        index = int(index)
        image_transformer = image_unet.get_submodule(parent_name)[index]
        text_transformer = text_unet.get_submodule(parent_name)[index]
        cfg = image_transformer.config
        dual = CompatDualTransformer2DModel(
            num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
            in_channels=cfg.in_channels, num_layers=cfg.num_layers, dropout=cfg.dropout,
            norm_num_groups=cfg.norm_num_groups, cross_attention_dim=cfg.cross_attention_dim,
            attention_bias=cfg.attention_bias, sample_size=cfg.sample_size,
            num_vector_embeds=cfg.num_vector_embeds, activation_fn=cfg.activation_fn,
            num_embeds_ada_norm=cfg.num_embeds_ada_norm,
        )
        # The freshly built pair is discarded: the trained transformers take its place.
        dual.transformers[0] = image_transformer
        dual.transformers[1] = text_transformer
        dual.to(device=image_transformer.device, dtype=image_transformer.dtype)
        image_unet.get_submodule(parent_name)[index] = dual
    image_unet.register_to_config(dual_cross_attention=True)
    return len(names)


def set_mix_ratio(unet: torch.nn.Module, text_share: float, text_tokens: int = CLIP_TEXT_TOKENS,
                  image_tokens: int = CLIP_IMAGE_TOKENS) -> int:
    """Mix text and vision inside every cross-attention layer; returns the number of layers.

    `text_share` is diffusers' `mix_ratio`: the weight of the text condition (0.4 -> vision 0.6 /
    text 0.4). The context is laid out as [text tokens, image tokens]; the text tokens go to
    the text transformer (index 1) and the image tokens to the image transformer (index 0).
    """
    if not 0.0 <= text_share <= 1.0:
        raise ValueError(f"text_share must be in [0, 1], got {text_share}")
    duals = dual_transformers(unet)
    for module in duals:
        module.mix_ratio = float(text_share)
        module.condition_lengths = [int(text_tokens), int(image_tokens)]
        module.transformer_index_for_condition = [1, 0]
    return len(duals)


def load_text_unet(folder: Path | str, subfolder: str = "text_unet", **kwargs) -> UNetFlatConditionModel:
    """Load the text UNet of a saved Versatile Diffusion folder with its own class (breakage 2)."""
    return UNetFlatConditionModel.from_pretrained(str(folder), subfolder=subfolder, **kwargs)
