"""Closed-form ridge regression on torch, from binned spike counts to wide target vectors.

`RidgeRegression` z-scores the inputs with training statistics and centres the targets (what
Brain-Diffuser does with StandardScaler + sklearn Ridge), factorises the design once
(`ridge_solver`) and picks alpha by k-fold cross-validation over a grid, per target group, or
uses a fixed alpha (Brain-Diffuser: 50000 VDVAE, 60000 CLIP-Vision, 100000 CLIP-Text, see
`BRAIN_DIFFUSER_ALPHAS`). Brain-Diffuser fits CLIP one token at a time with the same alpha; with
one fixed alpha that equals a single fit over all tokens (ridge is column-separable), and
`target_groups=257` gives each token its own cross-validated alpha.

The learned weights are folded with the standardisation (x -> (x - mean)/scale @ W + b equals
x @ W' + b') and kept either as a dense [p, q] matrix or as low-rank factors A [p, r] @ B [r, q],
r <= min(n, p), whichever costs fewer multiply-adds per sample. With thousands of pooled units
and a few thousand training bins the low-rank form is several times cheaper.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import ridge_solver as solver
from .errors import UserError

# Brain-Diffuser's fixed alphas per target group (sklearn Ridge on z-scored inputs).
BRAIN_DIFFUSER_ALPHAS = {"vdvae": 50_000.0, "clip_vision": 60_000.0, "clip_text": 100_000.0}
# Cross-validation grid when neither `alpha` nor `alphas` is given: 1 to 1e7, half decades.
DEFAULT_ALPHAS = tuple(float(a) for a in np.round(10.0 ** np.arange(0.0, 7.01, 0.5), 6))


def project_dense(x: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
    """x [.., p] @ W [p, q] + b: p*q multiply-adds per sample."""
    return torch.addmm(intercept, x, coef) if x.dim() == 2 else torch.addmv(intercept, coef.T, x)


def project_low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     intercept: torch.Tensor) -> torch.Tensor:
    """(x [.., p] @ A [p, r]) @ B [r, q] + b: r*(p+q) multiply-adds per sample."""
    return project_dense(x @ a, b, intercept)


def low_rank_is_cheaper(n_features: int, n_targets: int, rank: int) -> bool:
    """True when r*(p+q) multiply-adds per sample beat the dense p*q."""
    return rank * (n_features + n_targets) < n_features * n_targets


class RidgeRegression:
    """Ridge regression with z-scored inputs, one shared factorisation and CV-chosen alphas.

    Parameters: `alpha` (fixed) or `alphas` (grid for k-fold CV; default `DEFAULT_ALPHAS`);
    `cv` folds, `cv_mode` "contiguous" (consecutive runs of samples or of `groups` values, for
    correlated neighbouring movie frames) or "shuffled"; `cv_gap` groups dropped from training
    on each side of a contiguous held-out run; `target_groups` splits the q targets into that many
    equal contiguous groups with their own alpha (e.g. 257 CLIP tokens); `dtype` of the fit
    (float64 by default: the Gram matrix squares the condition number); `low_rank` "auto",
    True or False; `seed` for shuffled folds.

    Learned: mean_x_, scale_x_, mean_y_, scale_y_ (training statistics), alpha_ (float, or an
    array per target group), alphas_ and cv_scores_ (pooled held-out R^2, [n_alphas, n_groups]),
    rank_, intercept_ [q] and either coef_ [p, q] or factors_ (A [p, r], B [r, q]), all in
    the units of the raw inputs (standardisation folded in).
    """

    def __init__(self, alphas=None, alpha: float | None = None, cv: int = 5,
                 cv_mode: str = "contiguous", cv_gap: int = 0, target_groups: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
                 low_rank="auto", seed: int = 0):
        self.alphas = alphas
        self.alpha = alpha
        self.cv = cv
        self.cv_mode = cv_mode
        self.cv_gap = cv_gap
        self.target_groups = target_groups
        self.device = device
        self.dtype = dtype
        self.low_rank = low_rank
        self.seed = seed

    def __repr__(self) -> str:
        what = f"alpha={self.alpha}" if self.alpha is not None else f"cv={self.cv} ({self.cv_mode})"
        return f"RidgeRegression({what}, low_rank={self.low_rank!r}, dtype={self.dtype})"

    # ----------------------------------------------------------------------------- fitting
    def _alpha_grid(self) -> np.ndarray | None:
        if self.alpha is not None and self.alphas is not None:
            raise UserError("give either a fixed alpha or a grid of alphas, not both")
        if self.alpha is not None:
            if not float(self.alpha) > 0:
                raise UserError(f"alpha must be positive, got {self.alpha}")
            return None
        grid = np.asarray(DEFAULT_ALPHAS if self.alphas is None else self.alphas, dtype=float).ravel()
        if grid.size == 0 or not np.all(grid > 0) or not np.all(np.isfinite(grid)):
            raise UserError(f"alphas must be a non-empty list of positive numbers, got {self.alphas}")
        return grid

    def _column_groups(self, q: int) -> tuple[int, torch.Tensor]:
        n_groups = 1 if self.target_groups is None else int(self.target_groups)
        if n_groups < 1 or q % n_groups:
            raise UserError(f"target_groups={self.target_groups} must divide the {q} targets evenly")
        return n_groups, torch.arange(q, device=self.device) // (q // n_groups)

    def fit(self, X, Y, groups=None) -> "RidgeRegression":
        """Fit on X [n, p] (counts) and Y [n, q] (numpy or torch). `groups` [n] keeps samples
        that share a value (e.g. a movie frame) in the same CV fold."""
        if self.low_rank not in ("auto", True, False):
            raise UserError(f"low_rank must be 'auto', True or False, got {self.low_rank!r}")
        grid = self._alpha_grid()
        x = _check_matrix(X, "X").to(device=self.device, dtype=self.dtype)
        _check_targets(Y, x.shape[0])
        n, p = x.shape
        q = int(Y.shape[1])
        if n < 2:
            raise UserError(f"ridge needs at least 2 training samples, got {n}")
        n_groups, group_of_column = self._column_groups(q)
        self.mean_x_, self.scale_x_ = solver.standardisation(x)

        if grid is None:
            self.alphas_, self.cv_scores_ = None, None
            group_alphas = np.full(n_groups, float(self.alpha))
        else:
            folds = solver.make_folds(n, int(self.cv), self.cv_mode, groups=groups,
                                      gap=int(self.cv_gap), seed=self.seed)
            scores = solver.cross_validated_r2(x, Y, grid, folds, group_of_column, n_groups)
            self.alphas_, self.cv_scores_ = grid, scores
            # Undefined scores (a constant target group) fall back to the strongest shrinkage.
            filled = np.where(np.isfinite(scores), scores, -np.inf)
            best = np.where(np.isfinite(scores).any(axis=0), filled.argmax(axis=0), len(grid) - 1)
            group_alphas = grid[best]
        self.alpha_ = float(group_alphas[0]) if n_groups == 1 else group_alphas

        basis = solver.factorise((x - self.mean_x_) / self.scale_x_)
        self.rank_ = basis.rank
        use_low_rank = (low_rank_is_cheaper(p, q, basis.rank) if self.low_rank == "auto"
                        else bool(self.low_rank))
        alpha_of_column = torch.as_tensor(group_alphas, dtype=self.dtype,
                                          device=self.device)[group_of_column]
        self._solve(Y, basis, alpha_of_column, use_low_rank)
        self._fast = None
        return self

    def _solve(self, Y, basis: solver.GramBasis, alpha_of_column: torch.Tensor, low_rank: bool):
        """Weights for every target column, folded with the input standardisation; also the
        target statistics (one pass over Y, block by block)."""
        q = int(Y.shape[1])
        a = basis.a0 / self.scale_x_[:, None]  # [p, r] acts on raw inputs
        mean_through_a = self.mean_x_ @ a  # [r]
        m_sum = basis.m.sum(dim=0)  # M^T 1 (about 0: M is orthogonal to 1) centres Y in the product
        new = dict(dtype=self.dtype, device=self.device)
        self.mean_y_, self.scale_y_, self.intercept_ = (torch.empty(q, **new) for _ in range(3))
        if low_rank:
            b = torch.empty(basis.rank, q, **new)
        else:
            coef = torch.empty(a.shape[0], q, **new)
        for cols, block in solver.column_blocks(Y, **new):
            mean, std = solver.column_mean_std(block)
            self.mean_y_[cols], self.scale_y_[cols] = mean, std
            b_cols = basis.m.T @ block - m_sum[:, None] * mean[None, :]  # M^T (Y - mean)
            b_cols /= basis.lam[:, None] + alpha_of_column[None, cols]
            self.intercept_[cols] = mean - mean_through_a @ b_cols
            if low_rank:
                b[:, cols] = b_cols
            else:
                coef[:, cols] = a @ b_cols
        self.coef_, self.factors_ = (None, (a, b)) if low_rank else (coef, None)

    # ----------------------------------------------------------------------------- inference
    def _check_fitted(self):
        if not hasattr(self, "intercept_"):
            raise UserError("this RidgeRegression is not fitted yet: call fit() or load()")

    @property
    def n_features_in_(self) -> int:
        self._check_fitted()
        return int((self.coef_ if self.coef_ is not None else self.factors_[0]).shape[0])

    @property
    def n_targets_(self) -> int:
        self._check_fitted()
        return int(self.intercept_.shape[0])

    @property
    def is_low_rank(self) -> bool:
        self._check_fitted()
        return self.factors_ is not None

    def dense_coef(self) -> torch.Tensor:
        """The [p, q] weights on raw inputs (materialised from the factors when low-rank)."""
        self._check_fitted()
        return self.coef_ if self.coef_ is not None else self.factors_[0] @ self.factors_[1]

    def predict(self, X):
        """Predictions [n, q] in the fit dtype; numpy in, numpy out (torch in, torch out)."""
        self._check_fitted()
        x = _check_matrix(X, "X")
        if x.shape[1] != self.n_features_in_:
            raise UserError(f"X has {x.shape[1]} units, the ridge was fitted on {self.n_features_in_}")
        with torch.inference_mode():
            x = x.to(device=self.intercept_.device, dtype=self.intercept_.dtype)
            if self.coef_ is not None:
                y = project_dense(x, self.coef_, self.intercept_)
            else:
                y = project_low_rank(x, *self.factors_, self.intercept_)
        return y if isinstance(X, torch.Tensor) else y.cpu().numpy()

    def project(self, x) -> torch.Tensor:
        """Fast path for one bin (or a small batch): float32, no autograd, on the ridge's device.

        x: [p] or [b, p] counts; returns [q] or [b, q] float32 tensor.
        """
        fast = self._fast_weights()
        x = torch.as_tensor(x).to(device=fast[-1].device, dtype=torch.float32)
        if x.shape[-1] != fast[0].shape[0]:
            raise UserError(f"input has {x.shape[-1]} units, the ridge was fitted on {fast[0].shape[0]}")
        with torch.inference_mode():
            return project_dense(x, *fast) if len(fast) == 2 else project_low_rank(x, *fast)

    def _fast_weights(self) -> tuple[torch.Tensor, ...]:
        self._check_fitted()
        if getattr(self, "_fast", None) is None:
            tensors = (self.coef_,) if self.coef_ is not None else self.factors_
            self._fast = tuple(t.to(torch.float32).contiguous() for t in (*tensors, self.intercept_))
        return self._fast

    def to(self, device) -> "RidgeRegression":
        """Move the learned tensors (and the float32 fast path) to `device`."""
        self._check_fitted()
        self.device = device
        for name in ("mean_x_", "scale_x_", "mean_y_", "scale_y_", "intercept_", "coef_"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else value.to(device))
        if self.factors_ is not None:
            self.factors_ = tuple(t.to(device) for t in self.factors_)
        self._fast = None
        return self

    # ----------------------------------------------------------------------------- persistence
    def save(self, path, dtype: torch.dtype = torch.float32) -> Path:
        """Write `path` (.safetensors weights) and its `.json` sidecar; returns the weights path.

        Weights are stored in `dtype` (float32 by default: what inference uses)."""
        from .ridge_io import write_ridge

        self._check_fitted()
        return write_ridge(self, path, dtype)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "RidgeRegression":
        """Read a ridge written by `save`; UserError when a file is missing or corrupt."""
        from .ridge_io import read_ridge

        return read_ridge(cls, path, device)


def transductive_renormalise(predictions, target_mean, target_std):
    """Brain-Diffuser's test-time re-scaling: z-score each predicted column over the evaluated
    set, then give it the training targets' mean and std (`ridge.mean_y_`, `ridge.scale_y_`).

    This uses statistics of the test set itself (it is transductive): only for comparing with
    published numbers, never applied by default. numpy in, numpy out (torch in, torch out).
    """
    as_torch = isinstance(predictions, torch.Tensor)
    pred = torch.as_tensor(predictions, dtype=torch.float64)
    mean_t = torch.as_tensor(target_mean, dtype=torch.float64).cpu()
    std_t = torch.as_tensor(target_std, dtype=torch.float64).cpu()
    pred = pred.cpu()
    if pred.dim() != 2 or pred.shape[0] < 2:
        raise UserError("transductive re-normalisation needs a [n >= 2, q] batch of predictions")
    spread = pred.std(dim=0, unbiased=False)
    z = (pred - pred.mean(dim=0)) / torch.where(spread > 0, spread, torch.ones_like(spread))
    out = (z * std_t + mean_t).to(torch.as_tensor(predictions).dtype)
    return out if as_torch else out.numpy()


# --------------------------------------------------------------------------------- helpers
def _check_matrix(a, name: str) -> torch.Tensor:
    t = torch.as_tensor(a)
    if t.dim() != 2:
        raise UserError(f"{name} must be a 2-D [samples, columns] array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{name} contains NaN or infinite values")
    return t


def _check_targets(y, n: int) -> None:
    """Shape checks; finiteness is checked block by block while fitting (one pass over Y)."""
    shape = tuple(getattr(y, "shape", ()))
    if len(shape) != 2:
        raise UserError(f"Y must be a 2-D [samples, targets] array, got shape {shape}")
    if shape[0] != n:
        raise UserError(f"X has {n} samples but Y has {shape[0]}")
    if shape[1] < 1:
        raise UserError("Y has no target columns")
