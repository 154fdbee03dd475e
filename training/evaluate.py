"""The `evaluate` command: score a bundle on its split's test set, honestly.

Single-trial decoding of every test presentation; each metric beside its chance level and beside
the same model fed time-shuffled spikes. See docs/EVALUATION.md.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spikevaediff.core import metrics as M
from spikevaediff.core.config import ModelProfile
from spikevaediff.core.errors import UserError
from spikevaediff.training import dataset
from spikevaediff.training.fit import STAGE1_SIZE, load_stage1
from spikevaediff.training.population import load_population, movie_frames
from spikevaediff.training.targets import TargetCache, clip_vision_targets, file_fingerprint, vdvae_targets

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """Predictions for the test presentations under one condition (real or shuffled spikes)."""

    latents: np.ndarray
    previews: np.ndarray
    clip_vision: np.ndarray | None
    clip_text: np.ndarray | None


def bundle_population(bundle, sessions):
    """Bin the sessions exactly as the bundle was trained (areas, window, units in order)."""
    m = bundle.manifest
    wanted: dict[str, list[int]] = {}
    for sid, uid in m.units:
        wanted.setdefault(str(sid), []).append(int(uid))
    pop = load_population(sessions, m.movie, areas=m.areas, window=tuple(m.window),
                          n_subbins=m.n_subbins, unit_ids=wanted)
    bundle.check_units([tuple(k) for k in pop.unit_keys])
    return pop


def bundle_split(bundle, pop) -> dataset.Split:
    s = bundle.manifest.split
    return dataset.make_split(s["name"], pop.frames, pop.repeats, pop.valid, pop.n_frames,
                              seed=s["seed"], **s.get("params", {}))


def decode(bundle, stage1, x: np.ndarray, seed: int, batch_size: int = 128) -> Decoded:
    """Ridge predictions and stage-1 previews for rows of counts x."""
    import torch

    ridges = bundle.ridges
    latents = ridges["vdvae"].predict(x).astype(np.float32)
    previews = []
    for s in range(0, len(latents), batch_size):
        with torch.inference_mode():
            previews.append(stage1.decode_latents(torch.from_numpy(latents[s:s + batch_size]), seed=seed + s))
    vision = ridges["clip_vision"].predict(x).astype(np.float32) if "clip_vision" in ridges else None
    text = ridges["clip_text"].predict(x).astype(np.float32) if "clip_text" in ridges else None
    return Decoded(latents, np.concatenate(previews), vision, text)


def score(decoded: Decoded, truth64: np.ndarray, frames_test: np.ndarray, true_latents: np.ndarray,
          true_vision: np.ndarray | None, candidates: np.ndarray) -> dict:
    """Every metric for one condition."""
    pix = M.pixcorr(decoded.previews, truth64)
    ss = M.ssim(decoded.previews, truth64)
    out = {
        "pixcorr": M.summarize(pix), "ssim": M.summarize(ss),
        "two_way_vdvae": M.two_way_identification(decoded.latents, true_latents[frames_test], groups=frames_test),
    }
    if decoded.clip_vision is not None and true_vision is not None:
        out["two_way_clip"] = M.two_way_identification(decoded.clip_vision, true_vision[frames_test],
                                                       groups=frames_test)
    acc, chance, _ = M.frame_identification(decoded.latents, frames_test, true_latents[candidates],
                                            candidates, tolerance=30)
    out["frame_id_1s"] = acc
    out["frame_id_1s_chance"] = chance
    out["_pixcorr_items"] = pix
    return out


def evaluate(bundle_dir: Path, sessions: list, out: Path, n_refine: int = 6, seed: int = 0,
             weights_dir: Path | None = None, refine_steps: int = 5) -> dict:
    """Evaluate a bundle; writes metrics.json, report.md and gallery.png into `out`."""
    from spikevaediff.core.bundle import load_bundle

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if "vdvae" not in bundle.ridges:
        raise UserError("the bundle has no stage-1 (vdvae) ridge to evaluate")
    profile = ModelProfile(m.profile, weights_dir or m.weights_dir)
    pop = bundle_population(bundle, sessions)
    split = bundle_split(bundle, pop)
    test_idx = np.flatnonzero(split.test)
    frames_test = pop.frames[test_idx]
    x_test = pop.counts[test_idx]

    frames = movie_frames(sessions, m.movie)
    truth64_all = dataset.square_frames(frames, STAGE1_SIZE)
    stage1, stage1_path = load_stage1(profile, m.models["stage1"]["arch"])
    cache = TargetCache(Path(bundle_dir).parent / "targets-cache")
    fp = file_fingerprint(stage1_path)
    if fp != m.models["stage1"]["fingerprint"]:
        log.warning("the stage-1 checkpoint at %s differs from the one the bundle was trained with", stage1_path)
    true_latents = vdvae_targets(stage1, truth64_all, fp, cache, m.models["stage1"]["latent_mode"])
    true_vision = None
    if "clip_vision" in bundle.ridges:
        from spikevaediff.core.clip import ClipEncoder
        true_vision = clip_vision_targets(ClipEncoder(profile), dataset.square_frames(frames, 224),
                                          file_fingerprint(profile.path("clip")), cache)
    candidates = np.arange(pop.n_frames) if split.name == "repeats" else np.unique(frames_test)

    shuffle = np.random.default_rng(seed + 1).permutation(len(x_test))
    results, decoded = {}, {}
    for condition, x in (("model", x_test), ("shuffled", x_test[shuffle])):
        decoded[condition] = decode(bundle, stage1, x, seed)
        results[condition] = score(decoded[condition], truth64_all[frames_test], frames_test, true_latents,
                                   true_vision, candidates)
    pix_items = results["model"].pop("_pixcorr_items")
    results["shuffled"].pop("_pixcorr_items")
    chance = {"pixcorr": 0.0, "two_way_vdvae": 0.5, "two_way_clip": 0.5,
              "frame_id_1s": results["model"]["frame_id_1s_chance"]}

    picks = gallery_picks(pix_items, n_refine)
    refined = refine_picks(profile, decoded["model"], picks, seed, refine_steps) if n_refine else None
    report = {
        "bundle": str(bundle_dir), "sessions": [str(s) for s in sessions], "movie": m.movie,
        "areas": m.areas, "n_units": pop.n_units, "split": split.describe(), "n_test": int(len(test_idx)),
        "profile": m.profile, "chance": chance, **results,
        "feature_metrics": feature_metric_note(),
        "refined": None if refined is None else {"n": len(picks), "steps": refine_steps},
    }
    from spikevaediff.training.report import write_gallery, write_markdown
    write_gallery(out / "gallery.png", truth64_all[frames_test[picks]], decoded["model"].previews[picks],
                  refined, [f"frame {f}, PixCorr {pix_items[i]:.2f}" for i, f in zip(picks, frames_test[picks])])
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    write_markdown(out / "report.md", report)
    return report


def gallery_picks(pixcorr_items: np.ndarray, n: int) -> np.ndarray:
    """Indices of the best, median and worst test items by preview PixCorr (n items in all)."""
    order = np.argsort(pixcorr_items)[::-1]
    n = max(3, min(n, len(order)))
    k = n // 3
    mid = len(order) // 2
    picks = list(order[:k]) + list(order[mid - k // 2: mid - k // 2 + (n - 2 * k)]) + list(order[-k:])
    return np.array(picks)


def refine_picks(profile, decoded: Decoded, picks: np.ndarray, seed: int, steps: int):
    """Refined images for the gallery items (None when the bundle has no CLIP ridges)."""
    if decoded.clip_vision is None or decoded.clip_text is None:
        return None
    import torch
    from tqdm import tqdm

    from spikevaediff.core.refiner import Refiner
    from spikevaediff.training.fit import ensure_offline_models
    ensure_offline_models(profile, ("versatile_diffusion",))
    # A reduced-step schedule: DPM-Solver++ with `steps` denoising steps at strength 0.75.
    refiner = Refiner(profile, scheduler="dpmsolver++", steps=math.ceil(steps / 0.75), strength=0.75)
    vis_shape = (-1, profile.embed_dim)
    out = []
    for i in tqdm(picks, desc="refining gallery", unit="image"):
        out.append(refiner.refine(decoded.previews[i],
                                  torch.from_numpy(decoded.clip_vision[i]).reshape(vis_shape),
                                  torch.from_numpy(decoded.clip_text[i]).reshape(vis_shape), seed=seed))
    return np.stack(out)


def feature_metric_note() -> str:
    return ("AlexNet(2)/(5), Inception, EffNet-B and SwAV identification need their published weights "
            "locally; none are present, so they are skipped.")


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value))
