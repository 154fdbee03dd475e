"""Ridge benchmark: our closed-form ridge against scikit-learn's Ridge, in the same run.

Three comparisons, each a ratio (ours / baseline, in time: below 1 is faster):

1. fit: `RidgeRegression(alpha=...)` against StandardScaler + sklearn `Ridge(alpha=...)` on the
   same data (default 3000 samples x 500 units -> 91,168 targets, the published VDVAE width);
2. predict: a batch of test bins, same two models; their predictions are also compared;
3. projection of one bin (the decoder's hot path), dense [p, q] against low-rank
   A [p, r] @ B [r, q], r = min(n, p), for the session's units and for a pooled population
   (default 20,000 units): the low-rank form wins when r*(p+q) < p*q.

Timings alternate between the two sides, after a warm-up, and report median and p99. A dense
matrix larger than `max_dense_gb` is timed as consecutive column blocks of one block's size
(the same bytes streamed per bin, since a block is far larger than any cache).
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from spikevaediff.core.errors import UserError
from spikevaediff.core.ridge import RidgeRegression, project_dense, project_low_rank

PUBLISHED_VDVAE_TARGETS = 91_168


def make_data(n_samples: int, n_units: int, n_targets: int, seed: int = 0):
    """Poisson counts and targets with a weak planted linear signal (float32 targets)."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n_samples, n_units)).astype(np.float64)
    y = rng.standard_normal((n_samples, n_targets), dtype=np.float32)
    k = min(10, n_units)
    y += (x[:, :k] @ rng.standard_normal((k, n_targets)).astype(np.float64) * 0.1).astype(np.float32)
    return x, y


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _alternate(fn_a, fn_b, repeats: int, warmup: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Run a and b alternately (after warm-up) so machine noise hits both alike."""
    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for i in range(repeats):
        if i % 2:
            tb.append(_timed(fn_b)), ta.append(_timed(fn_a))
        else:
            ta.append(_timed(fn_a)), tb.append(_timed(fn_b))
    return np.asarray(ta), np.asarray(tb)


def _stats(t: np.ndarray) -> dict:
    return {"median_ms": float(np.median(t) * 1e3), "p99_ms": float(np.percentile(t, 99) * 1e3)}


def _synchronizer(device: str):
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def bench_fit_predict(n_train: int, n_units: int, n_targets: int, n_test: int, alpha: float,
                      fits: int, device: str, seed: int) -> dict:
    """Fit and predict times of ours (on `device`) vs sklearn (StandardScaler + Ridge, CPU)."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    x, y = make_data(n_train + n_test, n_units, n_targets, seed)
    x_train, y_train, x_test = x[:n_train], y[:n_train], x[n_train:]
    sync = _synchronizer(device)
    ours_fit, sk_fit = [], []
    for i in range(fits):  # alternate which side goes first
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for side in order:
            if side == 0:
                ours = RidgeRegression(alpha=alpha, device=device)
                ours_fit.append(_timed(lambda: (ours.fit(x_train, y_train), sync())))
            else:
                scaler, sk = StandardScaler(), Ridge(alpha=alpha)
                sk_fit.append(_timed(lambda: sk.fit(scaler.fit_transform(x_train), y_train)))
    pred_ours, pred_sk = {}, {}
    t_ours, t_sk = _alternate(lambda: pred_ours.update(y=ours.predict(x_test)),
                              lambda: pred_sk.update(y=sk.predict(scaler.transform(x_test))),
                              repeats=max(3, fits), warmup=1)
    scale = float(np.abs(pred_sk["y"]).max())
    return {
        "shape": {"n_train": n_train, "n_units": n_units, "n_targets": n_targets, "n_test": n_test,
                  "alpha": alpha, "dtype": "float64", "device": str(device)},
        "fit_s": {"ours": float(np.median(ours_fit)), "sklearn": float(np.median(sk_fit))},
        "fit_ratio": float(np.median(ours_fit) / np.median(sk_fit)),
        "predict_s": {"ours": float(np.median(t_ours)), "sklearn": float(np.median(t_sk))},
        "predict_ratio": float(np.median(t_ours) / np.median(t_sk)),
        "max_rel_diff_vs_sklearn": float(np.abs(pred_ours["y"] - pred_sk["y"]).max() / scale),
        "form_chosen": "low_rank" if ours.is_low_rank else "dense",
    }


def bench_projection(n_train: int, n_units: int, n_targets: int, repeats: int,
                     max_dense_gb: float, device: str, seed: int) -> dict:
    """Per-bin projection cost, dense vs low-rank, float32, through the estimator's own kernels."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(n_train, n_units)
    dense_bytes = 4 * n_units * n_targets
    blocks = max(1, int(np.ceil(dense_bytes / (max_dense_gb * 2**30))))
    block_cols = int(np.ceil(n_targets / blocks))

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.01).to(device)

    w_block, b_block = rand(n_units, block_cols), rand(block_cols)
    a, b_mat, intercept = rand(n_units, rank), rand(rank, n_targets), rand(n_targets)
    x = torch.poisson(torch.full((n_units,), 2.0), generator=gen).to(device)
    sync = _synchronizer(device)

    def dense():
        with torch.inference_mode():
            for _ in range(blocks):
                project_dense(x, w_block, b_block)
            sync()

    def low_rank():
        with torch.inference_mode():
            project_low_rank(x, a, b_mat, intercept)
            sync()

    t_dense, t_low = _alternate(dense, low_rank, repeats)
    return {
        "n_units": n_units, "rank": rank, "n_targets": n_targets, "device": str(device),
        "dense_blocks": blocks,
        "macs": {"dense": n_units * n_targets, "low_rank": rank * (n_units + n_targets)},
        "dense": _stats(t_dense), "low_rank": _stats(t_low),
        "ratio_low_rank_over_dense": float(np.median(t_low) / np.median(t_dense)),
        "auto_picks": "low_rank" if rank * (n_units + n_targets) < n_units * n_targets else "dense",
    }


def run_benchmark(n_train: int = 3000, n_units: int = 500, n_targets: int = PUBLISHED_VDVAE_TARGETS,
                  n_test: int = 300, pooled_units: int = 20_000, alpha: float = 50_000.0,
                  fits: int = 1, repeats: int = 50, max_dense_gb: float = 2.0, threads: int = 1,
                  device: str = "cpu", skip_sklearn: bool = False, seed: int = 0) -> dict:
    """Run every comparison; returns the result dictionary (also what the JSON holds)."""
    from threadpoolctl import threadpool_limits

    if min(n_train, n_units, n_targets, n_test, pooled_units, fits, repeats, threads) < 1:
        raise UserError("every size, count and thread number of bench-ridge must be at least 1")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but torch sees no CUDA device here")
    torch.set_num_threads(threads)
    result = {"machine": platform.platform(), "threads": threads, "torch": torch.__version__}
    with threadpool_limits(limits=threads):
        if not skip_sklearn:
            result["fit_predict"] = bench_fit_predict(n_train, n_units, n_targets, n_test, alpha,
                                                      fits, device, seed)
        result["projection"] = [
            bench_projection(n_train, p, n_targets, repeats, max_dense_gb, device, seed)
            for p in dict.fromkeys((n_units, pooled_units))]
    return result


def format_table(result: dict) -> str:
    """A readable summary of `run_benchmark`'s result."""
    lines = [f"ridge benchmark ({result['threads']} thread(s), torch {result['torch']}); "
             "ratio = ours / baseline, below 1 is faster"]
    fp = result.get("fit_predict")
    if fp:
        s = fp["shape"]
        lines += [
            f"fit+predict: {s['n_train']} samples x {s['n_units']} units -> {s['n_targets']} "
            f"targets, alpha {s['alpha']:g}, {s['dtype']}, ours on {s['device']} chose "
            f"{fp['form_chosen']}",
            f"  {'':10s} {'ours':>10s} {'sklearn':>10s} {'ratio':>8s}",
            f"  {'fit s':10s} {fp['fit_s']['ours']:10.3f} {fp['fit_s']['sklearn']:10.3f} "
            f"{fp['fit_ratio']:8.2f}",
            f"  {'predict s':10s} {fp['predict_s']['ours']:10.4f} {fp['predict_s']['sklearn']:10.4f} "
            f"{fp['predict_ratio']:8.2f}",
            f"  max |ours - sklearn| / max |sklearn| = {fp['max_rel_diff_vs_sklearn']:.2e}",
        ]
    lines.append("per-bin projection, float32 (baseline: dense [p, q]):")
    lines.append(f"  {'units':>6s} {'rank':>5s} {'dense ms p50/p99':>18s} {'low-rank ms p50/p99':>20s}"
                 f" {'ratio':>6s}  auto picks")
    for row in result["projection"]:
        d, lr = row["dense"], row["low_rank"]
        note = f" (dense timed as {row['dense_blocks']} blocks)" if row["dense_blocks"] > 1 else ""
        lines.append(f"  {row['n_units']:6d} {row['rank']:5d} {d['median_ms']:8.3f}/{d['p99_ms']:<9.3f}"
                     f" {lr['median_ms']:9.3f}/{lr['p99_ms']:<10.3f} {row['ratio_low_rank_over_dense']:6.2f}"
                     f"  {row['auto_picks']}{note}")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path
