"""Building blocks of the openai/vdvae architecture (Child, 2021), written for this project.

Module and parameter names follow the published code exactly, because the published
ImageNet-64 checkpoint is a plain state dict keyed by them (`encoder.enc_blocks.0.c1.weight`,
`decoder.dec_blocks.3.prior.c4.bias`, `decoder.bias_xs.2`, `decoder.out_net.out_conv.weight`...).

Conventions kept from the reference: activations are NCHW inside the network; the encoder
takes NHWC; "log-sigma" (not variance) parameterises every Gaussian; a temperature `t`
multiplies the prior's standard deviation.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from torch.nn import functional as F

from . import noise_tape

# ---------------------------------------------------------------------------------------------
# Gaussians


def gaussian_kl(mu_q, mu_p, logsigma_q, logsigma_p):
    """KL(q || p) of diagonal Gaussians given means and log standard deviations (elementwise)."""
    var_ratio = torch.exp(2.0 * (logsigma_q - logsigma_p))
    mean_term = (mu_q - mu_p) ** 2 * torch.exp(-2.0 * logsigma_p)
    return logsigma_p - logsigma_q + 0.5 * (var_ratio + mean_term) - 0.5


def gaussian_sample(mu, logsigma, generator: torch.Generator | None = None):
    """One draw from N(mu, exp(logsigma)^2), optionally from a seeded generator."""
    eps = noise_tape.randn(mu.shape, generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(logsigma) * eps


# ---------------------------------------------------------------------------------------------
# Layers


def conv(in_ch: int, out_ch: int, kernel: int, zero_weights: bool = False) -> nn.Conv2d:
    """A same-padding conv with zero bias (and optionally zero weights), as the reference inits."""
    layer = nn.Conv2d(in_ch, out_ch, kernel, 1, kernel // 2)
    nn.init.zeros_(layer.bias)
    if zero_weights:
        nn.init.zeros_(layer.weight)
    return layer


class Block(nn.Module):
    """Bottleneck residual block: 1x1 -> 3x3 -> 3x3 -> 1x1, GELU before each conv.

    3x3 convs become 1x1 on 1x1 and 2x2 feature maps (`use_3x3=False`), as in the reference.
    """

    def __init__(self, in_width, middle_width, out_width, down_rate=None, residual=False,
                 use_3x3=True, zero_last=False):
        super().__init__()
        self.down_rate = down_rate
        self.residual = residual
        k = 3 if use_3x3 else 1
        self.c1 = conv(in_width, middle_width, 1)
        self.c2 = conv(middle_width, middle_width, k)
        self.c3 = conv(middle_width, middle_width, k)
        self.c4 = conv(middle_width, out_width, 1, zero_weights=zero_last)

    def forward(self, x):
        h = x
        for layer in (self.c1, self.c2, self.c3, self.c4):
            h = layer(F.gelu(h))
        out = x + h if self.residual else h
        if self.down_rate is not None:
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out


def parse_layer_string(spec: str) -> list[tuple[int, int | None]]:
    """'64x2,64d2,1x1' -> [(64, None), (64, None), (64, 2), (1, None)].

    `RxN`: N blocks at resolution R; `RdK`: a block at R that downsamples by K (encoder);
    `RmS`: a block at R that mixes in the resolution-S state (decoder).
    """
    layers: list[tuple[int, int | None]] = []
    for item in spec.split(","):
        if "x" in item:
            res, count = item.split("x")
            layers += [(int(res), None)] * int(count)
        elif "m" in item or "d" in item:
            res, arg = item.replace("m", "d").split("d")
            layers.append((int(res), int(arg)))
        else:
            layers.append((int(item), None))
    return layers


def width_settings(width: int, custom: str) -> dict[int, int]:
    """Channel width per resolution: `width` unless `custom` ('32:64,16:128') says otherwise."""
    widths: dict[int, int] = defaultdict(lambda: width)
    for item in filter(None, (custom or "").split(",")):
        res, w = item.split(":")
        widths[int(res)] = int(w)
    return widths


def pad_channels(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the channel axis of an NCHW tensor up to `width`."""
    return F.pad(t, (0, 0, 0, 0, 0, width - t.shape[1]))


# ---------------------------------------------------------------------------------------------
# Encoder / decoder


