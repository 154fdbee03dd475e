"""A plain single-latent VAE: the seed's figure-7 baseline for the VDVAE, with the same API.

One Gaussian latent vector (no hierarchy) between a convolutional encoder and decoder built from
the VDVAE's own residual blocks, with the textbook VAE output: a per-pixel Gaussian with one learned
scale (a "calibrated" decoder). Trained by the same command, data, augmentation and time budget
(`spikevaediff train-vdvae --arch vae`).

Why not the VDVAE's mixture-of-logistics output: with a single global latent it learns the
per-pixel marginal histogram first and the latent collapses (measured: held-out PixCorr ~0 after
150 updates on the movie), which would make the baseline a straw man.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import noise_tape
from .errors import UserError
from .vdvae import (LatentImageModel, check_batch, normalise_input, read_checkpoint_meta,
                    to_unit_range)
from .vdvae_blocks import Block, conv, gaussian_kl, gaussian_sample, width_settings


@dataclass(frozen=True)
class PlainVAEHparams:
    """Architecture of the plain VAE: widths per resolution from 64 down to `bottom`."""

    zdim: int = 256
    width: int = 16  # at the image resolution (the output head's input)
    custom_width_str: str = "32:48,16:96,8:128,4:64"
    blocks_per_res: int = 1
    bottom: int = 4
    bottleneck_multiple: float = 0.25
    image_size: int = 64
    image_channels: int = 3
    n_latent_blocks: int = 1

    def resolutions(self) -> list[int]:
        """Image size down to `bottom`, halving: [64, 32, 16, 8, 4]."""
        res, out = self.image_size, []
        while res >= self.bottom:
            out.append(res)
            res //= 2
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PlainVAEHparams":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


VAE_HPARAMS = {"tiny": PlainVAEHparams()}


class PlainVAE(LatentImageModel):
    """Encoder (conv + residual blocks, downsampling) -> z ~ N(mu, sigma) -> decoder (upsampling)."""

    arch = "vae"

    def __init__(self, hparams: PlainVAEHparams | str = "tiny"):
        super().__init__()
        H = VAE_HPARAMS[hparams] if isinstance(hparams, str) else hparams
        if H.n_latent_blocks != 1:
            raise UserError("a plain VAE has exactly one latent block")
        self.hparams = H
        self.n_latent_blocks = 1
        widths = width_settings(H.width, H.custom_width_str)
        self.res = H.resolutions()
        self.bottom_width = widths[self.res[-1]]
        n_blocks = 2 * len(self.res) * H.blocks_per_res

        def stage(res):
            w = widths[res]
            blocks = [Block(w, max(1, int(w * H.bottleneck_multiple)), w, residual=True,
                            use_3x3=res > 2) for _ in range(H.blocks_per_res)]
            for b in blocks:
                b.c4.weight.data *= (1 / n_blocks) ** 0.5
            return nn.Sequential(*blocks)

        self.widths = widths
        self.in_conv = conv(H.image_channels, widths[H.image_size], 3)
        self.enc_stages = nn.ModuleList(stage(r) for r in self.res)
        flat = self.bottom_width * self.res[-1] ** 2
        self.to_posterior = nn.Linear(flat, 2 * H.zdim)
        self.from_latent = nn.Linear(H.zdim, flat)
        # Variance-preserving linear maps, so the latent's influence does not start out tiny.
        for layer in (self.to_posterior, self.from_latent):
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            nn.init.zeros_(layer.bias)
        self.dec_stages = nn.ModuleList(stage(r) for r in reversed(self.res))
        self.out_net = GaussianOut(widths[H.image_size], H.image_channels)

    def latent_shapes_all(self) -> list[tuple[int, int, int]]:
        return [(self.hparams.zdim, 1, 1)]

    # --- passes ------------------------------------------------------------------------------

    def _posterior(self, x_uint8):
        h = self.in_conv(normalise_input(x_uint8, self.dtype).permute(0, 3, 1, 2).contiguous())
        for i, stage in enumerate(self.enc_stages):
            h = stage(h)
            if i + 1 < len(self.res):  # down: pool, then widen with zero channels (as VDVAE)
                h = fit_channels(F.avg_pool2d(h, 2), self.widths[self.res[i + 1]])
        mu, logsigma = self.to_posterior(h.flatten(1)).chunk(2, dim=1)
        return mu, logsigma

    def _generate(self, z):
        r = self.res[-1]
        h = self.from_latent(z.flatten(1)).view(z.shape[0], self.bottom_width, r, r)
        up = list(reversed(self.res))
        for i, stage in enumerate(self.dec_stages):
            h = stage(h)
            if i + 1 < len(up):  # up: nearest, then narrow by keeping the first channels
                h = fit_channels(F.interpolate(h, scale_factor=2), self.widths[up[i + 1]])
        return h

    def _encode(self, x_uint8, k, mode, gen):
        mu, logsigma = self._posterior(x_uint8)
        z = mu if mode == "mean" else gaussian_sample(mu, logsigma, gen)
        return [z[:, :, None, None]]

    def _decode(self, zs, temperature, gen, pixels):
        return self.out_net.sample(self._generate(zs[0]), gen, pixels)

    def _decode_prior(self, n, temperature, gen, pixels):
        z = torch.randn((n, self.hparams.zdim), generator=gen, device=self.device,
                        dtype=self.dtype) * temperature
        return self.out_net.sample(self._generate(z), gen, pixels)

    def elbo(self, x_uint8: torch.Tensor, kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Training loss per dimension (nats), as VDVAE.elbo, with a standard-normal prior."""
        check_batch(x_uint8, self.hparams.image_size)
        mu, logsigma = self._posterior(x_uint8)
        z = gaussian_sample(mu, logsigma)
        ndims = float(x_uint8[0].numel())
        rate = gaussian_kl(mu, torch.zeros_like(mu), logsigma, torch.zeros_like(logsigma)).sum(1) / ndims
        distortion = self.out_net.nll(self._generate(z), to_unit_range(x_uint8, self.dtype))
        loss = (distortion + kl_weight * rate).mean()
        return {"loss": loss, "elbo": (distortion + rate).mean().detach(),
                "distortion": distortion.mean().detach(), "rate": rate.mean().detach()}

    @classmethod
    def from_checkpoint(cls, path, hparams: str | PlainVAEHparams | None = None,
                        device="cpu") -> "PlainVAE":
        """Load a plain-VAE checkpoint (hparams from the .json beside it when present)."""
        meta = read_checkpoint_meta(path)
        if isinstance(hparams, PlainVAEHparams):
            H = hparams
        elif meta is not None:
            if meta.get("arch") != "vae":
                raise UserError(f"{path}: a '{meta.get('arch')}' checkpoint, not a plain VAE")
            H = PlainVAEHparams.from_dict(meta["hparams"])
        else:
            H = VAE_HPARAMS[hparams or "tiny"]
        model = cls(H)
        model.load_weights(path)
        return model.to(device).eval().requires_grad_(False)


