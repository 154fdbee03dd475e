"""`spikevaediff refine` (one image through Versatile Diffusion) and `spikevaediff bench-models`."""
from __future__ import annotations

import argparse
from pathlib import Path

from spikevaediff.core.config import PROFILE_NAMES

SCHEDULERS = ("ddim", "dpmsolver++", "unipc")  # as core.refiner.SCHEDULER_NAMES, without importing torch
BACKENDS = ("torch", "onnx", "tensorrt")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=PROFILE_NAMES, default="tiny",
                        help="tiny: small random-weight models, offline (written on first use); "
                             "paper: the published weights")
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="weights folder (default: $SPIKEVAEDIFF_WEIGHTS/<profile> or "
                             "~/.cache/spikevaediff/<profile>)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="engine that runs the UNet")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def register(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    refine = subparsers.add_parser(
        "refine", formatter_class=fmt,
        help="refine one 64x64 preview into a 512x512 image with Versatile Diffusion",
        description=(
            "Stage 2 on one image: the preview is resized (bicubic) to 512x512, encoded by the VAE, "
            "noised to --strength of the schedule and denoised with classifier-free guidance, vision "
            "and text embeddings mixed inside every cross-attention layer. Defaults are the paper's "
            "(DDIM, 50 steps x 0.75 = 37 denoising steps, guidance 7.5, vision 0.6 / text 0.4); "
            "--scheduler dpmsolver++ --steps 7 runs 5 steps. Embeddings are VD-normalised CLIP "
            "features: --vision V.npy [257,D] and --text T.npy [77,D] (D = 64 tiny, 768 paper), as "
            "the decoder predicts them. With --demo, missing inputs are made up: a synthetic preview, "
            "CLIP-Vision of the preview and CLIP-Text of --caption, from the model folder's own CLIP."))
    refine.add_argument("--preview", type=Path, metavar="IMG.png", help="the preview image (any size, RGB)")
    refine.add_argument("--vision", type=Path, metavar="V.npy", help="CLIP-Vision embedding [257,D]")
    refine.add_argument("--text", type=Path, metavar="T.npy", help="CLIP-Text embedding [77,D]")
    refine.add_argument("--out", type=Path, required=True, metavar="OUT.png", help="where to write the image")
    refine.add_argument("--demo", action="store_true", help="make up whichever inputs are not given")
    refine.add_argument("--caption", default="a photo of a dog running across a grassy field",
                        help="text for the CLIP-Text embedding in --demo mode")
    refine.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="sampler")
    refine.add_argument("--steps", type=int, default=50, help="schedule length (int(steps x strength) are run)")
    refine.add_argument("--strength", type=float, default=0.75,
                        help="how far the preview is noised: 1.0 ignores it, small values keep it")
    refine.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    refine.add_argument("--text-share", type=float, default=0.4, help="weight of text vs vision (0..1)")
    refine.add_argument("--seed", type=int, default=0, help="noise seed")
    _add_common(refine)
    refine.set_defaults(func=run_refine)

    bench = subparsers.add_parser(
        "bench-models", formatter_class=fmt,
        help="time the models: refiner per UNet step and per image, CLIP features, VDVAE decode",
        description=(
            "Median latency of each model on this machine, after a warm-up: refiner ms per UNet "
            "step (guidance batch of 2 at 512x512) and per image at 5 steps (DPM-Solver++) and 37 "
            "steps (DDIM 50 x 0.75, the paper), with their ratio; CLIP image features ms per image "
            "(batch 1 and 16); VDVAE decode ms per image (batch 1 and 16). Rows whose module or "
            "weights are missing are skipped with a note. Prints a table; --out writes JSON."))
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    bench.add_argument("--out", type=Path, default=None, metavar="FILE.json", help="also write the results")
    _add_common(bench)
    bench.set_defaults(func=run_bench_models)


def _setup(args):
    """The profile (tiny weights written if missing) after applying --threads."""
    import logging

    import torch

    from spikevaediff.core.config import ModelProfile
    from spikevaediff.core.errors import UserError

    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    profile = ModelProfile(name=args.profile, weights_dir=args.weights, device=args.device)
    if profile.name == "tiny":
        status = {spec.key: present for spec, _path, present in profile.status()}
        if not status["versatile_diffusion"]:
            from spikevaediff.core.tiny import write_tiny_clip
            from spikevaediff.core.tiny_vd import write_tiny_versatile_diffusion

            logging.getLogger(__name__).info("writing the tiny models to %s (first use)", profile.weights_dir)
            if not status["clip"]:
                write_tiny_clip(profile.path("clip"))
            write_tiny_versatile_diffusion(profile.path("versatile_diffusion"), profile.path("clip"))
    return profile


def _read_image(path: Path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from spikevaediff.core.errors import UserError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {path} ({exc.__class__.__name__})") from exc


def _read_array(path: Path, what: str):
    import numpy as np

    from spikevaediff.core.errors import UserError

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the {what} embedding {path} as a .npy array ({exc})") from exc


def demo_preview(size: int = 64):
    """A made-up preview: a soft bright disc on a horizontal gradient."""
    import numpy as np

    yy, xx = np.mgrid[:size, :size] / (size - 1)
    disc = np.exp(-((xx - 0.6) ** 2 + (yy - 0.45) ** 2) / 0.03)
    grey = 0.25 + 0.35 * xx + 0.4 * disc
    rgb = np.stack([grey, grey * 0.9, grey * 0.7], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def run_refine(args) -> int:
    from PIL import Image

    from spikevaediff.core.errors import UserError
    from spikevaediff.core.refiner import Refiner
    from spikevaediff.core.vd_embeddings import text_embeddings, vision_embeddings

    missing = [name for name in ("preview", "vision", "text") if getattr(args, name) is None]
    if missing and not args.demo:
        raise UserError(f"missing --{', --'.join(missing)} (or pass --demo to make them up)")
    profile = _setup(args)
    refiner = Refiner(profile, scheduler=args.scheduler, steps=args.steps, strength=args.strength,
                      guidance_scale=args.guidance, text_share=args.text_share, device=args.device,
                      backend=args.backend)
    preview = _read_image(args.preview) if args.preview else demo_preview()
    parts = refiner.components
    vision = (_read_array(args.vision, "vision") if args.vision else
              vision_embeddings(parts.image_feature_extractor, parts.image_encoder, preview)[0])
    text = (_read_array(args.text, "text") if args.text else
            text_embeddings(parts.tokenizer, parts.text_encoder, [args.caption])[0])
    image = refiner.refine(preview, vision, text, seed=args.seed)
    if image.ndim == 4:
        image = image[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(args.out)
    t = refiner.last_timings
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]}): {t['unet_calls']} steps "
          f"({refiner.unet_evaluations()} UNet evaluations) in {t['total_ms']:.0f} ms "
          f"[{refiner.settings.scheduler}, {refiner.backend.describe()}, {profile.name} profile]")
    return 0


def run_bench_models(args) -> int:
    import json

    from spikevaediff.core.errors import UserError

    from .bench_models import bench_models, format_table

    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    profile = _setup(args)
    result = bench_models(profile, device=args.device, repeats=args.repeats, backend=args.backend)
    print(format_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0
