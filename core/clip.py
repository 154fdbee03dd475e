"""CLIP features exactly as Versatile Diffusion conditions on them.

- image -> [N, 257, D]: visual_projection(post_layernorm(last_hidden_state)) for every token,
  all divided by the L2 norm of token 0 (the class token);
- text  -> [N, 77, D]:  text_projection(last_hidden_state) for every position, all divided by
  the norm of the projected pooled (end-of-text) token.

These are the regression targets of stage 2 and the conditioning of the refiner, so they must
match diffusers' `VersatileDiffusionDualGuidedPipeline._encode_{image,text}_prompt` bit for bit:
the same processor, the same tokenizer padding (max length 77, no attention mask) and the same
normalisation. `paper` is openai/clip-vit-large-patch14 (D = 768); `tiny` the offline tiny CLIP.
"""
from __future__ import annotations

import numpy as np

from .config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS, ModelProfile
from .errors import UserError


def load_image_processor(path, **kwargs):
    """CLIP's image processor saved in `path`. Some transformers 5 releases make AutoImageProcessor
    demand torchvision; the PIL implementation (same config, same pixels) serves there."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(str(path), local_files_only=True, **kwargs)
    except ImportError:
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        return cls.from_pretrained(str(path), local_files_only=True, **kwargs)


def as_rgb_list(images) -> list[np.ndarray]:
    """uint8 [N,H,W] (grey) or [N,H,W,3] -> list of HxWx3 uint8 arrays; UserError otherwise."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise UserError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"images must have shape [N,H,W] or [N,H,W,3], got {list(images.shape)}")
    return list(images)


class ClipEncoder:
    """CLIP image and text embeddings in Versatile Diffusion's normalisation.

    Parameters: `profile` (which CLIP: `profile.path("clip")`), `device`, `batch_size` (images
    or texts per forward pass), `dtype` of the model (float16 on a GPU is fine; outputs are float32).
    Outputs are float32 CPU tensors.
    """

    def __init__(self, profile: ModelProfile, device: str = "cpu", batch_size: int = 64, dtype=None):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        profile.require("clip")
        path = profile.path("clip")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.dtype = dtype or torch.float32
        # `dtype` only when asked: older transformers call it torch_dtype.
        extra = {"dtype": dtype} if dtype is not None else {}
        self.model = CLIPModel.from_pretrained(path, local_files_only=True, **extra)
        self.model.to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.processor = load_image_processor(path)
        if self.embed_dim != profile.embed_dim:
            raise UserError(f"CLIP at {path} projects to {self.embed_dim} dimensions but profile "
                            f"'{profile.name}' expects {profile.embed_dim}")

    @property
    def embed_dim(self) -> int:
        """Width D of every embedding token (768 for ViT-L/14, 64 for tiny)."""
        return int(self.model.config.projection_dim)

    def _batches(self, n: int, what: str, progress: bool | None):
        from tqdm.auto import tqdm

        starts = range(0, n, self.batch_size)
        show = progress if progress is not None else n > 4 * self.batch_size
        return tqdm(starts, desc=f"CLIP {what}", unit="batch", disable=not show)

    def image_embeds(self, images, progress: bool | None = None):
        """uint8 images [N,H,W] or [N,H,W,3] -> float32 [N, 257, D], token 0 of unit norm."""
        import torch

        frames = as_rgb_list(images)
        out = []
        with torch.inference_mode():
            for start in self._batches(len(frames), "images", progress):
                pixels = self.processor(images=frames[start:start + self.batch_size], return_tensors="pt")
                pixels = pixels["pixel_values"].to(self.device, self.dtype)
                vision = self.model.vision_model(pixel_values=pixels)
                embeds = self.model.visual_projection(self.model.vision_model.post_layernorm(
                    vision.last_hidden_state))
                embeds = embeds / torch.norm(embeds[:, 0:1], dim=-1, keepdim=True)
                out.append(embeds.float().cpu())
        result = torch.cat(out) if out else torch.zeros(0, CLIP_IMAGE_TOKENS, self.embed_dim)
        if result.shape[1] != CLIP_IMAGE_TOKENS:
            raise UserError(f"CLIP vision gives {result.shape[1]} tokens, Versatile Diffusion needs "
                            f"{CLIP_IMAGE_TOKENS} (check the CLIP image size / patch size)")
        return result

    def text_embeds(self, texts: list[str], progress: bool | None = None):
        """Texts -> float32 [N, 77, D], divided by the norm of the projected pooled token."""
        import torch

        if isinstance(texts, str):
            raise UserError("text_embeds takes a list of strings, not one string")
        texts = [str(t) for t in texts]
        out = []
        with torch.inference_mode():
            for start in self._batches(len(texts), "texts", progress):
                tokens = self.tokenizer(texts[start:start + self.batch_size], padding="max_length",
                                        max_length=CLIP_TEXT_TOKENS, truncation=True, return_tensors="pt")
                # No attention mask, as Versatile Diffusion (CLIP's mask is causal anyway).
                text = self.model.text_model(input_ids=tokens["input_ids"].to(self.device))
                embeds = self.model.text_projection(text.last_hidden_state)
                pooled = self.model.text_projection(text.pooler_output)
                embeds = embeds / torch.norm(pooled.unsqueeze(1), dim=-1, keepdim=True)
                out.append(embeds.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, CLIP_TEXT_TOKENS, self.embed_dim)

    def grey_image_embeds(self, size: int = 224):
        """CLIP-vision embedding of a mid-grey image: the refiner's unconditional image input."""
        return self.image_embeds(np.full((1, size, size, 3), 128, np.uint8), progress=False)