class Encoder(nn.Module):
    """Bottom-up pass: NHWC normalised image -> {resolution: activation} for the decoder."""

    def __init__(self, H):
        super().__init__()
        self.widths = width_settings(H.width, H.custom_width_str)
        self.in_conv = conv(H.image_channels, self.widths[H.image_size], 3)
        layers = parse_layer_string(H.enc_blocks)
        blocks = []
        for res, down_rate in layers:
            w = self.widths[res]
            blocks.append(Block(w, int(w * H.bottleneck_multiple), w, down_rate=down_rate,
                                residual=True, use_3x3=res > 2))
        for block in blocks:  # keep the residual stream's variance bounded with depth
            block.c4.weight.data *= math.sqrt(1 / len(layers))
        self.enc_blocks = nn.ModuleList(blocks)

    def forward(self, x):
        x = self.in_conv(x.permute(0, 3, 1, 2).contiguous())
        activations = {x.shape[2]: x}
        for block in self.enc_blocks:
            x = block(x)
            res = x.shape[2]
            if x.shape[1] != self.widths[res]:
                x = pad_channels(x, self.widths[res])
            activations[res] = x
        return activations


class DecBlock(nn.Module):
    """One top-down block: prior p(z|x), posterior q(z|x, acts), and a residual update."""

    def __init__(self, H, res: int, mixin: int | None, n_blocks: int):
        super().__init__()
        self.base = res
        self.mixin = mixin
        self.zdim = H.zdim
        self.widths = width_settings(H.width, H.custom_width_str)
        width = self.widths[res]
        cond = int(width * H.bottleneck_multiple)
        use_3x3 = res > 2
        self.enc = Block(width * 2, cond, H.zdim * 2, use_3x3=use_3x3)
        self.prior = Block(width, cond, H.zdim * 2 + width, use_3x3=use_3x3, zero_last=True)
        self.z_proj = conv(H.zdim, width, 1)
        self.z_proj.weight.data *= math.sqrt(1 / n_blocks)
        self.resnet = Block(width, cond, width, residual=True, use_3x3=use_3x3)
        self.resnet.c4.weight.data *= math.sqrt(1 / n_blocks)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.zdim, self.base, self.base)

    def _state_in(self, xs: dict, n: int, ref: torch.Tensor) -> torch.Tensor:
        """The running state at this resolution (+ upsampled mix-in), batch size n."""
        x = xs.get(self.base)
        if x is None:
            x = ref.new_zeros((n, self.widths[self.base], self.base, self.base))
        elif x.shape[0] != n:
            x = x.expand(n, -1, -1, -1)
        if self.mixin is not None:
            low = xs[self.mixin][:, : x.shape[1]]
            x = x + F.interpolate(low, scale_factor=self.base // self.mixin)
        return x

    def _prior(self, x):
        feats = self.prior(x)
        z = self.zdim
        return feats[:, :z], feats[:, z:2 * z], x + feats[:, 2 * z:]

    def _finish(self, xs, x, z):
        xs[self.base] = self.resnet(x + self.z_proj(z))
        return xs

    def forward(self, xs, activations, mode: str = "sample", generator=None):
        """Posterior pass. Returns (xs, z, kl); `mode` "mean" uses the posterior mean as z."""
        acts = activations[self.base]
        x = self._state_in(xs, acts.shape[0], acts)
        qm, qv = self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        pm, pv, x = self._prior(x)
        z = qm if mode == "mean" else gaussian_sample(qm, qv, generator)
        kl = gaussian_kl(qm, pm, qv, pv)
        return self._finish(xs, x, z), z, kl

    def forward_uncond(self, xs, n: int, t: float | None = None, z=None, generator=None):
        """Prior pass: use the given latent `z`, or draw one from the prior at temperature t."""
        ref = next(iter(xs.values()))
        x = self._state_in(xs, n, ref)
        pm, pv, x = self._prior(x)
        if z is None:
            if t is not None:
                pv = pv + math.log(t)
            z = gaussian_sample(pm, pv, generator)
        return self._finish(xs, x, z)


class Decoder(nn.Module):
    """Top-down pass over all decoder blocks, then the mixture-of-logistics output head."""

    def __init__(self, H):
        super().__init__()
        self.image_size = H.image_size
        self.widths = width_settings(H.width, H.custom_width_str)
        layers = parse_layer_string(H.dec_blocks)
        self.dec_blocks = nn.ModuleList(DecBlock(H, res, mixin, len(layers)) for res, mixin in layers)
        self.resolutions = sorted({res for res, _ in layers})
        self.bias_xs = nn.ParameterList(
            nn.Parameter(torch.zeros(1, self.widths[res], res, res))
            for res in self.resolutions if res <= H.no_bias_above)
        self.out_net = DmolNet(H)
        self.gain = nn.Parameter(torch.ones(1, H.width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, H.width, 1, 1))

    def initial_state(self, n: int | None = None) -> dict:
        """{resolution: learned bias}; expanded to batch n when given."""
        return {b.shape[2]: (b if n is None else b.expand(n, -1, -1, -1)) for b in self.bias_xs}

    def final(self, xs) -> torch.Tensor:
        return xs[self.image_size] * self.gain + self.bias


# ---------------------------------------------------------------------------------------------
# Discretised mixture of logistics (PixelCNN++ output, 3 autoregressive colour channels)


class DmolNet(nn.Module):
    """1x1 conv to mixture parameters; loss and sampling for 8-bit RGB in [-1, 1].

    Channel layout of the 10 * M outputs (M = num_mixtures), NHWC: M mixture logits, then per
    colour channel c (3) the blocks [means (M) | log-scales (M) | coefficients (M)].
    """

    def __init__(self, H):
        super().__init__()
        self.num_mixtures = H.num_mixtures
        self.out_conv = conv(H.width, H.num_mixtures * 10, 1)

    def forward(self, px_z):
        return self.out_conv(px_z).permute(0, 2, 3, 1)

    def _params(self, px_z):
        out = self.forward(px_z)
        m = self.num_mixtures
        logits = out[..., :m]
        rest = out[..., m:].reshape(*out.shape[:3], 3, 3 * m)
        means = rest[..., :m]
        log_scales = rest[..., m:2 * m].clamp(min=-7.0)
        coeffs = torch.tanh(rest[..., 2 * m:])
        return logits, means, log_scales, coeffs

    def nll(self, px_z, x):
        """Negative log-likelihood per dimension (nats), x NHWC in [-1, 1]; shape [N]."""
        logits, means, log_scales, coeffs = self._params(px_z)
        x = x.unsqueeze(-1)  # N,H,W,3,1 broadcast over mixtures
        m0 = means[..., 0, :]
        m1 = means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]
        m2 = means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]
        centered = x - torch.stack([m0, m1, m2], dim=3)
        inv_s = torch.exp(-log_scales)
        half_bin = 1.0 / 255.0
        plus_in = inv_s * (centered + half_bin)
        min_in = inv_s * (centered - half_bin)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # for x at 0
        log_one_minus_cdf_min = -F.softplus(min_in)  # for x at 255
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)  # fallback: density x bin
        log_inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                                log_pdf_mid - math.log(127.5))
        log_probs = torch.where(x < -0.999, log_cdf_plus,
                                torch.where(x > 0.999, log_one_minus_cdf_min, log_inner))
        log_probs = log_probs.sum(dim=3) + F.log_softmax(logits, dim=-1)
        per_pixel = torch.logsumexp(log_probs, dim=-1)  # N,H,W
        return -per_pixel.sum(dim=(1, 2)) / (x.shape[1] * x.shape[2] * x.shape[3])

    def sample(self, px_z, generator=None, pixels: str = "sample") -> torch.Tensor:
        """Image NHWC float in [-1, 1]. `pixels`: "sample" (reference) or "mode" (deterministic:
        the most likely component's centre)."""
        logits, means, log_scales, coeffs = self._params(px_z)
        if pixels == "sample":
            u = noise_tape.rand(logits.shape, generator, device=logits.device,
                                dtype=logits.dtype) * (1 - 2e-5) + 1e-5
            logits = logits - torch.log(-torch.log(u))  # Gumbel-max picks a component
        pick = F.one_hot(logits.argmax(dim=-1), self.num_mixtures).to(means.dtype).unsqueeze(3)
        mean = (means * pick).sum(-1)
        log_s = (log_scales * pick).sum(-1)
        coef = (coeffs * pick).sum(-1)
        if pixels == "sample":
            u = noise_tape.rand(mean.shape, generator, device=mean.device,
                                dtype=mean.dtype) * (1 - 2e-5) + 1e-5
            mean = mean + torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))
        x0 = mean[..., 0].clamp(-1, 1)
        x1 = (mean[..., 1] + coef[..., 0] * x0).clamp(-1, 1)
        x2 = (mean[..., 2] + coef[..., 1] * x0 + coef[..., 2] * x1).clamp(-1, 1)
        return torch.stack([x0, x1, x2], dim=-1)
