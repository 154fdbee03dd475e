"""Reconstruction metrics (the evaluation protocol in docs/EVALUATION.md).

Every metric returns a mean over test items and comes with its chance level, so reports can put
the two side by side. Images are compared in greyscale (the Allen movies are greyscale).
"""
from __future__ import annotations

import numpy as np


def to_grey(images: np.ndarray) -> np.ndarray:
    """[N,H,W] or [N,H,W,3] uint8/float -> float64 [N,H,W] in 0..255."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 4:
        images = images @ np.array([0.299, 0.587, 0.114])
    if images.ndim != 3:
        raise ValueError(f"expected images [N,H,W] or [N,H,W,3], got shape {images.shape}")
    return images


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Bicubic-ish (order 3) resize of a greyscale batch to size x size, keeping 0..255."""
    from skimage.transform import resize

    if images.shape[1:] == (size, size):
        return images
    return np.stack([resize(im, (size, size), order=3, preserve_range=True, anti_aliasing=True)
                     for im in images])


def pixcorr(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image Pearson correlation of pixel values (Brain-Diffuser's PixCorr). Returns [N]."""
    p = to_grey(pred).reshape(len(pred), -1)
    t = to_grey(true).reshape(len(true), -1)
    p = p - p.mean(1, keepdims=True)
    t = t - t.mean(1, keepdims=True)
    denom = np.sqrt((p * p).sum(1) * (t * t).sum(1))
    return np.where(denom > 0, (p * t).sum(1) / np.maximum(denom, 1e-12), 0.0)


def ssim(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image SSIM, greyscale, gaussian weights with sigma 1.5 (as Brain-Diffuser). Returns [N]."""
    from skimage.metrics import structural_similarity

    p, t = to_grey(pred), to_grey(true)
    return np.array([
        structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                              data_range=255.0)
        for a, b in zip(p, t)
    ])


def _row_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation between every row of a [N,D] and every row of b [M,D] -> [N,M]."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def two_way_identification(pred_feats: np.ndarray, true_feats: np.ndarray,
                           groups: np.ndarray | None = None) -> float:
    """Fraction of (i, j) pairs where prediction i correlates better with truth i than with truth j.

    The 2-way identification of Brain-Diffuser / MindEye, in any feature space. Chance is 0.5.
    Pairs whose items share a group (e.g. two test repeats of the same movie frame, whose truths are
    identical) are not compared.
    """
    n = len(pred_feats)
    if n < 2:
        raise ValueError("two-way identification needs at least two test items")
    corr = _row_correlations(pred_feats, true_feats)
    own = np.diag(corr)[:, None]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    comparable = groups[:, None] != groups[None, :]
    if not comparable.any():
        raise ValueError("two-way identification needs items from at least two groups")
    wins = ((corr < own) & comparable).sum()
    return float(wins / comparable.sum())


def frame_identification(pred_feats: np.ndarray, true_frames: np.ndarray,
                         candidate_feats: np.ndarray, candidate_frames: np.ndarray,
                         tolerance: int = 30) -> tuple[float, float, np.ndarray]:
    """For each prediction, the candidate frame whose true features correlate best with it.

    Returns (fraction within `tolerance` frames of the true frame, chance level, chosen frames).
    Chance: the mean fraction of candidates that lie within the tolerance of each true frame.
    """
    corr = _row_correlations(pred_feats, candidate_feats)
    candidate_frames = np.asarray(candidate_frames)
    chosen = candidate_frames[np.argmax(corr, axis=1)]
    true_frames = np.asarray(true_frames)
    hits = np.abs(chosen - true_frames) <= tolerance
    near = np.abs(candidate_frames[None, :] - true_frames[:, None]) <= tolerance
    chance = float(near.mean(1).mean())
    return float(hits.mean()), chance, chosen


def summarize(values: np.ndarray) -> dict:
    """Mean, median and standard error of per-item values."""
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "sem": float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0,
    }
