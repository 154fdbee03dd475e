"""The VDVAE of openai/vdvae in PyTorch: stage 1 of the decoder (latents <-> 64x64 preview).

Two hyperparameter sets share one code path: `imagenet64` (the published model, loadable from
`imagenet64-iter-1600000-model-ema.th`) and `tiny` (a few narrow blocks, trained by
`spikevaediff train-vdvae`). The operations the rest of the system uses:

    model.encode_latents(images, k) -> [N, D]    # posterior latents of the first k decoder blocks
    model.decode_latents(latents, k) -> uint8 [N, 64, 64, 3]   # remaining blocks from the prior

Latents are flattened per block (C, H, W order) and concatenated in block order, as
Brain-Diffuser does; for imagenet64 and k=31 that is 91,168 values.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import UserError, read_json
from .vdvae_blocks import Decoder, Encoder, parse_layer_string, width_settings

# uint8 -> network input, as the published ImageNet-64 model was trained.
INPUT_MEAN = 115.92961967
INPUT_STD = 69.37404


@dataclass(frozen=True)
class VDVAEHparams:
    """Architecture of a VDVAE (the names are the reference's)."""

    width: int
    zdim: int
    enc_blocks: str
    dec_blocks: str
    bottleneck_multiple: float = 0.25
    num_mixtures: int = 10
    no_bias_above: int = 64
    custom_width_str: str = ""
    image_size: int = 64
    image_channels: int = 3
    n_latent_blocks: int = 31  # default K: how many decoder blocks' latents form the vector

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VDVAEHparams":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


HPARAMS: dict[str, VDVAEHparams] = {
    "imagenet64": VDVAEHparams(
        width=512, zdim=16, bottleneck_multiple=0.25, num_mixtures=10, no_bias_above=64,
        enc_blocks="64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5",
        dec_blocks="1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12",
        n_latent_blocks=31),
    # Same code, narrow and shallow (about 1M parameters): thin at 64x64 where the compute goes,
    # wider below; latents of the first 10 blocks (up to 16x16) form the vector.
    "tiny": VDVAEHparams(
        width=16, zdim=8, custom_width_str="32:48,16:96,8:128,4:128,1:128",
        enc_blocks="64d2,32x1,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x1",
        dec_blocks="1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,64m32",
        num_mixtures=5, n_latent_blocks=10),
}


# ---------------------------------------------------------------------------------------------
# Images in, images out


def to_model_images(images, size: int = 64) -> torch.Tensor:
    """uint8 images [N,H,W], [N,H,W,1] or [N,H,W,3] (numpy or torch) -> uint8 tensor [N,size,size,3].

    Grayscale is replicated to 3 channels; other sizes are resized whole (area/antialiased),
    so a 304x608 movie frame becomes the full frame at 64x64.
    """
    t = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if t.dtype != torch.uint8:
        raise UserError(f"images must be uint8, got {t.dtype}")
    if t.ndim == 2:
        t = t[None]
    if t.ndim == 3:
        t = t[..., None]
    if t.ndim != 4 or t.shape[-1] not in (1, 3):
        raise UserError(f"images must be [N,H,W] or [N,H,W,3] uint8, got shape {tuple(t.shape)}")
    if t.shape[-1] == 1:
        t = t.expand(-1, -1, -1, 3)
    if t.shape[1] != size or t.shape[2] != size:
        x = t.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        t = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return t.contiguous()


def normalise_input(x_uint8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 NHWC -> the encoder's input scale."""
    return (x_uint8.to(dtype) - INPUT_MEAN) / INPUT_STD


def to_unit_range(x_uint8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 NHWC -> [-1, 1], the likelihood's scale."""
    return x_uint8.to(dtype) / 127.5 - 1.0


def from_unit_range(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NHWC -> uint8 numpy (truncating, as the reference does)."""
    return ((x.float() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def check_batch(x: torch.Tensor, size: int) -> None:
    """A training batch must already be uint8-valued NHWC at the model's size."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (size, size, 3):
        raise UserError(f"expected images [N,{size},{size},3], got {tuple(x.shape)}")


def _generator(device, seed):
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


# ---------------------------------------------------------------------------------------------
# The shared API of stage-1 models (VDVAE and the plain-VAE baseline)


class LatentImageModel(nn.Module):
    """What the rest of the system needs from a stage-1 model; subclasses supply `_encode`,
    `_decode`, `latent_shapes_all` and `elbo`."""

    arch = "?"
    n_latent_blocks: int
    hparams: object

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _k(self, k):
        n = len(self.latent_shapes_all())
        k = self.n_latent_blocks if k is None else int(k)
        if not 1 <= k <= n:
            raise UserError(f"k must be between 1 and {n} latent blocks, got {k}")
        return k

    def latent_shapes(self, k=None) -> list[tuple[int, int, int]]:
        """(C, H, W) of each of the first k latent blocks."""
        return self.latent_shapes_all()[: self._k(k)]

    def latent_dim(self, k=None) -> int:
        """Length of the flat latent vector of the first k blocks."""
        return int(sum(np.prod(s) for s in self.latent_shapes(k)))

    def encode_latents(self, images, k=None, mode: str = "mean", seed=None,
                       batch_size: int = 64) -> torch.Tensor:
        """uint8 images -> float32 [N, latent_dim(k)] on the CPU.

        `mode`: "mean" (posterior means) or "sample" (one posterior draw, as Brain-Diffuser).
        """
        if mode not in ("mean", "sample"):
            raise UserError(f"mode must be 'mean' or 'sample', got {mode!r}")
        k = self._k(k)
        x = to_model_images(images, self.hparams.image_size)
        gen = _generator(self.device, seed) if mode == "sample" else None
        out = []
        with torch.inference_mode():
            for i in range(0, x.shape[0], batch_size):
                xb = x[i:i + batch_size].to(self.device)
                zs = self._encode(xb, k, mode, gen)
                out.append(torch.cat([z.reshape(z.shape[0], -1) for z in zs], 1).float().cpu())
        return torch.cat(out, 0) if out else torch.zeros(0, self.latent_dim(k))

    def split_latents(self, latents: torch.Tensor, k) -> list[torch.Tensor]:
        """Flat [N, D] -> per-block [N, C, H, W] tensors."""
        shapes = self.latent_shapes(k)
        sizes = [int(np.prod(s)) for s in shapes]
        if latents.ndim != 2 or latents.shape[1] != sum(sizes):
            raise UserError(f"latents must be [N, {sum(sizes)}] for k={len(shapes)}, "
                            f"got {tuple(latents.shape)}")
        parts = torch.split(latents, sizes, dim=1)
        return [p.reshape(p.shape[0], *s) for p, s in zip(parts, shapes)]

    def decode_latents(self, latents, k=None, temperature: float = 1.0, seed=0,
                       pixels: str = "mode", batch_size: int = 64) -> np.ndarray:
        """Flat latents [N, latent_dim(k)] -> uint8 [N, 64, 64, 3].

        Blocks after k come from the prior at `temperature`; all randomness (prior draws and
        pixel sampling) comes from `seed` (None: unseeded). `pixels`: "mode" (default) takes the
        most likely mixture component's centre: deterministic and smoother, a better preview
        (held-out PixCorr 0.67 vs 0.41 for the tiny model after 150 updates); "sample" draws
        each pixel from the output mixture, as openai/vdvae and Brain-Diffuser do.
        """
        if pixels not in ("sample", "mode"):
            raise UserError(f"pixels must be 'sample' or 'mode', got {pixels!r}")
        k = self._k(k)
        z = torch.as_tensor(np.asarray(latents) if not torch.is_tensor(latents) else latents)
        z = z.to(self.device, self.dtype)
        gen = _generator(self.device, seed)
        out = []
        with torch.inference_mode():
            for i in range(0, z.shape[0], batch_size):
                zs = self.split_latents(z[i:i + batch_size], k)
                out.append(from_unit_range(self._decode(zs, temperature, gen, pixels)))
        if not out:
            s = self.hparams.image_size
            return np.zeros((0, s, s, 3), np.uint8)
        return np.concatenate(out, 0)

    def reconstruct(self, images, k=None, mode="mean", temperature=1.0, seed=0, pixels="mode"):
        """Encode then decode (a convenience for figures and checks)."""
        z = self.encode_latents(images, k=k, mode=mode, seed=seed)
        return self.decode_latents(z, k=k, temperature=temperature, seed=seed, pixels=pixels)

    def sample_prior(self, n: int, temperature: float = 1.0, seed=0, pixels="mode") -> np.ndarray:
        """n unconditional samples, uint8 [n, 64, 64, 3]."""
        gen = _generator(self.device, seed)
        with torch.inference_mode():
            return from_unit_range(self._decode_prior(n, temperature, gen, pixels))

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, path, extra: dict | None = None) -> None:
        """`path` (.th state dict) + `path` with .json (arch, hparams, n_latent_blocks, extra)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, path)
        meta = {"arch": self.arch, "hparams": self.hparams.to_dict(),
                "n_latent_blocks": self.n_latent_blocks, **(extra or {})}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))

    def load_weights(self, path) -> None:
        """Load a plain state dict (weights_only); a DDP 'module.' prefix is stripped."""
        state = read_state_dict(path)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise UserError(
                f"{path}: checkpoint does not match the {self.arch} architecture "
                f"({len(missing)} missing keys e.g. {missing[:2]}, "
                f"{len(unexpected)} unexpected e.g. {unexpected[:2]})")
        bad = [k for k in own if own[k].shape != state[k].shape]
        if bad:
            raise UserError(f"{path}: {len(bad)} tensors have the wrong shape, e.g. {bad[0]} is "
                            f"{tuple(state[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
        self.load_state_dict(state)


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) with one-line errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, ...
        raise UserError(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from exc
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def read_checkpoint_meta(path) -> dict | None:
    """The .json beside a checkpoint, or None."""
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.is_file():
        return None
    return read_json(meta_path, "checkpoint metadata")


# ---------------------------------------------------------------------------------------------
# The VDVAE


class VDVAE(LatentImageModel):
    """openai/vdvae's VAE: `encoder` (bottom-up) and `decoder` (top-down with latents)."""

    arch = "vdvae"

    def __init__(self, hparams: VDVAEHparams | str = "tiny"):
        super().__init__()
        H = HPARAMS[hparams] if isinstance(hparams, str) else hparams
        if width_settings(H.width, H.custom_width_str)[H.image_size] != H.width:
            raise UserError("the image-resolution width must equal `width`")
        self.hparams = H
        self.encoder = Encoder(H)
        self.decoder = Decoder(H)
        self.n_latent_blocks = H.n_latent_blocks
        self._k(None)  # validate the default K against the block string

    def latent_shapes_all(self) -> list[tuple[int, int, int]]:
        return [(self.hparams.zdim, r, r) for r, _ in parse_layer_string(self.hparams.dec_blocks)]

    # --- passes ------------------------------------------------------------------------------

    def _encode(self, x_uint8, k, mode, gen):
        acts = self.encoder(normalise_input(x_uint8, self.dtype))
        xs = self.decoder.initial_state()
        zs = []
        for block in self.decoder.dec_blocks[:k]:  # only the blocks whose latents we need
            xs, z, _ = block(xs, acts, mode=mode, generator=gen)
            zs.append(z)
        return zs

    def _decode(self, zs, temperature, gen, pixels):
        n = zs[0].shape[0]
        xs = self.decoder.initial_state(n)
        for i, block in enumerate(self.decoder.dec_blocks):
            z = zs[i] if i < len(zs) else None
            xs = block.forward_uncond(xs, n, t=temperature, z=z, generator=gen)
        return self.decoder.out_net.sample(self.decoder.final(xs), gen, pixels)

    def _decode_prior(self, n, temperature, gen, pixels):
        xs = self.decoder.initial_state(n)
        for block in self.decoder.dec_blocks:
            xs = block.forward_uncond(xs, n, t=temperature, generator=gen)
        return self.decoder.out_net.sample(self.decoder.final(xs), gen, pixels)

    def elbo(self, x_uint8: torch.Tensor, kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Training loss per dimension (nats): distortion + kl_weight * rate, batch means."""
        check_batch(x_uint8, self.hparams.image_size)
        acts = self.encoder(normalise_input(x_uint8, self.dtype))
        xs = self.decoder.initial_state()
        rate = 0.0
        for block in self.decoder.dec_blocks:
            xs, _, kl = block(xs, acts, mode="sample")
            rate = rate + kl.sum(dim=(1, 2, 3))
        ndims = float(np.prod(x_uint8.shape[1:]))
        distortion = self.decoder.out_net.nll(self.decoder.final(xs), to_unit_range(x_uint8, self.dtype))
        rate = rate / ndims
        loss = (distortion + kl_weight * rate).mean()
        return {"loss": loss, "elbo": (distortion + rate).mean().detach(),
                "distortion": distortion.mean().detach(), "rate": rate.mean().detach()}

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path, hparams: str | VDVAEHparams | None = None,
                        device="cpu") -> "VDVAE":
        """Load a VDVAE state dict. Hparams: the .json beside the file when present (tiny
        checkpoints), else the named set (`imagenet64` when None: the published file has none)."""
        meta = read_checkpoint_meta(path)
        if isinstance(hparams, VDVAEHparams):
            H = hparams
        elif meta is not None and hparams in (None, "tiny"):
            if meta.get("arch", "vdvae") != "vdvae":
                raise UserError(f"{path}: a '{meta.get('arch')}' checkpoint, not a VDVAE "
                                "(use load_autoencoder)")
            H = VDVAEHparams.from_dict(meta["hparams"])
            H = dataclasses.replace(H, n_latent_blocks=meta.get("n_latent_blocks", H.n_latent_blocks))
        else:
            name = hparams or "imagenet64"
            if name not in HPARAMS:
                raise UserError(f"unknown VDVAE hparams '{name}' (choose from {', '.join(HPARAMS)})")
            H = HPARAMS[name]
        model = cls(H)
        model.load_weights(path)
        return model.to(device).eval().requires_grad_(False)


def load_autoencoder(path, device="cpu") -> LatentImageModel:
    """A stage-1 checkpoint of either arch (VDVAE or the plain VAE), chosen by its .json."""
    meta = read_checkpoint_meta(path) or {}
    if meta.get("arch") == "vae":
        from .vae import PlainVAE

        return PlainVAE.from_checkpoint(path, device=device)
    return VDVAE.from_checkpoint(path, device=device)


def load_vdvae(profile) -> LatentImageModel:
    """The profile's stage-1 model: the published imagenet64 VDVAE (`paper`) or the trained tiny
    one (`tiny`; a plain-VAE checkpoint there loads as the baseline)."""
    profile.require("vdvae")
    path = profile.path("vdvae")
    if profile.name == "paper":
        return VDVAE.from_checkpoint(path, hparams="imagenet64", device=profile.device)
    return load_autoencoder(path, device=profile.device)


def bench_vdvae(model: LatentImageModel, batch_sizes=(1, 16), repeats: int = 5,
                k=None, seed: int = 0) -> dict:
    """Decode latency in ms per image (median of `repeats`, after a warm-up), per batch size."""
    result = {"arch": model.arch, "device": str(model.device), "latent_dim": model.latent_dim(k)}
    gen = torch.Generator().manual_seed(seed)
    for bs in batch_sizes:
        z = torch.randn(bs, model.latent_dim(k), generator=gen)
        model.decode_latents(z, k=k, seed=seed)  # warm-up
        times = []
        for _ in range(repeats):
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.decode_latents(z, k=k, seed=seed)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000.0 / bs)
        result[f"decode_ms_per_image_b{bs}"] = float(np.median(times))
    return result
