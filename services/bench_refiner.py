"""Refiner benchmark: UNet engines side by side, and the reduced-step schedule against the paper's.

Measured in one run on the same inputs, as ratios (ours over baseline, in time: below 1 is faster):

- `onnx_over_torch_ratio`: median ms per UNet step (one classifier-free-guidance batch of 2)
  through ONNX Runtime over eager torch; the two are timed alternately, after a warm-up (the
  first ONNX call exports the UNet, timed apart as `onnx_export_s`), so machine noise hits both.
- the reduced schedule (DPM-Solver++, `steps` denoising steps) against the paper's (DDIM 50 x
  strength 0.75 = 37 steps) on the same preview, embeddings and seed: UNet evaluations, time per
  image, and how close the two images are (SSIM, grey, sigma 1.5; cosine similarity of their
  CLIP-Vision class embeddings from the model's own CLIP).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from spikevaediff.core.errors import UserError

from .bench_models import schedule_for

log = logging.getLogger(__name__)

PAPER = dict(scheduler="ddim", steps=50, strength=0.75)  # 37 denoising steps
REDUCED_SCHEDULER = "dpmsolver++"
CAPTION = "a photo of a dog running across a grassy field"


def timed_side_by_side(fns: dict, rounds: int, sync=None) -> dict[str, list[float]]:
    """ms per call of each function, called in turn `rounds` times after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(int(rounds)):
        for name, fn in fns.items():
            if sync:
                sync()
            start = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summary(times_ms: list[float]) -> dict:
    """Median and p99 (ms) of a list of timings."""
    return {"median_ms": float(np.median(times_ms)), "p99_ms": float(np.percentile(times_ms, 99))}


def bench_inputs(components):
    """(preview uint8 [64,64,3], vision [257,D], text [77,D]): a structured preview, CLIP of it and of a caption."""
    from spikevaediff.core.vd_embeddings import text_embeddings, vision_embeddings

    from .commands_refiner import demo_preview

    preview = demo_preview()
    vision = vision_embeddings(components.image_feature_extractor, components.image_encoder, preview)[0]
    text = text_embeddings(components.tokenizer, components.text_encoder, [CAPTION])[0]
    return preview, vision.float().cpu().numpy(), text.float().cpu().numpy()


