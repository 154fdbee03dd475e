#!/usr/bin/env python3
"""GPU check: the refiner at 512x512 through every UNet backend this host can run, as one table.

    python deploy/gpu_check.py [--weights DIR] [--json OUT.json]      (or deploy/gpu_check.sh)

Runs the tiny profile (random-weight models written to a temporary folder), the paper profile
when the published weights are present (--weights DIR or $SPIKEVAEDIFF_WEIGHTS), and
`paper-shapes`: the published architectures with random weights, built on the device, which
time exactly what the paper profile costs where its weights are absent (its images are noise).
Each goes through torch eager, ONNX Runtime (CUDA provider on a GPU), a TensorRT engine,
torch.compile and torch.compile with CUDA graphs ("reduce-overhead"). Per backend: ms per UNet
step (one guided batch of 2), ms per image at 5 steps (DPM-Solver++) and at 37 steps (the
paper's DDIM 50 x 0.75), and the max abs difference from torch eager (UNet output, and the
5-step image in 0..1). A decoder line times the preview path at the published sizes: the ridge
projection of 500 units to the 91,168 VDVAE latents plus the imagenet64 VDVAE decode.

Installs nothing: a backend whose package does not import, or a profile without weights, is a row
that says why. A time budget (default 7 min) skips what would not finish; exported files and
engines go to a temporary cache unless --cache DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "replay", "services", "training")
BACKENDS = ("torch", "onnx", "tensorrt", "torch.compile", "torch.cudagraphs")
PROFILES = ("tiny", "paper", "paper-shapes")
# Rough seconds each backend needs before its first step (export, engine build, compilation).
_PAPER_SETUP = {"torch": 10, "onnx": 150, "tensorrt": 330, "torch.compile": 150, "torch.cudagraphs": 150}
SETUP_S = {"tiny": {"torch": 5, "onnx": 30, "tensorrt": 90, "torch.compile": 60, "torch.cudagraphs": 60},
           "paper": _PAPER_SETUP, "paper-shapes": _PAPER_SETUP}


def import_project():
    """Import spikevaediff: installed, or straight from this checkout via a symlinked namespace."""
    try:
        import spikevaediff.core.refiner  # noqa: F401
        return
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("spikevaediff"):
            raise
    shim = Path(tempfile.mkdtemp(prefix="spikevaediff-shim-")) / "spikevaediff"
    shim.mkdir()
    for name in PACKAGES:
        (shim / name).symlink_to(REPO / name, target_is_directory=True)
    sys.path.insert(0, str(shim.parent))


def environment(device: str) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    for module in ("diffusers", "onnxruntime", "tensorrt"):
        try:
            info[module] = __import__(module).__version__
        except ImportError as exc:
            info[module] = f"absent ({exc.__class__.__name__})"
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return info


def tiny_profile(weights: Path | None):
    """The tiny profile; its models are written to a temporary folder when not found."""
    from spikevaediff.core.config import ModelProfile
    from spikevaediff.core.tiny import write_tiny_clip
    from spikevaediff.core.tiny_vd import write_tiny_versatile_diffusion

    profile = ModelProfile("tiny", weights_dir=weights / "tiny" if weights else None)
    if not dict((s.key, ok) for s, _, ok in profile.status())["versatile_diffusion"]:
        profile = ModelProfile("tiny", weights_dir=Path(tempfile.mkdtemp(prefix="spikevaediff-tiny-")))
        clip = write_tiny_clip(profile.path("clip"))
        write_tiny_versatile_diffusion(profile.path("versatile_diffusion"), clip)
    return profile


def paper_profile(weights: Path | None):
    from spikevaediff.core.config import ModelProfile

    def has_vd(profile) -> bool:
        return dict((s.key, ok) for s, _, ok in profile.status())["versatile_diffusion"]

    profile = ModelProfile("paper", weights_dir=weights / "paper" if weights else None)
    if weights and not has_vd(profile):  # also accept DIR itself as the paper folder
        profile = ModelProfile("paper", weights_dir=weights)
    return profile if has_vd(profile) else None


def onnx_providers(device: str) -> list[str]:
    """CUDA EP on a GPU (the TensorRT EP would build its own engine for minutes), CPU EP on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        return []
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else []


def median_ms(fn, repeats: int, sync) -> float:
    from spikevaediff.services.bench_models import median_ms as median_and_max_ms

    return median_and_max_ms(fn, repeats, sync)[0]


