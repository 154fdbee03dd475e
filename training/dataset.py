"""From binned counts to a train/test dataset: named splits, repeat averaging, square frames.

Two splits, named in every report:

- `repeats`: held-out repeats of the same frames (new trials of seen images);
- `segments`: held-out contiguous movie segments (new images), with a `gap` of frames on both sides
  of each segment removed from training, so that neighbouring (nearly identical) frames and the
  slow temporal response cannot leak test information into training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spikevaediff.core.errors import UserError

SPLITS = ("repeats", "segments")


@dataclass
class Split:
    """Boolean masks over presentations, plus what produced them."""

    name: str
    train: np.ndarray
    test: np.ndarray
    params: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "n_train": int(self.train.sum()), "n_test": int(self.test.sum()),
                **self.params}


def split_repeats(repeats: np.ndarray, valid: np.ndarray, n_test_repeats: int = 2,
                  seed: int = 0) -> Split:
    """Hold out whole repeats (chosen at random with `seed`); train on the rest."""
    unique = np.unique(repeats[valid])
    if len(unique) < 2:
        raise UserError(f"the 'repeats' split needs at least 2 repeats, the session has {len(unique)}")
    n_test = min(max(1, n_test_repeats), len(unique) - 1)
    test_repeats = np.sort(np.random.default_rng(seed).choice(unique, size=n_test, replace=False))
    test = valid & np.isin(repeats, test_repeats)
    train = valid & ~np.isin(repeats, test_repeats)
    return Split("repeats", train, test, {"test_repeats": test_repeats.tolist()})


def segment_test_frames(n_frames: int, test_fraction: float, n_segments: int, seed: int) -> np.ndarray:
    """Frame ids of `n_segments` contiguous, non-adjacent segments covering ~test_fraction of the movie."""
    seg_len = max(1, int(round(n_frames * test_fraction / n_segments)))
    # Cut the movie into n_segments equal slots and place one segment at a random offset in each,
    # so segments are spread over the movie and never touch.
    slot = n_frames // n_segments
    if seg_len >= slot:
        raise UserError(f"test fraction {test_fraction} with {n_segments} segments does not fit {n_frames} frames")
    rng = np.random.default_rng(seed)
    starts = [i * slot + rng.integers(0, slot - seg_len + 1) for i in range(n_segments)]
    return np.concatenate([np.arange(s, s + seg_len) for s in starts])


def split_segments(frames: np.ndarray, valid: np.ndarray, n_frames: int, test_fraction: float = 0.2,
                   n_segments: int = 4, gap: int = 30, seed: int = 0) -> Split:
    """Hold out contiguous movie segments (every repeat of them); drop `gap` frames around each."""
    test_frames = segment_test_frames(n_frames, test_fraction, n_segments, seed)
    distance = np.full(n_frames, np.iinfo(np.int64).max)
    for f in test_frames:  # distance of every frame to the nearest test frame
        distance = np.minimum(distance, np.abs(np.arange(n_frames) - f))
    excluded = distance <= gap
    test = valid & np.isin(frames, test_frames)
    train = valid & ~excluded[frames]
    if not train.any():
        raise UserError("the 'segments' split left no training frames: lower --gap or the test fraction")
    return Split("segments", train, test, {
        "test_frames": [int(test_frames.min()), int(test_frames.max())], "n_test_frames": len(test_frames),
        "n_segments": n_segments, "gap": gap, "test_fraction": test_fraction})


def make_split(name: str, frames: np.ndarray, repeats: np.ndarray, valid: np.ndarray, n_frames: int,
               seed: int = 0, **params) -> Split:
    """Build a split by name ('repeats' or 'segments')."""
    if name == "repeats":
        return split_repeats(repeats, valid, seed=seed, **params)
    if name == "segments":
        return split_segments(frames, valid, n_frames, seed=seed, **params)
    raise UserError(f"unknown split '{name}' (choose from {', '.join(SPLITS)})")


def average_by_frame(counts: np.ndarray, frames: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean counts per frame over the presentations in `mask`. Returns (frame ids, counts [F', U])."""
    ids, inverse = np.unique(frames[mask], return_inverse=True)
    sums = np.zeros((len(ids), counts.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, counts[mask])
    n = np.bincount(inverse, minlength=len(ids))[:, None]
    return ids, (sums / n).astype(np.float32)


def square_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop movie frames [F,H,W] to a square and resize to size x size (uint8).

    The Allen movies are 1:2 landscape; the models take square images, so the decoded target is the
    centre square of each frame (documented in docs/EVALUATION.md).
    """
    import torch
    import torch.nn.functional as F

    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise UserError(f"movie frames must be [frames, height, width], got shape {frames.shape}")
    h, w = frames.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = torch.from_numpy(np.ascontiguousarray(frames[:, top:top + side, left:left + side])).float()
    out = F.interpolate(crop[:, None], size=(size, size), mode="bicubic", align_corners=False,
                        antialias=side > size)
    return out[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
