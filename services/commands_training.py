"""Training commands: bench-ridge (train, evaluate and ablate join this group)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-ridge",
        help="time our ridge against scikit-learn's Ridge, and dense vs low-rank projection",
        description=(
            "Fit and predict with our closed-form ridge and with StandardScaler + scikit-learn "
            "Ridge on the same random data, in the same run, and time the per-bin projection "
            "with dense weights against low-rank factors, for the session's units and for a "
            "pooled population. Prints ratios (ours / baseline; below 1 is faster) with median "
            "and p99, and writes them as JSON. The defaults are the published shape (3000 "
            "samples x 500 units -> 91,168 VDVAE latent values; about 5 GB of memory); shrink "
            "them with the options for a quick run."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--samples", type=int, default=3000, help="training samples (bins)")
    p.add_argument("--units", type=int, default=500, help="units of one session")
    p.add_argument("--targets", type=int, default=91_168,
                   help="target width (91,168 = VDVAE latents of the published model)")
    p.add_argument("--test-samples", type=int, default=300, help="bins predicted in the predict test")
    p.add_argument("--pooled-units", type=int, default=20_000,
                   help="units of a pooled multi-session population (projection test)")
    p.add_argument("--alpha", type=float, default=50_000.0, help="ridge alpha (Brain-Diffuser VDVAE)")
    p.add_argument("--fits", type=int, default=1, help="fits per side (median reported)")
    p.add_argument("--repeats", type=int, default=50, help="timed projections per side")
    p.add_argument("--max-dense-gb", type=float, default=2.0,
                   help="largest dense matrix allocated; a wider one is timed block by block")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads, both sides")
    p.add_argument("--device", default="cpu", help="device of our ridge (cpu, cuda); sklearn runs on CPU")
    p.add_argument("--skip-sklearn", action="store_true", help="only the projection test")
    p.add_argument("--seed", type=int, default=0, help="random data seed")
    p.add_argument("--json", default="runs/bench/ridge.json", help="where to write the results")
    p.set_defaults(func=run_bench_ridge)


def run_bench_ridge(args) -> int:
    from spikevaediff.training.bench_ridge import format_table, run_benchmark, write_json

    result = run_benchmark(
        n_train=args.samples, n_units=args.units, n_targets=args.targets, n_test=args.test_samples,
        pooled_units=args.pooled_units, alpha=args.alpha, fits=args.fits, repeats=args.repeats,
        max_dense_gb=args.max_dense_gb, threads=args.threads, device=args.device,
        skip_sklearn=args.skip_sklearn, seed=args.seed)
    print(format_table(result))
    print(f"wrote {write_json(result, args.json)}")
    return 0
