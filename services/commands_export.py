"""`spikevaediff export-unet`: the refiner's UNet as an ONNX file or a TensorRT engine."""
from __future__ import annotations

import argparse
from pathlib import Path

from spikevaediff.core.config import PROFILE_NAMES

FORMATS = ("onnx", "tensorrt")
EXPORTERS = ("legacy", "dynamo")  # as core.unet_export.EXPORTERS, without importing torch


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-unet", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="export the refiner's UNet to ONNX, or build a TensorRT engine from it",
        description=(
            "Export Versatile Diffusion's image UNet as the refiner runs it: dual attention inside, "
            "the text share baked in, static shapes (latents [batch,4,S/8,S/8], context "
            "[batch,77+257,D]; batch 2 = one image with classifier-free guidance). --format onnx "
            "writes an ONNX file for `--backend onnx`; --format tensorrt also builds an fp16 TensorRT "
            "engine from it (NVIDIA GPU hosts with the tensorrt package; the .onnx stays beside it). "
            "The models come from a trained bundle's manifest (--bundle) or a profile (--profile)."))
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, default=None, metavar="BUNDLE",
                        help="a trained bundle: its profile and weights folder are used")
    source.add_argument("--profile", choices=PROFILE_NAMES, default=None,
                        help="tiny: small random-weight models, offline (default when no --bundle); "
                             "paper: the published weights")
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="weights folder (default: the bundle's, else $SPIKEVAEDIFF_WEIGHTS/<profile> "
                             "or ~/.cache/spikevaediff/<profile>)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="what to write")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="the ONNX file (.onnx) or TensorRT engine (.plan) to write")
    parser.add_argument("--image-size", type=int, default=512, help="refined image side (latents are 1/8)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one guided image)")
    parser.add_argument("--dynamic-batch", action="store_true", help="make the batch axis dynamic")
    parser.add_argument("--text-share", type=float, default=0.4,
                        help="weight of text vs vision baked into the graph (0..1)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="legacy",
                        help="torch's ONNX exporter: legacy (TorchScript, fast) or dynamo (torch.export)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (dynamo uses at least 18)")
    parser.add_argument("--device", default=None,
                        help="torch device to export on (default: cuda for tensorrt, else cpu)")
    parser.add_argument("--fp32", action="store_true", help="tensorrt: no fp16 kernels")
    parser.set_defaults(func=run_export_unet)


def _check_args(args) -> None:
    from spikevaediff.core.errors import UserError

    if args.image_size < 8 or args.image_size % 8:
        raise UserError(f"--image-size must be a positive multiple of 8, got {args.image_size}")
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    if not 0.0 <= args.text_share <= 1.0:
        raise UserError(f"--text-share must be in [0, 1], got {args.text_share}")
    if args.out.exists() and args.out.is_dir():
        raise UserError(f"--out {args.out} is a directory; give a file name")


def resolve_profile(args):
    """The ModelProfile from --bundle (its manifest's profile and weights folder) or --profile."""
    from spikevaediff.core.bundle import load_bundle
    from spikevaediff.core.config import ModelProfile

    if args.bundle is not None:
        manifest = load_bundle(args.bundle, verify_hashes=False).manifest
        weights = args.weights or (Path(manifest.weights_dir) if manifest.weights_dir else None)
        return ModelProfile(name=manifest.profile, weights_dir=weights)
    return ModelProfile(name=args.profile or "tiny", weights_dir=args.weights)


def _ensure_tiny(profile) -> None:
    """Write the tiny models on first use, as `refine` does (they are built offline)."""
    if profile.name != "tiny":
        return
    status = {spec.key: present for spec, _path, present in profile.status()}
    if not status["versatile_diffusion"]:
        from spikevaediff.core.tiny import write_tiny_clip
        from spikevaediff.core.tiny_vd import write_tiny_versatile_diffusion

        if not status["clip"]:
            write_tiny_clip(profile.path("clip"))
        write_tiny_versatile_diffusion(profile.path("versatile_diffusion"), profile.path("clip"))


def run_export_unet(args) -> int:
    import time

    _check_args(args)
    profile = resolve_profile(args)
    if args.format == "tensorrt":  # fail in one line before minutes of export
        from spikevaediff.core.unet_tensorrt import import_tensorrt, require_cuda

        import_tensorrt()
        require_cuda()
    device = args.device or ("cuda" if args.format == "tensorrt" else "cpu")

    from spikevaediff.core.unet_export import export_unet_onnx
    from spikevaediff.core.vd_compat import set_mix_ratio
    from spikevaediff.core.vd_loader import load_versatile_diffusion

    _ensure_tiny(profile)
    profile.require("versatile_diffusion")
    start = time.perf_counter()
    unet = load_versatile_diffusion(profile.path("versatile_diffusion"), device=device).image_unet
    set_mix_ratio(unet, args.text_share)
    latent = args.image_size // 8
    onnx_path = args.out if args.format == "onnx" else args.out.with_suffix(".onnx")
    export_unet_onnx(unet, onnx_path, latent, batch=args.batch, opset=args.opset,
                     dynamic_batch=args.dynamic_batch, exporter=args.exporter)
    written = [onnx_path] + [p for p in [onnx_path.with_name(onnx_path.name + ".data")] if p.exists()]
    if args.format == "tensorrt":
        from spikevaediff.core.unet_tensorrt import build_engine, sidecar_path

        del unet  # free the GPU for the builder
        build_engine(onnx_path, args.out, fp16=not args.fp32)
        written = [args.out, sidecar_path(args.out)] + written
    size_mb = sum(p.stat().st_size for p in written) / 2 ** 20
    batch = "dynamic" if args.dynamic_batch else args.batch
    print(f"wrote {', '.join(map(str, written))} ({size_mb:.1f} MB): {profile.name} UNet, batch {batch}, "
          f"latents {latent}x{latent}, text share {args.text_share:.2f}, in {time.perf_counter() - start:.1f} s")
    return 0
