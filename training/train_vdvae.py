"""Train the tiny stage-1 model (VDVAE, or the plain-VAE baseline) on a movie's own frames.

Frames (uint8 grayscale [F, H, W]) come from an NWB session + movie name, an image folder or a
.npy file. The tail of the movie (or folder) is held out, after a gap, to measure how well the
model reconstructs frames it never saw: PixCorr and SSIM of posterior reconstructions against
the mean-frame baseline, written to `metrics.json` beside the checkpoint and a figure.

The model sees what the rest of the system feeds it: the centre square of a frame at 64x64,
here with augmentation (random square crops of 70-100% of the short side, horizontal flips).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from spikevaediff.core.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
WORK_SIDE = 96  # frames are shrunk once so their short side is this (crops are taken from it)


@dataclass
class TrainVDVAEConfig:
    """Settings of one training run (all saved to `DIR/train_config.json`)."""

    out: Path
    arch: str = "vdvae"            # "vdvae" or "vae"
    minutes: float = 3.0           # time budget for the optimisation loop
    max_steps: int | None = None   # stop earlier after this many updates (tests)
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 100.0
    kl_weight: float = 1.0
    ema_rate: float = 0.99
    holdout: float = 0.1           # fraction of frames held out (the tail)
    gap: int = 30                  # frames dropped between training and held-out frames
    max_eval: int = 128            # held-out frames scored
    threads: int | None = None     # torch threads (None: leave as is)
    seed: int = 0
    checkpoint_every_s: float = 60.0
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Frames


def load_frames(source, movie: str | None = None) -> np.ndarray:
    """uint8 grayscale frames [F, H, W] from an NWB session (+ movie), an image folder or a .npy."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"frames not found: {path}")
    if path.is_dir():
        frames = _load_image_folder(path)
    elif path.suffix == ".npy":
        try:
            frames = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise UserError(f"{path}: not a readable .npy file ({type(exc).__name__})") from exc
    elif path.suffix == ".nwb":
        if not movie:
            raise UserError("an NWB session needs --movie NAME (e.g. natural_movie_one)")
        from spikevaediff.replay.nwb import open_session

        with open_session(path) as session:
            frames = np.asarray(session.frames(movie))
    else:
        raise UserError(f"{path}: frames must be an NWB session, an image folder or a .npy file")
    return _as_gray_uint8(frames, path)


def _load_image_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("L")))
        except Exception as exc:
            raise UserError(f"{f}: not a readable image ({type(exc).__name__})") from exc
    # Folders may mix sizes: bring every image to the first one's size (area resize).
    h, w = images[0].shape
    return np.stack([im if im.shape == (h, w) else
                     np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in images])


