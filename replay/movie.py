"""A grayscale natural-image movie built from photographs shipped inside installed packages.

The Allen movies (clips of "Touch of Evil") cannot be shipped, so the synthetic sessions show a
movie made of the sample photographs that scikit-image and scikit-learn install with themselves:
a sequence of *shots*, each a slow pan and zoom across one photograph, separated by scene cuts.
Everything is deterministic for a seed, for any frame count and frame size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# Photographs of natural scenes and objects (no text pages, no synthetic patterns), all offline.
SKIMAGE_PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "grass", "gravel",
    "brick", "clock", "hubble_deep_field",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")

MIN_SHOT_FRAMES = 45   # 1.5 s at 30 Hz
MAX_SHOT_FRAMES = 150  # 5 s
PYRAMID_LEVELS = 5


def _to_gray(image: np.ndarray) -> np.ndarray:
    """uint8/bool RGB or gray -> float32 gray in [0, 1], contrast-stretched to the 1-99 percentiles."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lo, hi = np.percentile(image, [1, 99])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


@lru_cache(maxsize=1)
def load_photographs() -> tuple[np.ndarray, ...]:
    """The package-shipped photographs as float32 grayscale images in [0, 1] (cached)."""
    import importlib.util

    import skimage.data
    import skimage.io

    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            photos.append(_to_gray(getattr(skimage.data, name)()))
        except Exception:  # an image that needs a download in this scikit-image version
            continue
    # scikit-learn's two sample photographs, read from its package folder (importing
    # sklearn.datasets would cost seconds).
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
        for name in SKLEARN_PHOTOS:
            if (folder / name).is_file():
                photos.append(_to_gray(skimage.io.imread(folder / name)))
    if len(photos) < 4:
        raise RuntimeError("too few sample photographs found in scikit-image / scikit-learn")
    return tuple(photos)


def _pyramid(photo: np.ndarray) -> list[np.ndarray]:
    """Gaussian pyramid (level k is downscaled 2**k) so that zoomed-out shots do not alias."""
    from scipy.ndimage import gaussian_filter

    levels = [photo]
    for _ in range(PYRAMID_LEVELS - 1):
        blurred = gaussian_filter(levels[-1], sigma=1.0, mode="reflect")
        levels.append(np.ascontiguousarray(blurred[::2, ::2]))
    return levels


@dataclass(frozen=True)
class Shot:
    """One shot: a pan and zoom over one photograph between two crop windows (photo pixels)."""

    photo: int
    n_frames: int
    start: tuple[float, float, float]  # (centre_y, centre_x, crop_height) at the first frame
    stop: tuple[float, float, float]   # ... at the last frame


def plan_shots(n_frames: int, aspect: float, seed: int, n_photos: int,
               photo_shapes: list[tuple[int, int]]) -> list[Shot]:
    """Draw shot lengths, photographs and camera paths until `n_frames` are covered."""
    rng = np.random.default_rng(seed)
    shots, covered, last_photo = [], 0, -1
    while covered < n_frames:
        length = int(rng.integers(MIN_SHOT_FRAMES, MAX_SHOT_FRAMES + 1))
        length = min(length, n_frames - covered)
        photo = int(rng.integers(n_photos))
        if photo == last_photo:  # a cut must change the scene
            photo = (photo + 1) % n_photos
        ph, pw = photo_shapes[photo]
        # The largest crop of the movie's aspect that fits in the photograph.
        full_h = min(ph, pw / aspect)
        ends = []
        for _ in range(2):
            crop_h = full_h * rng.uniform(0.35, 1.0)
            crop_w = crop_h * aspect
            cy = rng.uniform(crop_h / 2, ph - crop_h / 2)
            cx = rng.uniform(crop_w / 2, pw - crop_w / 2)
            ends.append((cy, cx, crop_h))
        # Slow camera: limit how far a shot travels (a fraction of the crop per second).
        start, stop = np.array(ends[0]), np.array(ends[1])
        max_travel = 0.15 * min(start[2], stop[2]) * length / 30.0
        travel = np.hypot(*(stop[:2] - start[:2]))
        if travel > max_travel:
            stop[:2] = start[:2] + (stop[:2] - start[:2]) * max_travel / travel
        shots.append(Shot(photo, length, tuple(start), tuple(stop)))
        covered += length
        last_photo = photo
    return shots


def _render_shot(levels: list[np.ndarray], shot: Shot, height: int, width: int) -> np.ndarray:
    """Render one shot's frames [n, H, W] float32 by bilinear sampling of the right pyramid level."""
    out = np.empty((shot.n_frames, height, width), dtype=np.float32)
    t = np.linspace(0.0, 1.0, shot.n_frames) if shot.n_frames > 1 else np.zeros(1)
    ease = 0.5 - 0.5 * np.cos(np.pi * t)  # smooth start and stop of the camera move
    start, stop = np.array(shot.start), np.array(shot.stop)
    rows = (np.arange(height) + 0.5) / height - 0.5
    cols = ((np.arange(width) + 0.5) / width - 0.5) * (width / height)
    for i, e in enumerate(ease):
        cy, cx, crop_h = start + (stop - start) * e
        level = int(np.clip(np.floor(np.log2(max(crop_h / height, 1.0))), 0, len(levels) - 1))
        img = levels[level]
        scale = 2.0 ** level
        y = (cy + rows * crop_h) / scale - 0.5
        x = (cx + cols * crop_h) / scale - 0.5
        y = np.clip(y, 0, img.shape[0] - 1.001)
        x = np.clip(x, 0, img.shape[1] - 1.001)
        y0, x0 = y.astype(np.int64), x.astype(np.int64)
        fy, fx = (y - y0)[:, None], (x - x0)[None, :]
        a = img[np.ix_(y0, x0)]
        b = img[np.ix_(y0, x0 + 1)]
        c = img[np.ix_(y0 + 1, x0)]
        d = img[np.ix_(y0 + 1, x0 + 1)]
        out[i] = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy
    return out


def make_movie(n_frames: int = 900, height: int = 64, width: int = 128, seed: int = 0) -> np.ndarray:
    """A grayscale movie, uint8 [n_frames, height, width]: shots of slow pans and zooms over the
    package-shipped photographs, joined by scene cuts. Same seed, same movie."""
    if n_frames < 1 or height < 8 or width < 8:
        raise ValueError("a movie needs at least 1 frame of at least 8x8 pixels")
    photos = load_photographs()
    shots = plan_shots(n_frames, width / height, seed, len(photos), [p.shape for p in photos])
    pyramids: dict[int, list[np.ndarray]] = {}
    movie = np.empty((n_frames, height, width), dtype=np.uint8)
    pos = 0
    for shot in shots:
        if shot.photo not in pyramids:
            pyramids[shot.photo] = _pyramid(photos[shot.photo])
        frames = _render_shot(pyramids[shot.photo], shot, height, width)
        movie[pos:pos + shot.n_frames] = np.round(frames * 255.0).astype(np.uint8)
        pos += shot.n_frames
    return movie


def shot_boundaries(n_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Frame indices where a new shot (scene cut) starts in `make_movie(n_frames, height, width, seed)`."""
    photos = load_photographs()
    shots = plan_shots(n_frames, width / height, seed, len(photos), [p.shape for p in photos])
    return np.cumsum([0] + [s.n_frames for s in shots[:-1]]).astype(np.int64)