def measure(refiner, inputs, reference, sync, repeats: int) -> dict:
    """One backend: step time and diff, then images at 5 and 37 steps."""
    import numpy as np

    from spikevaediff.services.bench_models import schedule_for

    latents, t, context, preview, vision, text = inputs
    start = time.perf_counter()
    noise = refiner.backend(latents, t, context)  # first call: export / build / compile
    sync()
    row = {"first_call_s": time.perf_counter() - start, "backend": refiner.backend.describe()}
    row["step_ms"] = median_ms(lambda: refiner.backend(latents, t, context), 3 * repeats, sync)
    images = {}
    for kept, scheduler in ((5, "dpmsolver++"), (37, "ddim")):
        refiner.configure(scheduler=scheduler, steps=schedule_for(kept, 0.75), strength=0.75)
        images[kept] = refiner.refine(preview, vision, text, seed=0, output_type="float")
        row[f"image_{kept}_ms"] = median_ms(lambda: refiner.refine(preview, vision, text, seed=0),
                                            max(1, repeats // 2), sync)
    if reference is None:
        reference = {"noise": noise.float(), "image": images[5]}
    row["step_diff"] = float((noise.float() - reference["noise"]).abs().max())
    row["image_diff"] = float(np.abs(images[5] - reference["image"]).max())
    return row, reference


def model_dtype(args):
    import torch

    return torch.float16 if args.device.startswith("cuda") and args.dtype == "float16" else torch.float32


def device_sync(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def components_loader(name: str, profile):
    """(device, dtype) -> VDComponents for profile `name`."""
    if name == "paper-shapes":
        from spikevaediff.core.vd_shapes import paper_shaped_components

        return lambda device, dtype: paper_shaped_components(device, dtype)
    from spikevaediff.core.vd_loader import load_versatile_diffusion

    return lambda device, dtype: load_versatile_diffusion(profile.path("versatile_diffusion"), device, dtype)


def run_profile(profile_name: str, load_components, args, deadline: float, cache: Path) -> list[dict]:
    import numpy as np
    import torch

    from spikevaediff.core.config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS
    from spikevaediff.core.refiner import Refiner

    device = args.device
    sync = device_sync(device)
    dtype = model_dtype(args)
    components = load_components(device, dtype)
    rng = np.random.default_rng(0)
    dim, side = components.embed_dim, args.image_size // 8
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, side, side, generator=generator).to(device, dtype),
              torch.tensor(500, device=device),  # on the device, as the refiner's own timesteps
              torch.randn(2, CLIP_TEXT_TOKENS + CLIP_IMAGE_TOKENS, dim, generator=generator).to(device, dtype),
              rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
              rng.standard_normal((CLIP_IMAGE_TOKENS, dim)).astype(np.float32),
              rng.standard_normal((CLIP_TEXT_TOKENS, dim)).astype(np.float32))
    options = {"torch": ("torch", {}), "torch.compile": ("torch", {"compile": True}),
               "torch.cudagraphs": ("torch", {"compile": "reduce-overhead"}),
               "onnx": ("onnx", {"cache_dir": cache, "providers": onnx_providers(device),
                                 "device_id": torch.device(device).index or 0}),
               "tensorrt": ("tensorrt", {"cache_dir": cache, "device": device})}
    rows, reference = [], None
    for name in args.backends:
        row = {"profile": profile_name, "name": name}
        left = deadline - time.monotonic()
        if name.startswith("torch.c") and not device.startswith("cuda") and not args.compile_on_cpu:
            row["skipped"] = "torch.compile on the CPU is off (needs a C++ toolchain; --compile-on-cpu)"
        elif name == "onnx" and not onnx_providers(device):
            row["skipped"] = "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)"
        elif left < SETUP_S[profile_name][name]:
            row["skipped"] = f"time budget: {left:.0f} s left, needs ~{SETUP_S[profile_name][name]} s"
        else:
            try:
                backend, extra = options[name]
                refiner = Refiner.from_components(components, backend=backend, backend_options=extra,
                                                  device=device, image_size=args.image_size)
                measured, reference = measure(refiner, inputs, reference, sync, args.repeats)
                row.update(measured)
            except Exception as exc:  # one failing backend must not hide the others
                row["skipped"] = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
                if args.verbose:
                    traceback.print_exc()
        print(format_row(row), flush=True)
        rows.append(row)
    del components
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows

def time_decoder(args, units: int = 500, repeats: int = 50) -> dict:
    """The decoder's per-bin work at the published sizes, random weights, fp32 as the service runs it.

    preview = counts (host) -> device, projection to the 91,168 VDVAE latents, imagenet64 VDVAE
    decode at k=31, image back to the host, eagerly and as the decoder service runs it
    (`PreviewDecoder`: one CUDA graph); clip = the two CLIP projections a refine bin adds.
    """
    import numpy as np
    import torch

    from spikevaediff.core.config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS
    from spikevaediff.core.preview import PreviewDecoder
    from spikevaediff.core.ridge import RidgeRegression
    from spikevaediff.core.vdvae import VDVAE

    device, sync = args.device, device_sync(args.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vdvae = VDVAE("imagenet64").to(device).eval()
    width = vdvae.latent_dim()
    # Ridges of the published widths fitted (on the device) to random targets: the decoder's
    # own projection path, RidgeRegression.project, at its real size.
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, (600, units)).astype(np.float32)
    ridges = {name: RidgeRegression(alpha=5e4, device=device).fit(
                  x, rng.standard_normal((600, q), dtype=np.float32))
              for name, q in (("vdvae", width), ("clip_vision", CLIP_IMAGE_TOKENS * 768),
                              ("clip_text", CLIP_TEXT_TOKENS * 768))}
    counts = rng.poisson(2.0, units).astype(np.float32)

    def project(name):
        return ridges[name].project(counts)

    def eager():  # what decode_latents does: every block launched from Python
        return vdvae.decode_latents(project("vdvae")[None], seed=0)[0]

    decoder = PreviewDecoder(vdvae, seed=0)  # the decoder service's path (one CUDA graph on a GPU)

    def preview():
        return decoder(project("vdvae"))

    def clip():
        return [project(name).cpu() for name in ("clip_vision", "clip_text")]

    row = {"units": units, "vdvae_latents": width, "device": device, "preview": decoder.describe(),
           "vdvae_parameters": sum(p.numel() for p in vdvae.parameters())}
    row["projection_ms"] = median_ms(lambda: project("vdvae"), repeats, sync)
    row["preview_eager_ms"] = median_ms(eager, repeats, sync)
    row["preview_ms"] = median_ms(preview, repeats, sync)
    row["preview_ratio"] = row["preview_ms"] / row["preview_eager_ms"]
    row["same_image"] = bool(np.array_equal(eager(), preview()))
    row["clip_projection_ms"] = median_ms(clip, repeats, sync)
    return row


def format_decoder(row: dict) -> str:
    return (f"decoder at published sizes ({row['units']} units -> {row['vdvae_latents']:,} VDVAE latents, "
            f"imagenet64 VDVAE {row['vdvae_parameters'] / 1e6:.0f}M parameters, fp32): "
            f"projection {row['projection_ms']:.2f} ms; preview (projection + decode) eager "
            f"{row['preview_eager_ms']:.2f} ms, {row['preview']} {row['preview_ms']:.2f} ms "
            f"(ratio {row['preview_ratio']:.2f}, same image: {row['same_image']}); "
            f"CLIP projections of a refine bin {row['clip_projection_ms']:.2f} ms")


HEADER = (f"{'profile':<12} {'backend':<32} {'ms/step':>9} {'ms/img 5':>9} {'ms/img 37':>10} "
          f"{'step diff':>10} {'img diff':>9} {'setup s':>8}")


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"{row['profile']:<12} {row['name']:<32} skipped: {row['skipped']}"
    return (f"{row['profile']:<12} {row['backend']:<32} {row['step_ms']:9.2f} {row['image_5_ms']:9.1f} "
            f"{row['image_37_ms']:10.1f} {row['step_diff']:10.2e} {row['image_diff']:9.2e} {row['first_call_s']:8.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=os.environ.get("SPIKEVAEDIFF_WEIGHTS") or None,
                        help="weights root (with tiny/ and paper/, or the paper folder itself)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="model precision on CUDA (the CPU always runs float32)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--profiles", nargs="+", choices=PROFILES, default=list(PROFILES),
                        help="paper-shapes: the published architectures with random weights (timing only)")
    parser.add_argument("--no-decoder", action="store_true", help="skip the decoder line")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (x3 for single steps)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new work after this")
    parser.add_argument("--cache", type=Path, default=None, help="where exported UNets and engines go")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--compile-on-cpu", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failing backends")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s

    try:
        import_project()
        import torch
    except ImportError as exc:
        print(f"gpu_check: error: cannot import {exc.name} (this check installs nothing)", file=sys.stderr)
        return 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(args.device)
    print(json.dumps(env), flush=True)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="spikevaediff-engines-"))
    decoder = None
    if not args.no_decoder:
        try:
            decoder = time_decoder(args, repeats=10 * args.repeats)
            print(format_decoder(decoder), flush=True)
        except Exception as exc:  # the refiner table must still come
            decoder = {"skipped": f"{exc.__class__.__name__}: {exc}"}
            print(f"decoder: skipped: {decoder['skipped']}", flush=True)
    print(HEADER, flush=True)
    rows = []
    for name in args.profiles:
        if name == "paper-shapes":
            profile = "random weights"
        else:
            profile = tiny_profile(args.weights) if name == "tiny" else paper_profile(args.weights)
        if profile is None:
            row = {"profile": name, "name": "-", "skipped": "no published Versatile Diffusion weights found "
                   "(--weights DIR or $SPIKEVAEDIFF_WEIGHTS)"}
            print(format_row(row), flush=True)
            rows.append(row)
            continue
        rows += run_profile(name, components_loader(name, profile), args, deadline, cache)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "decoder": decoder,
                                         "rows": rows}, indent=2))
    return 0 if any("skipped" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
