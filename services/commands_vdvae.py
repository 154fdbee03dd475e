"""`spikevaediff train-vdvae`: train the tiny stage-1 model on a movie's own frames."""
from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-vdvae",
        help="train the tiny VDVAE (or the plain-VAE baseline) on movie frames",
        description=(
            "Train the tiny VDVAE of the published architecture (or, with --arch vae, the plain "
            "single-latent VAE baseline) on the frames of a movie, within a time budget. Writes "
            "DIR/<arch>.th + DIR/<arch>.json (weights and hyperparameters), DIR/metrics.json "
            "(PixCorr and SSIM of held-out reconstructions vs the mean frame) and "
            "DIR/reconstructions.png. The tail of the movie is held out from training."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frames", required=True, metavar="PATH",
                   help="an NWB session (with --movie), a folder of images, or a .npy of uint8 "
                        "frames [F,H,W]")
    p.add_argument("--movie", metavar="NAME", help="movie name inside the NWB session, e.g. natural_movie_one")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    p.add_argument("--arch", choices=("vdvae", "vae"), default="vdvae",
                   help="hierarchical VDVAE or the plain single-latent VAE baseline")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the cores not already busy, at least 1)")
    p.add_argument("--batch-size", type=int, default=16, help="images per update")
    p.add_argument("--kl-weight", type=float, default=1.0,
                   help="weight of the KL term (1: the ELBO, as openai/vdvae trains)")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of frames held out (the tail)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many updates")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_train_vdvae)


def idle_cores() -> int:
    """Cores this process may use minus the 1-minute load average, at least 1.

    torch's intra-op threads wait on each other: with 2 threads on 2 cores that other processes
    keep busy, a training step measured 4-8x slower than with 1 thread.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, cores - busy)


def run_train_vdvae(args) -> int:
    from pathlib import Path

    from spikevaediff.core.errors import UserError
    from spikevaediff.training.train_vdvae import TrainVDVAEConfig, load_frames, train_vdvae

    if args.minutes <= 0:
        raise UserError("--minutes must be positive")
    if not 0.0 < args.holdout < 0.9:
        raise UserError("--holdout must be between 0 and 0.9")
    threads = idle_cores() if args.threads is None else args.threads
    if args.batch_size < 1 or threads < 1:
        raise UserError("--batch-size and --threads must be at least 1")
    frames = load_frames(args.frames, args.movie)
    cfg = TrainVDVAEConfig(out=Path(args.out), arch=args.arch, minutes=args.minutes,
                           max_steps=args.max_steps, batch_size=args.batch_size,
                           holdout=args.holdout, threads=threads, seed=args.seed,
                           kl_weight=args.kl_weight, progress=not args.no_progress)
    m = train_vdvae(cfg, frames)
    rec, base = m["posterior_k"], m["mean_frame"]
    print(f"{args.arch}: {m['steps']} steps in {m['train_seconds']:.0f} s; held-out PixCorr "
          f"{rec['pixcorr']:.3f} (mean frame {base['pixcorr']:.3f}), SSIM {rec['ssim']:.3f} "
          f"(mean frame {base['ssim']:.3f}) -> {Path(args.out) / (args.arch + '.th')}")
    return 0