def _as_gray_uint8(frames: np.ndarray, path) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 4 and frames.shape[-1] in (1, 3, 4):
        rgb = frames[..., :3].astype(np.float32)
        frames = rgb @ np.array([0.299, 0.587, 0.114], np.float32) if rgb.shape[-1] == 3 else rgb[..., 0]
    if frames.ndim != 3 or min(frames.shape[1:]) < 8:
        raise UserError(f"{path}: frames must be [F, H, W] (or [F, H, W, 3]) images of at least "
                        f"8x8 pixels, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        if np.issubdtype(frames.dtype, np.floating) and np.nanmax(frames) <= 1.0:
            frames = frames * 255.0  # floats in [0, 1]
        frames = np.clip(np.nan_to_num(frames), 0, 255).round().astype(np.uint8)
    if len(frames) < 4:
        raise UserError(f"{path}: need at least 4 frames to train and hold some out, got {len(frames)}")
    return frames


def shrink_frames(frames: np.ndarray, short_side: int = WORK_SIDE):
    """Area-resize frames [F,H,W] so the short side is `short_side` (never upsamples): a torch
    uint8 tensor [F,1,h,w] that crops are cut from quickly."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(frames))[:, None]
    h, w = frames.shape[1:]
    scale = short_side / min(h, w)
    if scale >= 1.0:
        return t
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = []
    for i in range(0, len(t), 256):
        out.append(F.interpolate(t[i:i + 256].float(), size=size, mode="area").round().to(torch.uint8))
    return torch.cat(out)


def centre_squares(work, size: int = 64):
    """Centre square of each work frame at size x size: uint8 [N, size, size] (what the system
    encodes)."""
    import torch.nn.functional as F

    h, w = work.shape[2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = work[:, :, top:top + s, left:left + s].float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=s > size, align_corners=False)
    return out[:, 0].round().clamp(0, 255).byte().numpy()


def augmented_batch(work, idx, gen, size: int = 64):
    """Random square crops (70-100% of the short side, anywhere), flips: uint8 [B, size, size, 3]."""
    import torch
    import torch.nn.functional as F

    h, w = work.shape[2:]
    short = min(h, w)
    crops = []
    for i in idx.tolist():
        s = int(short * (0.7 + 0.3 * torch.rand(1, generator=gen).item()))
        top = int(torch.randint(0, h - s + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - s + 1, (1,), generator=gen))
        crop = work[i:i + 1, :, top:top + s, left:left + s].float()
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=s > size, align_corners=False)
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        crops.append(crop)
    x = torch.cat(crops).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()


def split_frames(n: int, holdout: float, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Train indices (head) and held-out indices (tail), `gap` frames apart when room allows."""
    n_test = max(1, int(round(n * holdout)))
    gap = min(gap, max(0, (n - n_test) // 4))
    n_train = n - n_test - gap
    if n_train < 1:
        raise UserError(f"too few frames ({n}) for a hold-out of {holdout:.0%}")
    return np.arange(n_train), np.arange(n - n_test, n)


# ---------------------------------------------------------------------------------------------
# Model and loop


def build_model(arch: str):
    """A fresh tiny model of the chosen architecture."""
    if arch == "vdvae":
        from spikevaediff.core.vdvae import VDVAE

        return VDVAE("tiny")
    if arch == "vae":
        from spikevaediff.core.vae import PlainVAE

        return PlainVAE("tiny")
    raise UserError(f"unknown --arch '{arch}' (choose vdvae or vae)")


def _update_ema(ema, model, rate: float) -> None:
    import torch

    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.mul_(rate).add_(p.detach(), alpha=1.0 - rate)


def train_vdvae(cfg: TrainVDVAEConfig, frames: np.ndarray) -> dict:
    """Train on `frames` within the time budget; write checkpoint, figure and metrics to cfg.out.

    Returns the metrics dict (also in `cfg.out/metrics.json`).
    """
    import copy

    import torch
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.minutes <= 0 and not cfg.max_steps:
        raise UserError("--minutes must be positive")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    frames = _as_gray_uint8(frames, "frames")
    train_idx, test_idx = split_frames(len(frames), cfg.holdout, cfg.gap)
    work = shrink_frames(frames)
    train_work = work[torch.from_numpy(train_idx)]
    eval_idx = test_idx[np.linspace(0, len(test_idx) - 1, min(cfg.max_eval, len(test_idx))).astype(int)]
    held_out = centre_squares(work[torch.from_numpy(eval_idx)])
    mean_frame = centre_squares(train_work).astype(np.float64).mean(0)

    model = build_model(cfg.arch)
    ema = copy.deepcopy(model).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    ckpt = out / f"{cfg.arch}.th"
    meta = {"trained_on": {"frames": int(len(frames)), "train_frames": int(len(train_idx)),
                           "held_out_frames": int(len(test_idx)), "frame_shape": list(frames.shape[1:])},
            "config": _jsonable(asdict(cfg))}

    budget = cfg.minutes * 60.0
    steps, skipped, history = 0, 0, []
    t0 = last_ckpt = time.monotonic()
    bar = tqdm(total=int(budget) if not cfg.max_steps else cfg.max_steps, disable=not cfg.progress,
               desc=f"train-{cfg.arch}", unit="s" if not cfg.max_steps else "step")
    model.train()
    while True:
        elapsed = time.monotonic() - t0
        if (cfg.max_steps and steps >= cfg.max_steps) or (cfg.minutes > 0 and elapsed >= budget):
            break
        idx = torch.randint(0, len(train_work), (cfg.batch_size,), generator=gen)
        x = augmented_batch(train_work, idx, gen)
        stats = model.elbo(x, kl_weight=cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        stats["loss"].backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        if not math.isfinite(grad_norm) or not torch.isfinite(stats["loss"]):
            skipped += 1  # a rare blow-up: skip the update rather than poison the weights
        else:
            opt.step()
            sched.step()
            # EMA warms up: early on it follows the model closely.
            _update_ema(ema, model, min(cfg.ema_rate, (1 + steps) / (10 + steps)))
        steps += 1
        if steps % 10 == 0:
            history.append({"step": steps, "time_s": round(elapsed, 1),
                            **{k: float(v) for k, v in stats.items() if k != "loss"}})
            bar.set_postfix(elbo=f"{float(stats['elbo']):.3f}", rate=f"{float(stats['rate']):.3f}")
        bar.n = steps if cfg.max_steps else min(int(elapsed), int(budget))
        bar.refresh()
        if time.monotonic() - last_ckpt > cfg.checkpoint_every_s:
            ema.save_checkpoint(ckpt, extra={**meta, "steps": steps})
            last_ckpt = time.monotonic()
    train_s = time.monotonic() - t0
    bar.n = steps if cfg.max_steps else min(int(train_s), int(budget))
    bar.close()

    ema.eval()
    ema.save_checkpoint(ckpt, extra={**meta, "steps": steps})
    metrics = evaluate_reconstruction(ema, held_out, mean_frame, seed=cfg.seed)
    metrics.update({"arch": cfg.arch, "params": int(n_params), "steps": steps, "skipped_steps": skipped,
                    "train_seconds": round(train_s, 1), "images_seen": steps * cfg.batch_size,
                    "threads": torch.get_num_threads(), "latent_dim": ema.latent_dim(),
                    "n_latent_blocks": ema.n_latent_blocks, "held_out_scored": int(len(held_out)),
                    "final_train": history[-1] if history else None})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "history.json").write_text(json.dumps(history))
    (out / "train_config.json").write_text(json.dumps(_jsonable(asdict(cfg)), indent=2))
    save_reconstruction_figure(ema, held_out, mean_frame, out / "reconstructions.png", seed=cfg.seed)
    return metrics


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_reconstruction(model, held_out: np.ndarray, mean_frame: np.ndarray, seed: int = 0) -> dict:
    """PixCorr / SSIM of held-out reconstructions vs the mean-frame baseline and prior samples.

    `posterior_k`: latents of the model's default K blocks from the posterior mean, the rest from
    the prior (what the live decoder does); `posterior_all`: every block's latents.
    """
    from spikevaediff.core import metrics as M

    n = len(held_out)
    z_k = model.encode_latents(held_out, mode="mean")
    z_all = model.encode_latents(held_out, k=len(model.latent_shapes_all()), mode="mean")
    k_all = len(model.latent_shapes_all())
    candidates = {
        "posterior_k": model.decode_latents(z_k, seed=seed, pixels="mode"),
        "posterior_k_sampled_pixels": model.decode_latents(z_k, seed=seed, pixels="sample"),
        "posterior_all": model.decode_latents(z_all, k=k_all, seed=seed, pixels="mode"),
        "prior_samples": model.sample_prior(n, seed=seed, pixels="mode"),
        "mean_frame": np.repeat(mean_frame.round().astype(np.uint8)[None], n, 0),
    }
    result = {}
    for name, images in candidates.items():
        pc = M.pixcorr(images, held_out)
        ss = M.ssim(images, held_out)
        result[name] = {"pixcorr": float(np.mean(pc)), "ssim": float(np.mean(ss))}
    # The mean frame is one constant image: its PixCorr is well defined per item (not 0).
    result["beats_mean_frame"] = bool(result["posterior_k"]["pixcorr"] > result["mean_frame"]["pixcorr"]
                                      and result["posterior_k"]["ssim"] > result["mean_frame"]["ssim"])
    return result


def save_reconstruction_figure(model, held_out: np.ndarray, mean_frame: np.ndarray, path: Path,
                               n: int = 8, seed: int = 0) -> None:
    """Rows: held-out frames | reconstruction (K blocks) | reconstruction (all blocks) | mean frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick = np.linspace(0, len(held_out) - 1, min(n, len(held_out))).astype(int)
    truth = held_out[pick]
    k_all = len(model.latent_shapes_all())
    rec_k = model.reconstruct(truth, seed=seed, pixels="mode")[..., 0]
    rec_all = model.reconstruct(truth, k=k_all, seed=seed, pixels="mode")[..., 0]
    rows = [("held-out", truth), (f"recon K={model.n_latent_blocks}", rec_k),
            (f"recon all {k_all}", rec_all), ("mean frame", np.repeat(mean_frame[None], len(pick), 0))]
    fig, axes = plt.subplots(len(rows), len(pick), figsize=(1.3 * len(pick), 1.4 * len(rows)),
                             squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(len(pick)):
            ax = axes[r, c]
            ax.imshow(images[c], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"{model.arch}: held-out frames and reconstructions from posterior latents", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonable(d):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
