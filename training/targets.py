"""Regression targets per movie frame, extracted once and cached on disk.

Targets (what the ridges learn to predict from spikes):
- `vdvae`: the stage-1 model's latents of the first K decoder blocks, one flat vector per frame;
- `clip_vision`: CLIP-Vision embeddings (257 tokens x D) of the frame, flattened;
- `clip_text`: CLIP-Text embeddings (77 tokens x D) of the frame's caption, flattened.

The cache key hashes the frames and the model that produced the target, so a second training on
the same frames with the same models skips extraction.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TARGET_NAMES = ("vdvae", "clip_vision", "clip_text")


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str((part.dtype, part.shape)).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:24]


def file_fingerprint(path: Path) -> str:
    """Identity of a weight file or folder: path, size and modification time of its files."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return _digest(*[(str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


class TargetCache:
    """Arrays in `cache_dir/<name>-<key>.npy`, written atomically."""

    def __init__(self, cache_dir: Path | None):
        self.dir = Path(cache_dir) if cache_dir else None

    def _path(self, name: str, key: str) -> Path | None:
        return self.dir / f"{name}-{key}.npy" if self.dir else None

    def get(self, name: str, key: str) -> np.ndarray | None:
        path = self._path(name, key)
        if path is not None and path.is_file():
            log.info("targets %s: from cache %s", name, path)
            return np.load(path)
        return None

    def put(self, name: str, key: str, array: np.ndarray) -> None:
        path = self._path(name, key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, array)
        tmp.replace(path)


def cached_extraction(cache: TargetCache, name: str, key: str, items, batch_size: int, embed,
                      desc: str) -> np.ndarray:
    """`embed(batch, start)` over `items` in batches, flattened per item, float32; read from and
    written to the cache under (name, key)."""
    import torch
    from tqdm import tqdm

    cached = cache.get(name, key)
    if cached is not None:
        return cached
    chunks = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        batch = items[start:start + batch_size]
        with torch.inference_mode():
            chunks.append(np.asarray(embed(batch, start)).reshape(len(batch), -1))
    out = np.concatenate(chunks).astype(np.float32)
    cache.put(name, key, out)
    return out


def vdvae_targets(model, frames64: np.ndarray, model_id: str, cache: TargetCache, mode: str = "mean",
                  batch_size: int = 64) -> np.ndarray:
    """Stage-1 latents [F, D] of square 64x64 frames (posterior samples seeded by position)."""
    key = _digest(frames64, model_id, mode, model.latent_dim())
    return cached_extraction(cache, "vdvae", key, frames64, batch_size,
                             lambda batch, start: model.encode_latents(batch, mode=mode, seed=start).cpu().numpy(),
                             "stage-1 latents")


def clip_vision_targets(encoder, frames: np.ndarray, model_id: str, cache: TargetCache,
                        batch_size: int = 32) -> np.ndarray:
    """CLIP-Vision embeddings [F, 257*D] of square frames."""
    return cached_extraction(cache, "clip_vision", _digest(frames, model_id), frames, batch_size,
                             lambda batch, _: encoder.image_embeds(batch).numpy(), "CLIP-Vision")


def clip_text_targets(encoder, captions: list[str], model_id: str, cache: TargetCache,
                      batch_size: int = 64) -> np.ndarray:
    """CLIP-Text embeddings [F, 77*D] of the frames' captions."""
    return cached_extraction(cache, "clip_text", _digest(tuple(captions), model_id), captions, batch_size,
                             lambda batch, _: encoder.text_embeds(batch).numpy(), "CLIP-Text")
