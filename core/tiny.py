"""Tiny random-weight CLIP and BLIP-2, built offline as ordinary Hugging Face folders.

The `tiny` profile runs every code path of the `paper` profile on a laptop CPU: same
architectures and loaders (`from_pretrained(dir, local_files_only=True)`), small widths,
random weights. The folders are deterministic: the same seed writes the same bytes.

- `write_tiny_clip`: a `CLIPModel` (text + vision towers with projections) whose embeddings
  have the paper's token counts (257 image tokens = 1 + 16x16 patches of a 32-pixel image,
  77 text positions) and width `EMBED_DIM["tiny"]`, plus `CLIPTokenizer` and
  `CLIPImageProcessor` files. `CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection`
  load from the same folder (that is how the tiny Versatile Diffusion folder is built).
- `write_tiny_blip2`: a `Blip2ForConditionalGeneration` over a tiny OPT, with an OPT-layout
  tokenizer that has the `<image>` token and `image_token_index` set (transformers 5), and a
  `Blip2Processor`. It captions in gibberish, which is all the pipeline needs.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from .config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS, EMBED_DIM, ModelProfile
from .errors import UserError

log = logging.getLogger(__name__)

TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 2  # (32 / 2)^2 + 1 class token = 257 tokens, as ViT-L/14 at 224
assert (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2 + 1 == CLIP_IMAGE_TOKENS

# CLIP's published image normalisation (the tiny processor uses it too).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

BLIP2_QUERY_TOKENS = 4  # the paper model uses 32


def image_processor_class(name: str):
    """transformers' image processor `name`, or its PIL twin when torchvision is absent.

    Both save the same `preprocessor_config.json` (type `name`); this only avoids a warning.
    """
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, name + "Pil"):
        return getattr(transformers, name + "Pil")
    return getattr(transformers, name)


def write_atomically(out_dir: Path, build) -> Path:
    """Build into a sibling temporary folder, then move it into place (no half-written folders)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_clip_config(vocab_size: int, bos_id: int, eos_id: int):
    """The tiny `CLIPConfig`: 2-layer, 32-wide towers projecting to `EMBED_DIM['tiny']`."""
    from transformers import CLIPConfig

    dim = EMBED_DIM["tiny"]
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=CLIP_TEXT_TOKENS, projection_dim=dim,
                bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE, projection_dim=dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim)


def write_tiny_clip(out_dir, seed: int = 0) -> Path:
    """Write a tiny random `CLIPModel` + `CLIPTokenizer` + `CLIPImageProcessor` folder.

    Loads with `CLIPModel` / `CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection`
    `.from_pretrained(out_dir, local_files_only=True)`. Returns the folder.
    """
    import torch
    from transformers import CLIPModel

    from .tiny_tokenizers import clip_bpe, clip_tokenizer, write_bpe_files

    def build(folder: Path):
        tokenizer = clip_tokenizer()
        config = tiny_clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config).eval()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_bpe_files(folder, *clip_bpe())  # the classic files too, for older loaders
        processor = image_processor_class("CLIPImageProcessor")(
            do_resize=True, size={"shortest_edge": TINY_IMAGE_SIZE}, resample=3,  # bicubic, as CLIP
            do_center_crop=True, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
        processor.save_pretrained(folder)

    log.info("writing tiny CLIP to %s", out_dir)
    return write_atomically(Path(out_dir), build)


def tiny_blip2_config(vocab_size: int, image_token_id: int, bos_id: int, eos_id: int, pad_id: int):
    """The tiny `Blip2Config`: 1-layer ViT and Q-Former, 2-layer OPT, all 32 wide.

    Weights are drawn 5x wider than the default (std 0.1) so that random captions vary with
    the image instead of repeating one token for every frame.
    """
    from transformers import Blip2Config

    init = 0.1
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=TINY_IMAGE_SIZE, patch_size=4, initializer_range=init)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   encoder_hidden_size=32, vocab_size=vocab_size, max_position_embeddings=64,
                   initializer_range=init)
    text = dict(model_type="opt", vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
                bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, init_std=init)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=BLIP2_QUERY_TOKENS, image_token_index=image_token_id,
                       initializer_range=init)


def write_tiny_blip2(out_dir, seed: int = 0) -> Path:
    """Write a tiny random `Blip2ForConditionalGeneration` + `Blip2Processor` folder.

    The tokenizer is OPT-shaped (`</s>` BOS/EOS, `<pad>`) with the `<image>` token; the config
    sets `image_token_index` and the processor `num_query_tokens`, as transformers 5 requires.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from .tiny_tokenizers import IMAGE_TOKEN, opt_tokenizer

    def build(folder: Path):
        tokenizer = opt_tokenizer()
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        config = tiny_blip2_config(len(tokenizer), image_token_id, tokenizer.bos_token_id,
                                   tokenizer.eos_token_id, tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Blip2ForConditionalGeneration(config).eval()
        model.save_pretrained(folder)
        image_processor = image_processor_class("BlipImageProcessor")(
            do_resize=True, size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, resample=3,
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   num_query_tokens=BLIP2_QUERY_TOKENS)
        processor.save_pretrained(folder)

    log.info("writing tiny BLIP-2 to %s", out_dir)
    return write_atomically(Path(out_dir), build)


TINY_BUILT_KEYS = ("clip", "blip2", "versatile_diffusion")


def ensure_tiny_weights(profile: ModelProfile, keys=TINY_BUILT_KEYS, seed: int = 0,
                        force: bool = False) -> list[str]:
    """Write whichever of the tiny folders `keys` (clip, blip2, versatile_diffusion) are missing.

    The VDVAE is not written here: the project trains it (`spikevaediff train-vdvae`).
    Versatile Diffusion is built from the CLIP folder, so asking for it writes CLIP too if needed.
    Returns the keys written. `force` rewrites the requested ones.
    """
    if profile.name != "tiny":
        raise UserError(f"only the 'tiny' profile can be built offline (got '{profile.name}'); "
                        "the paper weights must be placed in the weights folder")
    unknown = set(keys) - set(TINY_BUILT_KEYS)
    if unknown:
        raise UserError(f"cannot build tiny {', '.join(sorted(unknown))} offline "
                        f"(buildable: {', '.join(TINY_BUILT_KEYS)}; the VDVAE is trained by train-vdvae)")
    present = {spec.key: ok for spec, _path, ok in profile.status()}
    wanted = [k for k in TINY_BUILT_KEYS if k in keys and (force or not present[k])]
    if "versatile_diffusion" in wanted and not present["clip"] and "clip" not in wanted:
        wanted.insert(0, "clip")
    for key in wanted:
        if key == "clip":
            write_tiny_clip(profile.path("clip"), seed=seed)
        elif key == "blip2":
            write_tiny_blip2(profile.path("blip2"), seed=seed)
        else:
            # Lazy: the refiner's module builds the tiny Versatile Diffusion from the CLIP folder.
            from .tiny_vd import write_tiny_versatile_diffusion

            write_tiny_versatile_diffusion(profile.path("versatile_diffusion"), profile.path("clip"), seed=seed)
    return wanted