class GaussianOut(nn.Module):
    """1x1 conv to per-pixel means in [-1, 1] (NHWC) and a "calibrated" standard deviation.

    The scale is the maximum-likelihood one for each training batch (sqrt of the mean squared
    error; Rybkin et al. 2021), so the reconstruction and KL terms are balanced from the first
    step; it is kept (as a buffer) for pixel sampling at decode time.
    """

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.out_conv = conv(width, channels, 1)
        self.register_buffer("log_sigma", torch.zeros(()))

    def forward(self, h):
        return self.out_conv(h).permute(0, 2, 3, 1)

    def nll(self, h, x):
        """Negative log-likelihood per dimension in nats of 8-bit values (density x bin width),
        comparable with the VDVAE's discretised likelihood; shape [N]."""
        sq = (x - self.forward(h)) ** 2
        log_sigma = (0.5 * torch.log(sq.mean().detach())).clamp(min=math.log(1 / 255))
        if self.training:
            self.log_sigma.copy_(log_sigma)
        per_dim = 0.5 * sq * torch.exp(-2 * log_sigma) + log_sigma + 0.5 * math.log(2 * math.pi) \
            - math.log(2 / 255)
        return per_dim.flatten(1).mean(1)

    def sample(self, h, generator=None, pixels: str = "mode"):
        mean = self.forward(h)
        if pixels == "sample":
            noise = noise_tape.randn(mean.shape, generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(self.log_sigma) * noise
        return mean.clamp(-1, 1)


def fit_channels(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad or truncate the channel axis of NCHW `t` to `width` (scale-preserving)."""
    if t.shape[1] >= width:
        return t[:, :width]
    return F.pad(t, (0, 0, 0, 0, 0, width - t.shape[1]))


def load_vae(profile) -> PlainVAE:
    """The profile's plain-VAE baseline (weight key `vae`)."""
    try:
        profile.spec("vae")
    except KeyError:
        if "vae" not in profile.overrides:
            raise UserError(f"profile '{profile.name}' has no 'vae' weight entry; train one with "
                            "`spikevaediff train-vdvae --arch vae` and pass its path") from None
    if "vae" not in profile.overrides:
        profile.require("vae")
    return PlainVAE.from_checkpoint(profile.path("vae"), device=profile.device)
