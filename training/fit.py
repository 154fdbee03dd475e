"""The `train` command: from sessions to a model bundle.

bin spikes -> split -> targets per frame (cached) -> one ridge per target group -> bundle.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spikevaediff.core.config import ModelProfile
from spikevaediff.core.errors import UserError
from spikevaediff.training import dataset
from spikevaediff.training.population import Population, load_population, movie_frames, subsample_units
from spikevaediff.training.targets import (TargetCache, clip_text_targets, clip_vision_targets,
                                           file_fingerprint, vdvae_targets)

log = logging.getLogger(__name__)

# Brain-Diffuser's fixed alphas, used with `alphas="fixed"`.
FIXED_ALPHAS = {"vdvae": 50000.0, "clip_vision": 60000.0, "clip_text": 100000.0}
CV_ALPHA_GRID = tuple(float(a) for a in np.logspace(0, 6, 13))
STAGE1_SIZE = 64
CV_GAP_FRAMES = 30


@dataclass
class TrainConfig:
    sessions: list
    movie: str
    out: Path
    areas: list | None = None
    profile: ModelProfile = field(default_factory=ModelProfile)
    split: str = "repeats"
    split_params: dict = field(default_factory=dict)
    window: tuple | None = None
    n_subbins: int = 1
    units_per_area: int | None = None  # subsample every area to this many units (seeded), for ablations
    average_repeats: bool = True
    alphas: str = "cv"                # "cv" (k-fold over CV_ALPHA_GRID) or "fixed" (Brain-Diffuser)
    cv_folds: int = 5
    targets: tuple = ("vdvae", "clip_vision", "clip_text")
    stage1: str = "vdvae"             # "vdvae" or "vae" (the seed's figure-7 baseline)
    latent_mode: str = "mean"         # VDVAE posterior "mean" or "sample" (Brain-Diffuser)
    captions: Path | None = None      # user captions file (frame -> text); generated ones are cached there
    cache_dir: Path | None = None
    seed: int = 0


def training_matrix(pop: Population, split: dataset.Split, average: bool):
    """(frame ids, X) for training: per-frame means over training repeats, or every presentation."""
    if average:
        return dataset.average_by_frame(pop.counts, pop.frames, split.train)
    return pop.frames[split.train], pop.counts[split.train]


def load_stage1(profile: ModelProfile, stage1: str):
    """The stage-1 image model (VDVAE or the plain-VAE baseline) of a profile, and its path."""
    from spikevaediff.core.vdvae import load_autoencoder

    if stage1 not in ("vdvae", "vae"):
        raise UserError(f"unknown stage-1 model '{stage1}' (choose vdvae or vae)")
    profile.require(stage1)
    path = profile.path(stage1)
    return load_autoencoder(path, device=profile.device), path


def ensure_offline_models(profile: ModelProfile, keys) -> None:
    """Tiny profile: build its random-weight models on first use (offline, deterministic)."""
    if profile.name == "tiny":
        from spikevaediff.core.tiny import ensure_tiny_weights
        ensure_tiny_weights(profile, keys=tuple(keys))


def compute_targets(cfg: TrainConfig, frames: np.ndarray, cache: TargetCache) -> tuple[dict, dict]:
    """Targets for every movie frame, plus the model ids that produced them."""
    square = dataset.square_frames(frames, STAGE1_SIZE)
    out, model_ids = {}, {}
    if "vdvae" in cfg.targets:
        model, path = load_stage1(cfg.profile, cfg.stage1)
        model_ids["stage1"] = {"arch": cfg.stage1, "path": str(path), "fingerprint": file_fingerprint(path),
                               "latent_dim": int(model.latent_dim()), "latent_mode": cfg.latent_mode}
        out["vdvae"] = vdvae_targets(model, square, model_ids["stage1"]["fingerprint"], cache, cfg.latent_mode)
    if {"clip_vision", "clip_text"} & set(cfg.targets):
        from spikevaediff.core.clip import ClipEncoder
        ensure_offline_models(cfg.profile, ("clip", "blip2"))
        encoder = ClipEncoder(cfg.profile)
        clip_path = cfg.profile.path("clip")
        model_ids["clip"] = {"path": str(clip_path), "fingerprint": file_fingerprint(clip_path)}
        clip_square = dataset.square_frames(frames, 224)
        if "clip_vision" in cfg.targets:
            out["clip_vision"] = clip_vision_targets(encoder, clip_square, model_ids["clip"]["fingerprint"], cache)
        if "clip_text" in cfg.targets:
            captions = frame_captions(cfg, clip_square)
            out["clip_text"] = clip_text_targets(encoder, captions, model_ids["clip"]["fingerprint"], cache)
    return out, model_ids


def cache_dir(cfg: TrainConfig) -> Path:
    """Where extracted targets and generated captions are kept between trainings."""
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out).parent / "targets-cache"


def frame_captions(cfg: TrainConfig, frames: np.ndarray) -> list[str]:
    """A caption per frame: the user's captions file, completed (and cached) with BLIP-2."""
    from spikevaediff.core.captions import Captioner, captions_for_frames

    cache_path = cfg.captions or (cache_dir(cfg) / f"captions-{cfg.profile.name}-{cfg.movie}.json")
    return captions_for_frames(frames, np.arange(len(frames)), cache_path, lambda: Captioner(cfg.profile))


