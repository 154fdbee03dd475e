"""The linear algebra behind `RidgeRegression`: one factorisation shared by every alpha.

With standardised inputs Xs [n, p] and centred targets Yc [n, q], the ridge solution

    W(alpha) = (Xs^T Xs + alpha I)^-1 Xs^T Yc

is written through the eigendecomposition of the smaller Gram matrix as

    W(alpha) = A0 diag(1 / (lam + alpha)) M^T Yc          A0 [p, r], M [n, r], r <= min(n, p)

- n >= p: Xs^T Xs = V diag(lam) V^T, A0 = V, M = Xs V;
- n <  p: Xs Xs^T = U diag(lam) U^T, A0 = Xs^T U, M = U (the dual / kernel form).

Directions with (numerically) zero eigenvalue carry no signal and are dropped, so r is the rank.
Once A0, M and lam are known, every alpha costs only a diagonal rescaling: cross-validation over
a grid and per-group alphas reuse the same factors. Targets are consumed in column chunks so a
float32 [3000, 197376] target matrix never needs a float64 copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Elements of one target chunk held on the compute device (float64: 128 MiB).
CHUNK_ELEMENTS = 1 << 24


@dataclass
class GramBasis:
    """Factors of one standardised design matrix: W(alpha) = A0 diag(1/(lam+alpha)) M^T Yc."""

    lam: torch.Tensor  # [r] eigenvalues of the Gram matrix, all > 0
    a0: torch.Tensor  # [p, r] input-side factor
    m: torch.Tensor  # [n, r] sample-side factor

    @property
    def rank(self) -> int:
        return int(self.lam.shape[0])


def standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and standard deviation (ddof=0, like StandardScaler); constant columns get 1."""
    mean = x.mean(dim=0)
    std = x.var(dim=0, unbiased=False).sqrt()
    # A column constant up to rounding would otherwise be blown up to unit variance (StandardScaler
    # treats it the same way).
    eps = torch.finfo(x.dtype).eps
    constant = std <= 10 * eps * mean.abs().clamp(min=1.0)
    scale = torch.where(constant, torch.ones_like(std), std)
    return mean, scale


def factorise(xs: torch.Tensor) -> GramBasis:
    """Eigendecompose the smaller Gram matrix of `xs` (X^T X if n >= p, else X X^T)."""
    n, p = xs.shape
    if n >= p:
        lam, vecs = torch.linalg.eigh(xs.T @ xs)
    else:
        lam, vecs = torch.linalg.eigh(xs @ xs.T)
    top = lam.max() if lam.numel() else torch.tensor(0.0, dtype=xs.dtype)
    tol = top.clamp(min=0) * max(n, p) * torch.finfo(xs.dtype).eps
    keep = lam > tol
    if top <= 0:  # every input constant: nothing to regress on
        keep = torch.zeros_like(keep)
    lam, vecs = lam[keep], vecs[:, keep]
    if n >= p:
        return GramBasis(lam=lam, a0=vecs, m=xs @ vecs)
    return GramBasis(lam=lam, a0=xs.T @ vecs, m=vecs)


