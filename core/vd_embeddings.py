"""CLIP embeddings exactly as Versatile Diffusion consumes them, from the VD folder's own encoders.

- text: `text_projection(last_hidden_state)` for all 77 tokens, divided by the norm of the
  projected pooled token (`text_embeds`);
- vision: `visual_projection(post_layernorm(last_hidden_state))` for all 257 tokens, divided by
  the norm of token 0.

The refiner needs them for its unconditional inputs (CLIP-Text of "" and CLIP-Vision of a
mid-grey image) and the `--demo` mode; the trained decoder predicts the same quantities.
"""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def text_embeddings(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """[N, 77, D] VD-normalised CLIP-Text embeddings of `prompts`."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    out = text_encoder(tokens.input_ids.to(text_encoder.device))
    embeds = text_encoder.text_projection(out.last_hidden_state)
    return embeds / torch.norm(out.text_embeds.unsqueeze(1), dim=-1, keepdim=True)


@torch.no_grad()
def vision_embeddings_from_pixels(image_encoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, 257, D] VD-normalised CLIP-Vision embeddings of already-preprocessed pixels."""
    pixel_values = pixel_values.to(device=image_encoder.device, dtype=image_encoder.dtype)
    out = image_encoder(pixel_values)
    embeds = image_encoder.visual_projection(image_encoder.vision_model.post_layernorm(out.last_hidden_state))
    return embeds / torch.norm(embeds[:, 0:1], dim=-1, keepdim=True)


def vision_embeddings(feature_extractor, image_encoder, images) -> torch.Tensor:
    """[N, 257, D] VD-normalised CLIP-Vision embeddings of uint8 images ([H,W,3] or [N,H,W,3])."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    pixels = feature_extractor(images=list(images), return_tensors="pt").pixel_values
    return vision_embeddings_from_pixels(image_encoder, pixels)


def grey_pixels(feature_extractor, image_encoder, level: float = 0.5) -> torch.Tensor:
    """[1, 3, S, S] CLIP input of a uniform grey image at `level` in [0, 1] (0.5 = mid-grey).

    Built directly from the processor's mean / std rather than by passing a float image through
    the processor: transformers 5 rescales float images by 1/255 again, which turns the VD
    pipeline's "grey" unconditional image (`np.zeros(...) + 0.5`) nearly black.
    """
    size = int(image_encoder.config.image_size)
    mean = torch.tensor(feature_extractor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(feature_extractor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((torch.full((1, 3, size, size), float(level)) - mean) / std)


def unconditional_embeddings(components) -> tuple[torch.Tensor, torch.Tensor]:
    """(vision [257, D], text [77, D]): CLIP-Vision of mid-grey and CLIP-Text of "" (Brain-Diffuser)."""
    vision = vision_embeddings_from_pixels(
        components.image_encoder, grey_pixels(components.image_feature_extractor, components.image_encoder))
    text = text_embeddings(components.tokenizer, components.text_encoder, [""])
    return vision[0], text[0]