def fit_ridges(cfg: TrainConfig, x: np.ndarray, targets: dict, frame_ids: np.ndarray) -> tuple[dict, dict]:
    """One ridge per target group; returns (ridges, per-group training metrics).

    Cross-validation folds are contiguous runs of frames with a 1 s gap on each side, and every
    repeat of a frame stays in one fold, so validation frames never leak through their neighbours.
    """
    from spikevaediff.core.ridge import RidgeRegression

    ridges, metrics = {}, {}
    for name, y in targets.items():
        t0 = time.perf_counter()
        if cfg.alphas == "fixed":
            ridge = RidgeRegression(alpha=FIXED_ALPHAS[name], seed=cfg.seed)
        else:
            ridge = RidgeRegression(alphas=CV_ALPHA_GRID, cv=cfg.cv_folds, cv_mode="contiguous",
                                    cv_gap=CV_GAP_FRAMES, seed=cfg.seed)
        ridge.fit(x, y, groups=frame_ids)
        pred = ridge.predict(x)
        ss_res = float(((y - pred) ** 2).sum())
        ss_tot = float(((y - y.mean(0)) ** 2).sum())
        metrics[name] = {"alpha": float(ridge.alpha_), "train_r2": 1 - ss_res / max(ss_tot, 1e-12),
                         "fit_seconds": round(time.perf_counter() - t0, 3), "n_outputs": int(y.shape[1])}
        if getattr(ridge, "cv_scores_", None) is not None:
            metrics[name]["cv_best_score"] = float(np.max(ridge.cv_scores_))
        log.info("ridge %s: alpha %.3g, train R2 %.3f", name, ridge.alpha_, metrics[name]["train_r2"])
        ridges[name] = ridge
    return ridges, metrics


def target_shapes(targets: dict, embed_dim: int) -> dict:
    """The shape each flat ridge output reshapes to (CLIP ones are tokens x width)."""
    return {name: ([y.shape[1] // embed_dim, embed_dim] if name.startswith("clip") else [y.shape[1]])
            for name, y in targets.items()}


def train(cfg: TrainConfig) -> Path:
    """Run the whole training and write the bundle to cfg.out. Returns the bundle path."""
    from spikevaediff.core.bundle import BundleManifest, write_bundle

    cfg.out = Path(cfg.out)
    pop = load_population(cfg.sessions, cfg.movie, cfg.areas, cfg.window, cfg.n_subbins)
    if cfg.units_per_area:
        pop = subsample_units(pop, cfg.units_per_area, cfg.seed)
    split = dataset.make_split(cfg.split, pop.frames, pop.repeats, pop.valid, pop.n_frames,
                               seed=cfg.seed, **cfg.split_params)
    log.info("%d units, %d presentations; split %s", pop.n_units, len(pop.counts), split.describe())
    frames = movie_frames(cfg.sessions, cfg.movie)
    if len(frames) < pop.n_frames:
        raise UserError(f"{cfg.movie} has {len(frames)} frames in its template but presentations up to {pop.n_frames}")
    cache = TargetCache(cache_dir(cfg))
    targets, model_ids = compute_targets(cfg, frames, cache)
    frame_ids, x = training_matrix(pop, split, cfg.average_repeats)
    ridges, train_metrics = fit_ridges(cfg, x, {k: v[frame_ids] for k, v in targets.items()}, frame_ids)
    manifest = BundleManifest(
        profile=cfg.profile.name, weights_dir=str(Path(cfg.profile.weights_dir).resolve()), models=model_ids,
        areas=sorted(set(pop.unit_areas.tolist())), units=[list(k) for k in pop.unit_keys],
        unit_areas=pop.unit_areas.tolist(), sessions=pop.sessions, movie=cfg.movie,
        n_frames=pop.n_frames, window=list(pop.window), n_subbins=pop.n_subbins,
        split={**split.describe(), "seed": cfg.seed, "params": cfg.split_params},
        average_repeats=cfg.average_repeats,
        alphas={k: float(r.alpha_) for k, r in ridges.items()},
        target_shapes=target_shapes(targets, cfg.profile.embed_dim),
        training_metrics=train_metrics, seed=cfg.seed,
    )
    write_bundle(cfg.out, manifest, ridges)
    return cfg.out
