"""`bench-models`: how long each model of the chain takes on this machine, per call.

Rows (median of `repeats` after one warm-up):
- refiner: ms per UNet step (one classifier-free-guidance batch of 2 at 512x512 -> 64x64
  latents), and ms per image at 5 steps (DPM-Solver++) and at 37 steps (the paper's DDIM
  50 x 0.75), with their ratio (5-step time over 37-step time: below 1 is faster);
- CLIP image features: ms per image at batch 1 and 16;
- VDVAE decode: ms per image at batch 1 and 16.

Each row comes from its own module, imported lazily; a row whose module or weights are
missing is skipped with a note instead of failing the whole benchmark.
"""
from __future__ import annotations

import math
import platform
import time

import numpy as np

from spikevaediff.core.errors import UserError


def median_ms(fn, repeats: int, sync=None) -> tuple[float, float]:
    """(median, max) wall time of `fn()` in ms over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), float(np.max(times))


def schedule_for(kept_steps: int, strength: float) -> int:
    """The schedule length whose img2img part runs exactly `kept_steps` steps at `strength`."""
    steps = max(1, math.ceil(kept_steps / strength))
    while int(steps * strength) < kept_steps:
        steps += 1
    return steps


def bench_refiner(profile, device: str, repeats: int, backend: str = "torch") -> dict:
    import torch

    from spikevaediff.core.config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS
    from spikevaediff.core.refiner import Refiner

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    refiner = Refiner(profile, device=device, backend=backend)
    dim = refiner.embed_dim
    rng = np.random.default_rng(0)
    vision = rng.standard_normal((CLIP_IMAGE_TOKENS, dim)).astype(np.float32)
    text = rng.standard_normal((CLIP_TEXT_TOKENS, dim)).astype(np.float32)
    preview = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)

    size = refiner.settings.image_size // 8
    latents = torch.randn(2, 4, size, size, device=device, dtype=refiner.dtype)
    context = torch.randn(2, CLIP_TEXT_TOKENS + CLIP_IMAGE_TOKENS, dim, device=device, dtype=refiner.dtype)
    step_ms, step_max = median_ms(lambda: refiner.backend(latents, torch.tensor(500, device=device), context),
                                   repeats * 3, sync)
    row = {"backend": refiner.backend.describe(), "unet_step_ms_cfg_batch2": step_ms,
           "unet_step_ms_max": step_max, "image_size": refiner.settings.image_size}
    strength = refiner.settings.strength
    for kept, scheduler in ((5, "dpmsolver++"), (37, "ddim")):
        steps = schedule_for(kept, strength)
        refiner.configure(scheduler=scheduler, steps=steps)
        ms, _ = median_ms(lambda: refiner.refine(preview, vision, text, seed=0), repeats, sync)
        row[f"image_ms_{kept}_steps"] = ms
        row[f"schedule_{kept}_steps"] = f"{scheduler} {steps} x {strength}"
        row[f"unet_evaluations_{kept}_steps"] = refiner.unet_evaluations()
    row["ratio_image_time_5_over_37_steps"] = row["image_ms_5_steps"] / row["image_ms_37_steps"]
    return row


def bench_clip(profile, device: str, repeats: int) -> dict:
    from spikevaediff.core.clip import ClipEncoder

    encoder = ClipEncoder(profile, device=device)
    row = {}
    for batch in (1, 16):
        images = np.random.default_rng(batch).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
        ms, _ = median_ms(lambda: encoder.image_embeds(images, progress=False), repeats)
        row[f"image_features_ms_per_image_b{batch}"] = ms / batch
    return row


def bench_vdvae_decode(profile, device: str, repeats: int) -> dict:
    from spikevaediff.core import vdvae

    try:
        model = vdvae.load_vdvae(profile)
        note = ""
    except UserError:
        if profile.name != "tiny":
            raise
        # Timing does not depend on the weights: an untrained tiny VDVAE decodes as fast.
        model = vdvae.VDVAE("tiny").to(device).eval().requires_grad_(False)
        note = "untrained tiny VDVAE (no trained checkpoint; timing only)"
    row = vdvae.bench_vdvae(model.to(device), batch_sizes=(1, 16), repeats=repeats)
    if note:
        row["note"] = note
    return row


def bench_models(profile, device: str = "cpu", repeats: int = 5, backend: str = "torch") -> dict:
    """Every row that can run here; skipped rows carry a `skipped` note. JSON-ready."""
    import torch

    result = {"profile": profile.name, "device": device, "torch_threads": torch.get_num_threads(),
              "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
              "torch": torch.__version__, "repeats": repeats}
    rows = (("refiner", lambda: bench_refiner(profile, device, repeats, backend)),
            ("clip", lambda: bench_clip(profile, device, repeats)),
            ("vdvae", lambda: bench_vdvae_decode(profile, device, repeats)))
    for name, run in rows:
        try:
            result[name] = run()
        except ModuleNotFoundError as exc:
            result[name] = {"skipped": f"module {exc.name} is not available yet"}
        except UserError as exc:
            result[name] = {"skipped": str(exc)}
    return result


def format_table(result: dict) -> str:
    """The benchmark as a readable table (one metric per line)."""
    lines = [f"bench-models: profile {result['profile']}, device {result['device']}, "
             f"{result['torch_threads']} torch thread(s), median of {result['repeats']}"]
    for section in ("refiner", "clip", "vdvae"):
        row = result.get(section, {})
        if "skipped" in row:
            lines.append(f"  {section:<8} skipped: {row['skipped']}")
            continue
        for key, value in row.items():
            shown = f"{value:10.2f}" if isinstance(value, float) else f"{value!s:>10}"
            lines.append(f"  {section:<8} {key:<40} {shown}")
    return "\n".join(lines)
