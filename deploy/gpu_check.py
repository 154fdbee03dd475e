#!/usr/bin/env python3
"""GPU check: the refiner at 512x512 through every UNet backend this host can run, as one table.

    python deploy/gpu_check.py [--weights DIR] [--json OUT.json]      (or deploy/gpu_check.sh)

Runs the tiny profile (random-weight models written to a temporary folder) and, when the
published weights are present (--weights DIR or $SPIKEVAEDIFF_WEIGHTS, or the local Hugging Face
cache), the paper profile, each through torch eager, ONNX Runtime (best provider: TensorRT EP >
CUDA EP > CPU), a TensorRT engine and torch.compile. Per backend: ms per UNet step (one guided
batch of 2), ms per image at 5 steps (DPM-Solver++) and at 37 steps (the paper's DDIM 50 x 0.75),
and the max abs difference from torch eager (UNet output, and the 5-step image in 0..1).

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
BACKENDS = ("torch", "onnx", "tensorrt", "torch.compile")
# Rough seconds each backend needs before its first step (export, engine build, compilation).
SETUP_S = {"tiny": {"torch": 5, "onnx": 30, "tensorrt": 90, "torch.compile": 90},
           "paper": {"torch": 10, "onnx": 150, "tensorrt": 330, "torch.compile": 180}}


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
    import numpy as np

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


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


def run_profile(profile, args, deadline: float, cache: Path) -> list[dict]:
    import numpy as np
    import torch

    from spikevaediff.core.config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS
    from spikevaediff.core.refiner import Refiner
    from spikevaediff.core.vd_loader import load_versatile_diffusion

    device = args.device
    dtype = torch.float16 if device.startswith("cuda") and args.dtype == "float16" else torch.float32
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    components = load_versatile_diffusion(profile.path("versatile_diffusion"), device=device, dtype=dtype)
    rng = np.random.default_rng(0)
    dim, side = components.embed_dim, args.image_size // 8
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, side, side, generator=generator).to(device, dtype), torch.tensor(500),
              torch.randn(2, CLIP_TEXT_TOKENS + CLIP_IMAGE_TOKENS, dim, generator=generator).to(device, dtype),
              rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
              rng.standard_normal((CLIP_IMAGE_TOKENS, dim)).astype(np.float32),
              rng.standard_normal((CLIP_TEXT_TOKENS, dim)).astype(np.float32))
    options = {"torch": ("torch", {}), "torch.compile": ("torch", {"compile": True}),
               "onnx": ("onnx", {"cache_dir": cache, "providers": onnx_providers(device),
                                 "device_id": torch.device(device).index or 0}),
               "tensorrt": ("tensorrt", {"cache_dir": cache, "device": device})}
    rows, reference = [], None
    for name in args.backends:
        row = {"profile": profile.name, "name": name}
        left = deadline - time.monotonic()
        if name == "torch.compile" and not device.startswith("cuda") and not args.compile_on_cpu:
            row["skipped"] = "torch.compile on the CPU is off (needs a C++ toolchain; --compile-on-cpu)"
        elif name == "onnx" and not onnx_providers(device):
            row["skipped"] = "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)"
        elif left < SETUP_S[profile.name][name]:
            row["skipped"] = f"time budget: {left:.0f} s left, needs ~{SETUP_S[profile.name][name]} s"
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


HEADER = (f"{'profile':<7} {'backend':<30} {'ms/step':>9} {'ms/img 5':>9} {'ms/img 37':>10} "
          f"{'step diff':>10} {'img diff':>9} {'setup s':>8}")


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"{row['profile']:<7} {row['name']:<30} skipped: {row['skipped']}"
    return (f"{row['profile']:<7} {row['backend']:<30} {row['step_ms']:9.2f} {row['image_5_ms']:9.1f} "
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
    parser.add_argument("--profiles", nargs="+", choices=("tiny", "paper"), default=["tiny", "paper"])
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
    print(json.dumps(environment(args.device)), flush=True)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="spikevaediff-engines-"))
    print(HEADER, flush=True)
    rows = []
    for name in args.profiles:
        profile = tiny_profile(args.weights) if name == "tiny" else paper_profile(args.weights)
        if profile is None:
            row = {"profile": name, "name": "-", "skipped": "no published Versatile Diffusion weights found "
                   "(--weights DIR or $SPIKEVAEDIFF_WEIGHTS)"}
            print(format_row(row), flush=True)
            rows.append(row)
            continue
        rows += run_profile(profile, args, deadline, cache)
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(args.device), "rows": rows}, indent=2))
    return 0 if any("skipped" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