def column_chunks(n_rows: int, n_cols: int, elements: int | None = None):
    """Yield column slices so that each [n_rows, chunk] block holds about `elements` values."""
    width = max(1, (elements or CHUNK_ELEMENTS) // max(1, n_rows))
    for start in range(0, n_cols, width):
        yield slice(start, min(n_cols, start + width))


def column_blocks(y, *, dtype, device, elements: int | None = None):
    """Yield (cols, block): column blocks of `y` (numpy or torch) as `dtype` on `device`.

    Every block is a view of ONE reused buffer (fresh CPU allocations of this size cost more
    in page faults than the conversion itself): use it before asking for the next one."""
    n, q = y.shape
    width = max(1, (elements or CHUNK_ELEMENTS) // max(1, n))
    buffer = torch.empty(n, min(width, q), dtype=dtype, device=device)
    for cols in column_chunks(n, q, elements):
        block = buffer[:, : cols.stop - cols.start]
        block.copy_(torch.as_tensor(y[:, cols]))
        yield cols, block


def column_sumsq(block: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each column, without a temporary the size of `block` on CPU."""
    if block.device.type == "cpu":
        a = block.numpy()
        return torch.from_numpy(np.einsum("ij,ij->j", a, a))
    return (block * block).sum(dim=0)


def column_mean_std(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and std (ddof=0) through BLAS reductions; UserError on NaN/inf values."""
    from .errors import UserError

    n = block.shape[0]
    mean = torch.ones(n, dtype=block.dtype, device=block.device) @ block / n
    if not bool(torch.isfinite(mean).all()):  # any NaN or inf in a column reaches its sum
        raise UserError("the targets contain NaN or infinite values")
    var = (column_sumsq(block) / n - mean * mean).clamp(min=0)
    return mean, var.sqrt()


def make_folds(n_samples: int, n_folds: int, mode: str, *, groups=None, gap: int = 0,
               seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, val_idx) pairs for k-fold cross-validation.

    Folds are made of whole groups (all samples that share a `groups` value, e.g. a movie frame
    seen in several repeats); without groups every sample is its own group, in sample order.
    `contiguous` holds out consecutive runs of sorted group values (neighbouring movie frames
    are correlated) and also drops `gap` groups on each side of the held-out run from training;
    `shuffled` assigns groups to folds at random (seeded) and ignores `gap`.
    """
    from .errors import UserError

    if groups is None:
        group_of_sample = np.arange(n_samples)
    else:
        group_of_sample = np.asarray(groups).reshape(-1)
        if group_of_sample.shape[0] != n_samples:
            raise UserError(f"groups has {group_of_sample.shape[0]} entries for {n_samples} samples")
    unique, position = np.unique(group_of_sample, return_inverse=True)
    n_groups = unique.shape[0]
    if n_folds < 2 or n_groups < n_folds:
        raise UserError(f"cannot make {n_folds} cross-validation folds from {n_groups} "
                        f"{'groups' if groups is not None else 'samples'} (need at least 2 folds, "
                        "one group per fold)")
    if mode == "contiguous":
        order = np.arange(n_groups)
    elif mode == "shuffled":
        order = np.random.default_rng(seed).permutation(n_groups)
    else:
        raise UserError(f"unknown cv_mode '{mode}' (choose contiguous or shuffled)")
    blocks = np.array_split(np.arange(n_groups), n_folds)
    folds = []
    for block in blocks:
        held = order[block]
        excluded = np.zeros(n_groups, dtype=bool)
        excluded[held] = True
        if mode == "contiguous" and gap > 0:
            lo, hi = max(0, block[0] - gap), min(n_groups, block[-1] + gap + 1)
            excluded[order[lo:hi]] = True
        val_idx = np.flatnonzero(np.isin(position, held))
        train_idx = np.flatnonzero(~excluded[position])
        if train_idx.size < 2:
            raise UserError(f"cv_gap={gap} leaves fewer than 2 training samples in a fold")
        folds.append((train_idx, val_idx))
    return folds


@dataclass
class _Fold:
    """One fold's factors, arranged so a column block needs no row gathering for training."""

    train_weight: torch.Tensor  # [n] 1 for training rows, 0 elsewhere
    n_train: int
    m_full: torch.Tensor  # [n, r] the fold's M with zero rows outside training
    m_sum: torch.Tensor  # [r] M^T 1 over training rows
    val_idx: torch.Tensor
    p_val: torch.Tensor  # [n_val, r] held-out inputs through A0
    lam: torch.Tensor


def _prepare_fold(x: torch.Tensor, train_idx, val_idx) -> _Fold:
    n = x.shape[0]
    tr = torch.as_tensor(train_idx, device=x.device)
    va = torch.as_tensor(val_idx, device=x.device)
    mean, scale = standardisation(x[tr])
    basis = factorise((x[tr] - mean) / scale)
    m_full = torch.zeros(n, basis.rank, dtype=x.dtype, device=x.device)
    m_full[tr] = basis.m
    weight = torch.zeros(n, dtype=x.dtype, device=x.device)
    weight[tr] = 1.0
    return _Fold(train_weight=weight, n_train=len(train_idx), m_full=m_full,
                 m_sum=basis.m.sum(dim=0), val_idx=va,
                 p_val=((x[va] - mean) / scale) @ basis.a0, lam=basis.lam)


def cross_validated_r2(x: torch.Tensor, y, alphas: np.ndarray, folds, group_of_column: torch.Tensor,
                       n_groups: int) -> np.ndarray:
    """Pooled R^2 [n_alphas, n_groups] of every alpha on held-out folds.

    Each fold is standardised with its own training statistics and factorised once; the held-out
    predictions of all alphas then come from the same factors. R^2 pools squared errors over the
    folds and over the columns of a group (variance-weighted R^2).
    """
    from .errors import UserError

    dtype, device = x.dtype, x.device
    q = y.shape[1]
    prepared = [_prepare_fold(x, tr, va) for tr, va in folds]
    alphas_t = torch.as_tensor(alphas, dtype=dtype, device=device)
    sse = torch.zeros(len(alphas), q, dtype=dtype, device=device)
    sst = torch.zeros(q, dtype=dtype, device=device)
    # One flat scratch buffer for the held-out residuals of every (fold, alpha, block).
    width = next(column_chunks(y.shape[0], q)).stop
    scratch = torch.empty(max(len(f.val_idx) for f in prepared) * width, dtype=dtype, device=device)
    for cols, block in column_blocks(y, dtype=dtype, device=device):
        for fold in prepared:
            y_mean = fold.train_weight @ block / fold.n_train
            if not bool(torch.isfinite(y_mean).all()):
                raise UserError("the targets contain NaN or infinite values")
            # M^T (Y_train - mean) without gathering the training rows.
            b0 = fold.m_full.T @ block - fold.m_sum[:, None] * y_mean[None, :]
            y_val = block[fold.val_idx]
            n_val = y_val.shape[0]
            val_mean = y_val.mean(dim=0)
            sst[cols] += column_sumsq(y_val) - n_val * val_mean * val_mean
            y_val -= y_mean  # now centred with the training mean, as the predictions are
            resid = scratch[: n_val * y_val.shape[1]].view(n_val, y_val.shape[1])
            for i in range(len(alphas)):
                torch.matmul(fold.p_val / (fold.lam + alphas_t[i]), b0, out=resid)
                resid -= y_val
                sse[i, cols] += column_sumsq(resid)
    sse_g = torch.zeros(len(alphas), n_groups, dtype=dtype, device=device)
    sst_g = torch.zeros(n_groups, dtype=dtype, device=device)
    sse_g.index_add_(1, group_of_column, sse)
    sst_g.index_add_(0, group_of_column, sst)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - sse_g.cpu().numpy() / sst_g.cpu().numpy()[None, :]
    return r2
