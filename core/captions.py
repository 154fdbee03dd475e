"""Captions of movie frames: the text targets of stage 2.

BLIP-2 writes one caption per frame (`paper`: Salesforce/blip2-opt-2.7b; `tiny`: a random tiny
BLIP-2 that writes gibberish, enough to exercise the pipeline). A captions file, JSON
`{"<frame index>": "text", ...}`, can be written by the user instead (e.g. human captions) and
doubles as the cache: `captions_for_frames` reuses every caption already in it and runs BLIP-2
only for the frames that are missing, saving as it goes.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .clip import as_rgb_list
from .config import ModelProfile
from .errors import UserError, read_json

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


def _add_image_token(model, processor) -> None:
    """Give a BLIP-2 saved before transformers 4.47 the `<image>` token transformers 5 needs.

    Older snapshots of Salesforce/blip2-opt-2.7b lack `image_token_index`; this adds the token,
    grows the embeddings by one row and sets the index, as the updated snapshot does.
    """
    from tokenizers import AddedToken

    tokenizer = processor.tokenizer
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(token_id + 1)
    model.config.image_token_index = token_id
    if getattr(processor, "num_query_tokens", None) is None:
        processor.num_query_tokens = model.config.num_query_tokens


class Captioner:
    """BLIP-2 captions for uint8 frames, greedy decoding (deterministic).

    `images_captioned` counts the frames this object has run through BLIP-2 (cache checks use it).
    """

    def __init__(self, profile: ModelProfile, device: str = "cpu", batch_size: int = 8, dtype=None):
        import torch
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        profile.require("blip2")
        path = profile.path("blip2")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.dtype = dtype or torch.float32
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        # `dtype` only when asked: older transformers call it torch_dtype.
        extra = {"dtype": dtype} if dtype is not None else {}
        self.model = Blip2ForConditionalGeneration.from_pretrained(path, local_files_only=True, **extra)
        if getattr(self.model.config, "image_token_index", None) is None:
            _add_image_token(self.model, self.processor)
        self.model.to(self.device).eval()
        self.images_captioned = 0

    def caption(self, images, max_new_tokens: int = 20, progress: bool | None = None) -> list[str]:
        """uint8 images [N,H,W] or [N,H,W,3] -> N captions (stripped strings)."""
        import torch
        from tqdm.auto import tqdm

        frames = as_rgb_list(images)
        starts = range(0, len(frames), self.batch_size)
        show = progress if progress is not None else len(frames) > 2 * self.batch_size
        texts: list[str] = []
        with torch.inference_mode():
            for start in tqdm(starts, desc="BLIP-2 captions", unit="batch", disable=not show):
                batch = frames[start:start + self.batch_size]
                pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
                ids = self.model.generate(pixel_values=pixels.to(self.device, self.dtype),
                                          max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1)
                # The returned ids start with the prompt (<image> x queries, BOS): all special tokens.
                texts += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
                self.images_captioned += len(batch)
        return texts


def load_captions(path) -> dict[int, str]:
    """Read a captions file `{"<frame index>": "text"}`; UserError if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"captions file not found: {path}")
    raw = read_json(path, "captions file")
    if not isinstance(raw, dict):
        raise UserError(f"captions file {path} must hold a JSON object {{frame index: text}}")
    captions = {}
    for key, text in raw.items():
        try:
            index = int(key)
        except ValueError:
            raise UserError(f"captions file {path}: key '{key}' is not a frame index") from None
        if not isinstance(text, str):
            raise UserError(f"captions file {path}: caption of frame {index} is not a string")
        captions[index] = text
    return captions


def save_captions(path, captions: dict[int, str]) -> Path:
    """Write captions as JSON sorted by frame index; atomic (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = {str(k): captions[k] for k in sorted(int(k) for k in captions)} if captions else {}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(ordered, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def captions_for_frames(frames, frame_ids, cache_path, captioner_factory: Callable[[], Captioner],
                        max_new_tokens: int = 20, chunk: int = 64) -> list[str]:
    """One caption per frame, from the captions file where it has one, else from BLIP-2.

    `frames` uint8 [F,H,W] (or [F,H,W,3]) aligned with `frame_ids` [F]. Captions already in
    `cache_path` (the user's or earlier runs') are reused; the captioner is built (by calling
    `captioner_factory`) only if some are missing, and the file is rewritten after every
    `chunk` new captions so an interrupted run keeps its work.
    """
    frames = np.asarray(frames)
    frame_ids = [int(i) for i in np.asarray(frame_ids).reshape(-1)]
    if len(frame_ids) != len(frames):
        raise UserError(f"{len(frames)} frames but {len(frame_ids)} frame ids")
    cache_path = Path(cache_path) if cache_path is not None else None
    cache = load_captions(cache_path) if cache_path is not None and cache_path.exists() else {}

    first_position: dict[int, int] = {}
    for position, frame_id in enumerate(frame_ids):
        if frame_id not in cache:
            first_position.setdefault(frame_id, position)
    missing = sorted(first_position)
    if missing:
        log.info("captioning %d of %d frames (%d cached)", len(missing), len(set(frame_ids)),
                 len(set(frame_ids)) - len(missing))
        from tqdm.auto import tqdm

        captioner = captioner_factory()
        with tqdm(total=len(missing), desc="captions", unit="frame", disable=len(missing) <= chunk) as bar:
            for start in range(0, len(missing), chunk):
                ids = missing[start:start + chunk]
                texts = captioner.caption(frames[[first_position[i] for i in ids]],
                                          max_new_tokens=max_new_tokens, progress=False)
                cache.update(zip(ids, texts))
                if cache_path is not None:
                    save_captions(cache_path, cache)
                bar.update(len(ids))
    return [cache[i] for i in frame_ids]
