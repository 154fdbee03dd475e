"""Load a saved diffusers-format Versatile Diffusion folder into the parts the refiner needs.

The published weights (`shi-labs/versatile-diffusion`) and our tiny folder share one layout:
`model_index.json` plus one subfolder per component (image_unet, text_unet, vae, scheduler,
tokenizer, text_encoder, image_encoder, image_feature_extractor). Each component is loaded with
its own class, which sidesteps breakage 2 (`from_pretrained` of the pipeline cannot resolve
`UNetFlatConditionModel`), and the image UNet is given dual attention straight away.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, read_json

log = logging.getLogger(__name__)

COMPONENTS = ("image_unet", "text_unet", "vae", "scheduler", "tokenizer", "text_encoder",
              "image_encoder", "image_feature_extractor")


@dataclass
class VDComponents:
    """The parts of Versatile Diffusion the dual-guided refiner uses.

    `image_unet` already has dual attention (the text UNet's transformers moved inside it);
    the rest of the text UNet is not kept. `scheduler_config` is the folder's noise schedule,
    from which the refiner builds DDIM / DPM-Solver++ / UniPC.
    """

    image_unet: Any
    vae: Any
    scheduler_config: dict
    tokenizer: Any
    text_encoder: Any
    image_encoder: Any
    image_feature_extractor: Any
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        """Width of the CLIP embeddings the UNet cross-attends to (64 tiny, 768 paper)."""
        return int(self.image_unet.config.cross_attention_dim)

    def to(self, device=None, dtype=None) -> "VDComponents":
        """Move every model to `device` (and floating weights to `dtype`); returns self."""
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if moves:
            for model in (self.image_unet, self.vae, self.text_encoder, self.image_encoder):
                model.to(**moves)
        return self


@contextlib.contextmanager
def quiet_hf_logging():
    """Silence transformers / diffusers chatter (unused-key tables, `accelerate` hints) while loading."""
    import diffusers
    import transformers

    libraries = (transformers.logging, diffusers.logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, before):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def check_folder(path: Path | str) -> Path:
    """Fail with one line if `path` is not a diffusers-format Versatile Diffusion folder."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path} is not a Versatile Diffusion folder (no model_index.json)")
    declared = read_json(index, "Versatile Diffusion index")
    needed = [c for c in COMPONENTS if c != "text_unet"]
    missing = [c for c in needed if c not in declared or not (path / c).is_dir()]
    if missing:
        raise UserError(f"{path} lacks Versatile Diffusion component(s): {', '.join(missing)}")
    return path


def load_versatile_diffusion(path: Path | str, device: str = "cpu", dtype=None) -> VDComponents:
    """Load a Versatile Diffusion folder (tiny or published) for dual-guided refinement.

    `dtype` is a torch dtype for the models (float32 when None). Raises UserError when the
    folder is missing or incomplete.
    """
    from .vd_compat import ensure_compat_dual_transformers, to_dual_attention

    path = check_folder(path)
    parts = _load_parts(path, dtype)
    image_unet, text_unet = parts.pop("image_unet"), parts.pop("text_unet")
    if getattr(image_unet.config, "dual_cross_attention", False):
        ensure_compat_dual_transformers(image_unet)  # saved already converted
    else:
        if text_unet is None:
            raise UserError(f"{path} has no text_unet: the text half of the dual attention is missing")
        to_dual_attention(image_unet, text_unet)
    del text_unet  # its transformers now live in image_unet; the rest is unused here
    scheduler = parts.pop("scheduler")
    components = VDComponents(image_unet=image_unet, scheduler_config=dict(scheduler.config),
                              source=str(path), **parts)
    return components.to(device=device)


def _load_parts(path: Path, dtype=None) -> dict:
    """Every component of the folder, each with its own class (text_unet None when absent)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    from .clip import load_image_processor
    from .vd_compat import load_text_unet

    folder = str(path)
    common = dict(local_files_only=True, dtype=dtype or torch.float32)
    log.info("loading Versatile Diffusion from %s", path)
    with quiet_hf_logging():
        return dict(
            image_unet=UNet2DConditionModel.from_pretrained(folder, subfolder="image_unet", **common).eval(),
            text_unet=load_text_unet(path, **common).eval() if (path / "text_unet").is_dir() else None,
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **common).eval(),
            # the folder's noise schedule; the refiner builds its own solver on it
            scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder", **common).eval(),
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(
                folder, subfolder="image_encoder", **common).eval(),
            image_feature_extractor=load_image_processor(path / "image_feature_extractor"),
        )


def load_dual_guided_pipeline(path: Path | str, dtype=None):
    """diffusers' own `VersatileDiffusionDualGuidedPipeline` for a saved folder (the reference).

    `VersatileDiffusionDualGuidedPipeline.from_pretrained` fails on the text UNet's class even
    when the text UNet is passed in (breakage 2), so the pipeline is assembled from components
    loaded one by one. Its constructor converts the image UNet with plain dual transformers,
    which are then upgraded (breakage 1).
    """
    from diffusers import VersatileDiffusionDualGuidedPipeline

    from .vd_compat import ensure_compat_dual_transformers

    path = check_folder(path)
    with quiet_hf_logging():
        pipe = VersatileDiffusionDualGuidedPipeline(**_load_parts(path, dtype))
    ensure_compat_dual_transformers(pipe.image_unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe
