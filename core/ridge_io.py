"""Saving and loading a fitted RidgeRegression: safetensors weights plus a small JSON sidecar.

    <name>.safetensors   mean_x, scale_x, mean_y, scale_y, intercept and coef (dense [p, q])
                         or factor_a [p, r] + factor_b [r, q] (low-rank)
    <name>.json          format and version, dtype, shapes, form, chosen alpha, the CV grid and
                         scores, and the estimator's parameters
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, read_json

RIDGE_FORMAT = "spikevaediff.ridge"
RIDGE_FORMAT_VERSION = 1
_STATS = ("mean_x", "scale_x", "mean_y", "scale_y", "intercept")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def weights_path(path) -> Path:
    """`path` with the .safetensors suffix added when missing."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def write_ridge(ridge, path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a fitted ridge; returns the weights path (the sidecar sits beside it)."""
    from safetensors.torch import save_file

    path = weights_path(path)
    tensors = {name: getattr(ridge, name + "_") for name in _STATS}
    if ridge.coef_ is not None:
        tensors["coef"] = ridge.coef_
    else:
        tensors["factor_a"], tensors["factor_b"] = ridge.factors_
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    alpha = ridge.alpha_ if isinstance(ridge.alpha_, float) else [float(a) for a in ridge.alpha_]
    meta = {
        "format": RIDGE_FORMAT, "format_version": RIDGE_FORMAT_VERSION,
        "dtype": _dtype_name(dtype),
        "n_features": ridge.n_features_in_, "n_targets": ridge.n_targets_, "rank": ridge.rank_,
        "form": "low_rank" if ridge.is_low_rank else "dense",
        "alpha": alpha,
        "alphas": None if ridge.alphas_ is None else [float(a) for a in ridge.alphas_],
        "cv_scores": None if ridge.cv_scores_ is None else _finite_or_none(ridge.cv_scores_),
        "params": {
            "alpha": ridge.alpha, "cv": ridge.cv, "cv_mode": ridge.cv_mode, "cv_gap": ridge.cv_gap,
            "alphas": None if ridge.alphas is None else [float(a) for a in np.ravel(ridge.alphas)],
            "target_groups": ridge.target_groups, "low_rank": ridge.low_rank, "seed": ridge.seed,
            "fit_dtype": _dtype_name(ridge.dtype)},
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_ridge(cls, path, device="cpu"):
    """Build a fitted `cls` (RidgeRegression) from files written by `write_ridge`."""
    path = weights_path(path)
    meta = _read_sidecar(path)
    tensors = _read_tensors(path)
    params = meta.get("params") or {}
    ridge = cls(alphas=params.get("alphas"), alpha=params.get("alpha"), cv=params.get("cv", 5),
                cv_mode=params.get("cv_mode", "contiguous"), cv_gap=params.get("cv_gap", 0),
                target_groups=params.get("target_groups"), device=device,
                dtype=_DTYPES.get(meta.get("dtype"), torch.float32),
                low_rank=params.get("low_rank", "auto"), seed=params.get("seed", 0))
    try:
        for name in _STATS:
            setattr(ridge, name + "_", tensors[name].to(device))
        if meta["form"] == "dense":
            ridge.coef_, ridge.factors_ = tensors["coef"].to(device), None
        else:
            ridge.coef_ = None
            ridge.factors_ = (tensors["factor_a"].to(device), tensors["factor_b"].to(device))
        alpha = meta["alpha"]
        ridge.alpha_ = np.asarray(alpha, dtype=float) if isinstance(alpha, list) else float(alpha)
        ridge.alphas_ = None if meta.get("alphas") is None else np.asarray(meta["alphas"], float)
        ridge.cv_scores_ = (None if meta.get("cv_scores") is None
                            else np.asarray(meta["cv_scores"], dtype=float))
        ridge.rank_ = int(meta["rank"])
    except KeyError as exc:
        raise UserError(f"ridge file {path} is incomplete: missing {exc}") from None
    ridge._fast = None
    p, q = ridge.n_features_in_, ridge.n_targets_
    shapes_agree = all(getattr(ridge, n + "_").shape == ((p,) if n.endswith("_x") else (q,))
                       for n in _STATS)
    if (p, q) != (meta.get("n_features"), meta.get("n_targets")) or not shapes_agree:
        raise UserError(f"ridge file {path} is corrupt: weights are {p}x{q}, its sidecar says "
                        f"{meta.get('n_features')}x{meta.get('n_targets')}")
    return ridge


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _read_sidecar(path: Path) -> dict:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise UserError(f"ridge metadata {sidecar} is missing")
    meta = read_json(sidecar, "ridge metadata")
    if not isinstance(meta, dict) or meta.get("format") != RIDGE_FORMAT:
        raise UserError(f"{sidecar} is not a spikevaediff ridge file")
    if meta.get("format_version") != RIDGE_FORMAT_VERSION:
        raise UserError(f"{sidecar} has ridge format version {meta.get('format_version')}; "
                        f"this spikevaediff reads version {RIDGE_FORMAT_VERSION}")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"ridge weights {path} are missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        first_line = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise UserError(f"ridge weights {path} are corrupt ({type(exc).__name__}: {first_line})") from None


def _finite_or_none(a: np.ndarray) -> list:
    return [[float(v) if math.isfinite(v) else None for v in row] for row in np.atleast_2d(a)]
