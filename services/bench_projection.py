"""The decoder's per-bin projection against a naive dense numpy matmul, measured side by side.

Naive: what a straightforward decoder does every bin: standardise the counts, then multiply by
the dense weight matrix of every target group (VDVAE + CLIP-Vision + CLIP-Text) in numpy.
Ours: the ridge fast path (standardisation folded into float32 weights, low-rank factors when they
are cheaper), and — the design choice that matters most — only the VDVAE projection every bin;
the CLIP projections run only for the bins a refiner takes.
"""
from __future__ import annotations

import time

import numpy as np


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def bench_projection(ridges: dict, repeats: int = 200, warmup: int = 20, seed: int = 0,
                     refine_every: int | None = None, threads: int = 1) -> dict:
    """Per-bin projection cost: ours vs naive, same counts, same outputs (checked).

    `ridges`: name -> fitted RidgeRegression (as in a bundle). `refine_every`: how many bins pass
    per refiner request (e.g. 15 when the refiner takes ~0.5 s per image at 30 Hz); None = only
    the same-outputs comparison. Both sides get the same thread budget (torch and BLAS).
    """
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    with threadpool_limits(threads):
        return _bench(ridges, repeats, warmup, seed, refine_every, threads)


def _bench(ridges, repeats, warmup, seed, refine_every, threads) -> dict:
    import torch

    rng = np.random.default_rng(seed)
    first = next(iter(ridges.values()))
    p = first.n_features_in_
    x = rng.poisson(2.0, size=p).astype(np.float32)
    naive_weights = {}
    for name, r in ridges.items():
        # Our weights apply to raw counts (x @ coef + intercept); the textbook form works on
        # standardised counts: z = (x - mean) / scale, y = z @ (coef * scale) + (intercept + mean @ coef).
        mean = r.mean_x_.cpu().numpy().astype(np.float64)
        scale = r.scale_x_.cpu().numpy().astype(np.float64)
        coef = r.dense_coef().cpu().numpy().astype(np.float64)
        intercept = r.intercept_.cpu().numpy().astype(np.float64) + mean @ coef
        naive_weights[name] = (mean.astype(np.float32), scale.astype(np.float32),
                               (coef * scale[:, None]).astype(np.float32), intercept.astype(np.float32))

    def naive(names):
        out = {}
        for name in names:
            mean, scale, weights, intercept = naive_weights[name]
            out[name] = ((x - mean) / scale) @ weights + intercept
        return out

    xt = torch.from_numpy(x)

    def ours(names):
        return {name: ridges[name].project(xt) for name in names}

    names = list(ridges)
    for name in names:  # same outputs (within float32 rounding)
        a, b = naive([name])[name], ours([name])[name].numpy()
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(a).max())))
    for _ in range(warmup):
        naive(names), ours(names)
    result = {"units": p, "threads": threads, "outputs": {n: int(r.n_targets_) for n, r in ridges.items()},
              "low_rank": {n: bool(r.is_low_rank) for n, r in ridges.items()}}
    naive_all, ours_all = [], []
    for _ in range(repeats):  # interleaved, so both sides see the same machine noise
        naive_all += _time(lambda: naive(names), 1)
        ours_all += _time(lambda: ours(names), 1)
    result["naive_all_groups"] = _stats(naive_all)
    result["ours_all_groups"] = _stats(ours_all)
    result["projection_ratio"] = result["ours_all_groups"]["p50_ms"] / result["naive_all_groups"]["p50_ms"]
    if refine_every and "vdvae" in ridges:
        ours_vdvae = _time(lambda: ours(["vdvae"]), repeats)
        per_bin = np.median(ours_vdvae) + (np.median(ours_all) - np.median(ours_vdvae)) / refine_every
        result["ours_per_bin_compute_only_consumed_ms"] = float(per_bin)
        result["refine_every_bins"] = refine_every
        result["per_bin_work_ratio"] = float(per_bin / result["naive_all_groups"]["p50_ms"])
    return result


def synthetic_ridges(units: int, widths: dict, n_train: int = 600, seed: int = 0) -> dict:
    """Ridges of a realistic shape fitted on random data (for the published-model widths)."""
    from spikevaediff.core.ridge import RidgeRegression

    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n_train, units)).astype(np.float32)
    out = {}
    for name, q in widths.items():
        y = rng.standard_normal((n_train, q), dtype=np.float32)
        out[name] = RidgeRegression(alpha=5e4, seed=seed).fit(x, y)
    return out


PAPER_WIDTHS = {"vdvae": 91_168, "clip_vision": 257 * 768, "clip_text": 77 * 768}