def clip_cosine(components, a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two uint8 images' CLIP-Vision class embeddings (the model's own CLIP)."""
    from spikevaediff.core.vd_embeddings import vision_embeddings

    embeds = vision_embeddings(components.image_feature_extractor, components.image_encoder, np.stack([a, b]))
    first, second = embeds[:, 0].float()
    return float((first @ second) / (first.norm() * second.norm()))


def _step_comparison(refiners: dict, size: int, dim: int, repeats: int, device, sync) -> dict:
    """Per-step time of each backend on one guided batch, and each output's max diff from torch."""
    import torch

    from spikevaediff.core.config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS

    generator = torch.Generator().manual_seed(0)
    dtype = refiners["torch"].dtype
    latents = torch.randn(2, 4, size // 8, size // 8, generator=generator).to(device, dtype)
    context = torch.randn(2, CLIP_TEXT_TOKENS + CLIP_IMAGE_TOKENS, dim, generator=generator).to(device, dtype)
    t = torch.tensor(500)
    calls = {name: (lambda r=r: r.backend(latents, t, context)) for name, r in refiners.items()}
    times = timed_side_by_side(calls, rounds=3 * repeats, sync=sync)
    reference = calls["torch"]().float()
    out = {}
    for name in refiners:
        out[name] = dict(summary(times[name]), backend=refiners[name].backend.describe(),
                         max_abs_diff_vs_torch=float((calls[name]().float() - reference).abs().max()))
    return out


def bench_refiner_backends(profile, steps: int = 5, repeats: int = 5, device: str = "cpu", image_size: int = 512,
                           image_repeats: int = 2, seed: int = 0, onnx_options: dict | None = None) -> dict:
    """Refiner timings on this machine as a JSON-ready dict (keys with "ratio" are ours / baseline).

    `steps`: denoising steps of the reduced schedule; `repeats`: timed rounds (x3 for the single
    UNet step); `image_repeats`: timed images per schedule; `onnx_options` go to the onnx backend
    (e.g. `cache_dir`). The ONNX part is skipped with a note where that backend is unavailable.
    """
    import torch

    from spikevaediff.core.metrics import ssim
    from spikevaediff.core.refiner import Refiner
    from spikevaediff.core.unet_export import CONTEXT_LEN
    from spikevaediff.core.vd_loader import load_versatile_diffusion

    if int(steps) < 1 or int(repeats) < 1 or int(image_repeats) < 1:
        raise UserError("steps, repeats and image_repeats must be at least 1")
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    profile.require("versatile_diffusion")
    components = load_versatile_diffusion(profile.path("versatile_diffusion"), device=device)
    reduced = dict(scheduler=REDUCED_SCHEDULER, steps=schedule_for(int(steps), PAPER["strength"]),
                   strength=PAPER["strength"])
    common = dict(image_size=int(image_size), device=device, **reduced)
    refiners = {"torch": Refiner.from_components(components, backend="torch", **common)}
    result = {"profile": profile.name, "device": device, "image_size": int(image_size),
              "torch_threads": torch.get_num_threads(), "repeats": int(repeats), "seed": int(seed)}
    start = time.perf_counter()
    try:
        refiners["onnx"] = Refiner.from_components(components, backend="onnx",
                                                   backend_options=onnx_options or {}, **common)
        latent = torch.zeros(2, 4, image_size // 8, image_size // 8, device=device, dtype=refiners["onnx"].dtype)
        context = torch.zeros(2, CONTEXT_LEN, components.embed_dim, device=device, dtype=latent.dtype)
        refiners["onnx"].backend(latent, torch.tensor(1), context)  # export (or load) outside the timings
        result["onnx_export_s"] = time.perf_counter() - start
    except UserError as exc:
        refiners.pop("onnx", None)
        result["onnx_skipped"] = str(exc)

    steps_out = _step_comparison(refiners, int(image_size), components.embed_dim, int(repeats), device, sync)
    result["unet_step"] = steps_out
    if "onnx" in steps_out:
        result["onnx_over_torch_ratio"] = steps_out["onnx"]["median_ms"] / steps_out["torch"]["median_ms"]

    preview, vision, text = bench_inputs(components)
    runner = refiners.get("onnx", refiners["torch"])
    result["schedule_backend"] = runner.backend.describe()
    images, schedule = {}, {}

    def refine(name):
        images[name] = runner.refine(preview, vision, text, seed=seed)

    for name, settings in (("reduced", reduced), ("paper", PAPER)):
        runner.configure(**settings)
        times = timed_side_by_side({name: lambda name=name: refine(name)}, rounds=int(image_repeats), sync=sync)[name]
        schedule[name] = dict(summary(times), schedule=f"{settings['scheduler']} {settings['steps']} x "
                              f"{settings['strength']}", unet_evaluations=runner.unet_evaluations())
    result["schedule"] = schedule
    result["reduced_over_paper_time_ratio"] = schedule["reduced"]["median_ms"] / schedule["paper"]["median_ms"]
    result["reduced_over_paper_unet_evaluations_ratio"] = (schedule["reduced"]["unet_evaluations"]
                                                           / schedule["paper"]["unet_evaluations"])
    result["ssim_reduced_vs_paper"] = float(ssim(images["reduced"][None], images["paper"][None])[0])
    result["clip_cosine_reduced_vs_paper"] = clip_cosine(components, images["reduced"], images["paper"])
    if "onnx" in refiners:  # the same image through both engines (reduced schedule, same seed)
        runner.configure(**reduced)
        via_torch = refiners["torch"].refine(preview, vision, text, seed=seed)
        via_onnx = refiners["onnx"].refine(preview, vision, text, seed=seed)
        result["image_max_abs_diff_onnx_vs_torch"] = int(np.abs(via_onnx.astype(int) - via_torch.astype(int)).max())
    return result


def format_refiner_backends(result: dict) -> str:
    """The benchmark as a readable table."""
    lines = [f"refiner: profile {result['profile']}, {result['device']}, {result['image_size']}px, "
             f"{result['torch_threads']} torch thread(s)"]
    for row in result["unet_step"].values():
        lines.append(f"  UNet step  {row['backend']:<28} median {row['median_ms']:8.1f} ms  p99 "
                     f"{row['p99_ms']:8.1f} ms  max|diff| vs torch {row['max_abs_diff_vs_torch']:.2e}")
    if "onnx_skipped" in result:
        lines.append(f"  onnx skipped: {result['onnx_skipped']}")
    for name, row in result["schedule"].items():
        lines.append(f"  {name:<8} {row['schedule']:<20} {row['unet_evaluations']:3d} UNet evals  median "
                     f"{row['median_ms']:8.0f} ms per image  [{result['schedule_backend']}]")
    for key, value in result.items():
        if "ratio" in key or key.startswith(("ssim", "clip", "image_max")):
            lines.append(f"  {key:<45} {value:.3f}" if isinstance(value, float) else f"  {key:<45} {value}")
    return "\n".join(lines)
