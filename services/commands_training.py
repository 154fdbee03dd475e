"""Training commands: train, evaluate, ablate, bench-ridge."""
from __future__ import annotations

import argparse


def _session_args(p, targets=("vdvae", "clip_vision", "clip_text"), several_stage1=False) -> None:
    p.add_argument("--movie", default="natural_movie_one", help="the movie whose presentations are decoded")
    p.add_argument("--areas", nargs="+", default=None, metavar="AREA",
                   help="visual areas whose units are used (default: all); e.g. VISp VISl")
    p.add_argument("--profile", default="tiny", choices=("tiny", "paper"), help="model profile")
    p.add_argument("--weights", default=None, help="weights folder of the profile (default ~/.cache/spikevaediff/<profile>)")
    p.add_argument("--split", default="repeats", choices=("repeats", "segments"),
                   help="held-out repeats of the same frames, or held-out movie segments (new frames)")
    p.add_argument("--test-repeats", type=int, default=2, help="repeats held out by the repeats split")
    p.add_argument("--test-fraction", type=float, default=0.2, help="movie fraction held out by the segments split")
    p.add_argument("--gap", type=int, default=30, help="frames dropped around each held-out segment")
    p.add_argument("--window", nargs=2, type=float, default=None, metavar=("START", "STOP"),
                   help="counting window after frame onset, seconds (default: from the areas' latencies)")
    p.add_argument("--no-average", action="store_true", help="train on single presentations, not per-frame means")
    p.add_argument("--alphas", default="cv", choices=("cv", "fixed"),
                   help="ridge alpha: k-fold cross-validation per target group, or Brain-Diffuser's fixed values")
    p.add_argument("--targets", nargs="+", default=list(targets),
                   choices=("vdvae", "clip_vision", "clip_text"), help="which ridges to fit")
    p.add_argument("--stage1", default=["vdvae"] if several_stage1 else "vdvae", choices=("vdvae", "vae"),
                   nargs="+" if several_stage1 else None,
                   help="stage-1 image model: the VDVAE, or the plain-VAE baseline (the paper's figure 7)")
    p.add_argument("--latents", default="mean", choices=("mean", "sample"), help="VDVAE posterior mean or sample as targets")
    p.add_argument("--captions", default=None, help="captions file (JSON frame -> text) to use and complete")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, cross-validation and decoding")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def _train_config(args, sessions, out):
    from spikevaediff.core.config import ModelProfile
    from spikevaediff.training.fit import TrainConfig

    split_params = ({"n_test_repeats": args.test_repeats} if args.split == "repeats"
                    else {"test_fraction": args.test_fraction, "gap": args.gap})
    return TrainConfig(
        sessions=sessions, movie=args.movie, out=out, areas=args.areas,
        profile=ModelProfile(args.profile, args.weights), split=args.split, split_params=split_params,
        window=tuple(args.window) if args.window else None, average_repeats=not args.no_average,
        alphas=args.alphas, targets=tuple(args.targets), stage1=args.stage1, latent_mode=args.latents,
        captions=args.captions, seed=args.seed)


def _threads(n) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fit the ridges (spikes -> VDVAE latents, CLIP-Vision, CLIP-Text) and write a bundle",
        description=("Bin the movie's presentations of one or more sessions (several sessions are pooled into "
                     "one pseudo-population aligned by movie frame), split them, extract the targets of every "
                     "frame (cached), fit one ridge per target group and write a model bundle."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sessions", nargs="+", help="NWB session file(s)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    _session_args(p)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "evaluate", help="score a bundle on its test set: metrics, chance, shuffled control, gallery",
        description=("Decode every test presentation single-trial, score previews (PixCorr, SSIM, 2-way "
                     "identification, frame identification within 1 s) beside chance and a time-shuffled "
                     "control, refine a gallery of best/median/worst cases, and write metrics.json, report.md "
                     "and gallery.png. See docs/EVALUATION.md."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bundle", help="bundle directory written by `train`")
    p.add_argument("sessions", nargs="+", help="the NWB session file(s) the bundle was trained on")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--refine", type=int, default=6, help="gallery items refined with Versatile Diffusion (0: none)")
    p.add_argument("--refine-steps", type=int, default=5, help="denoising steps of the refiner (DPM-Solver++)")
    p.add_argument("--weights", default=None, help="weights folder (default: the one recorded in the bundle)")
    p.add_argument("--seed", type=int, default=0, help="seed of decoding and of the shuffled control")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.set_defaults(func=run_evaluate)

    p = subparsers.add_parser(
        "ablate", help="train and evaluate per visual area, all together, and at equal unit counts",
        description=("The paper's area ablation (figure 8): one bundle per area and one for all areas, also "
                     "with every area subsampled to the same number of units; with --stage1 vdvae vae, the "
                     "plain-VAE baseline beside the VDVAE (figure 7). Writes table.md, results.json and "
                     "ablation.png."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sessions", nargs="+", help="NWB session file(s)")
    p.add_argument("--out", required=True, help="output directory")
    # Ablations compare previews: only the stage-1 ridge by default.
    _session_args(p, targets=("vdvae",), several_stage1=True)
    p.set_defaults(func=run_ablate)
    p.add_argument("--no-equal-units", action="store_true", help="skip the equal-units conditions")

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


def run_train(args) -> int:
    from spikevaediff.training.fit import train

    _threads(args.threads)
    out = train(_train_config(args, args.sessions, args.out))
    print(f"wrote bundle {out}")
    return 0


def run_evaluate(args) -> int:
    from spikevaediff.training.evaluate import evaluate
    from spikevaediff.training.report import METRIC_ROWS

    _threads(args.threads)
    report = evaluate(args.bundle, args.sessions, args.out, n_refine=args.refine, seed=args.seed,
                      weights_dir=args.weights, refine_steps=args.refine_steps)
    print(f"split {report['split']['name']}: {report['n_test']} test presentations, {report['n_units']} units")
    print(f"{'metric':40s} {'model':>8s} {'shuffled':>9s} {'chance':>8s}")
    for label, key, sub in METRIC_ROWS:
        if key not in report["model"]:
            continue
        pick = (lambda d: d[key][sub]) if sub else (lambda d: d[key])
        chance = report["chance"].get(key)
        print(f"{label:40s} {pick(report['model']):8.3f} {pick(report['shuffled']):9.3f} "
              f"{'' if chance is None else f'{chance:8.3f}'}")
    print(f"wrote {args.out}/metrics.json, report.md, gallery.png")
    return 0


def run_ablate(args) -> int:
    from pathlib import Path

    from spikevaediff.training.ablate import AREAS, ablate

    _threads(args.threads)
    stage1s = args.stage1
    args.stage1 = stage1s[0]
    base = _train_config(args, args.sessions, Path(args.out) / "bundles")
    rows = ablate(base, args.out, areas=args.areas or AREAS, stage1s=tuple(stage1s),
                  equal_units=not args.no_equal_units, seed=args.seed)
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/table.md, results.json, ablation.png ({len(rows)} conditions)")
    return 0


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
