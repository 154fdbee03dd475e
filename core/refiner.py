"""Stage 2: Versatile Diffusion dual-guided image-to-image, as one readable loop.

    preview uint8 [64,64,3] --bicubic--> 512x512 --VAE encode (x0.18215)--> z0
    z_T = add_noise(z0, noise, first kept timestep)          # `strength` of the schedule
    for t in kept timesteps:                                  # classifier-free guidance
        eps_u, eps_c = UNet([z_t, z_t], t, [uncond, cond])    # context = text(77) ++ image(257)
        z_t = scheduler.step(eps_u + g * (eps_c - eps_u), t, z_t)
    image = VAE decode(z / 0.18215)

Vision and text are mixed inside every cross-attention layer (dual transformers, text share 0.4).
The paper's settings are the defaults (DDIM, 50 steps x strength 0.75 = 37 denoising steps,
guidance 7.5, eta 0); DPM-Solver++ and UniPC give good images in far fewer steps. At strength 1.0
the start is pure noise, which makes the loop identical to diffusers'
`VersatileDiffusionDualGuidedPipeline` (the parity test holds us to it).
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from .config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS, ModelProfile
from .errors import UserError

log = logging.getLogger(__name__)

SCHEDULER_NAMES = ("ddim", "dpmsolver++", "unipc")


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler of kind `name` on the model's noise schedule (`base_config`)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(base_config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++")
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(base_config)
    raise UserError(f"unknown scheduler '{name}' (choose from {', '.join(SCHEDULER_NAMES)})")


def img2img_schedule(name: str, base_config: dict, steps: int, strength: float, device="cpu"):
    """(fresh scheduler, kept timesteps): the last `int(steps * strength)` steps of a `steps` schedule.

    As diffusers' image-to-image pipelines: DDIM 50 x 0.75 keeps 37 steps, starting at step 13.
    """
    scheduler = make_scheduler(name, base_config)
    scheduler.set_timesteps(steps, device=device)
    kept = min(int(steps * strength), steps)
    start = (steps - kept) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)  # multistep solvers must know where they join the schedule
    return scheduler, scheduler.timesteps[start:]


@dataclass(frozen=True)
class RefinerSettings:
    """How the refiner samples. `steps` is the full schedule; `int(steps * strength)` are run."""

    scheduler: str = "ddim"
    steps: int = 50
    strength: float = 0.75
    guidance_scale: float = 7.5
    text_share: float = 0.4
    eta: float = 0.0
    image_size: int = 512

    def __post_init__(self):
        if self.scheduler not in SCHEDULER_NAMES:
            raise UserError(f"unknown scheduler '{self.scheduler}' (choose from {', '.join(SCHEDULER_NAMES)})")
        if int(self.steps) < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 < float(self.strength) <= 1.0:
            raise UserError(f"strength must be in (0, 1], got {self.strength}")
        if int(self.steps * self.strength) < 1:
            raise UserError(f"{self.steps} steps x strength {self.strength} leaves no denoising step")
        if not 0.0 <= float(self.text_share) <= 1.0:
            raise UserError(f"text_share must be in [0, 1], got {self.text_share}")
        if float(self.guidance_scale) < 0:
            raise UserError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if int(self.image_size) < 8 or int(self.image_size) % 8:
            raise UserError(f"image_size must be a positive multiple of 8, got {self.image_size}")


class Refiner:
    """Refine VDVAE previews into 512x512 images guided by predicted CLIP embeddings.

    `Refiner(profile)` loads the profile's Versatile Diffusion folder (MissingWeightsError if
    absent) onto `device` (default: the profile's); `Refiner.from_components(components)` uses
    already-loaded parts (tests, services). `backend` picks the UNet engine (`unet_backends`).
    """

    def __init__(self, profile: ModelProfile, scheduler: str = "ddim", steps: int = 50,
                 strength: float = 0.75, guidance_scale: float = 7.5, text_share: float = 0.4,
                 device: str | None = None, backend: str = "torch", image_size: int = 512,
                 dtype: torch.dtype | None = None, backend_options: dict | None = None):
        from .vd_loader import load_versatile_diffusion

        device = device or profile.device
        settings = RefinerSettings(scheduler, int(steps), float(strength), float(guidance_scale),
                                   float(text_share), image_size=int(image_size))
        profile.require("versatile_diffusion")
        components = load_versatile_diffusion(profile.path("versatile_diffusion"), device=device, dtype=dtype)
        self._setup(components, settings, device, backend, backend_options or {})

    @classmethod
    def from_components(cls, components, scheduler: str = "ddim", steps: int = 50, strength: float = 0.75,
                        guidance_scale: float = 7.5, text_share: float = 0.4, device: str = "cpu",
                        backend: str = "torch", image_size: int = 512,
                        backend_options: dict | None = None) -> "Refiner":
        """A refiner around loaded `VDComponents` (moved to `device`)."""
        settings = RefinerSettings(scheduler, int(steps), float(strength), float(guidance_scale),
                                   float(text_share), image_size=int(image_size))
        self = cls.__new__(cls)
        self._setup(components.to(device=device), settings, device, backend, backend_options or {})
        return self

    def _setup(self, components, settings: RefinerSettings, device, backend: str, backend_options: dict):
        from .unet_backends import make_backend
        from .vd_compat import dual_transformers, set_mix_ratio

        if not dual_transformers(components.image_unet):
            raise UserError("the image UNet has no dual attention; load it with load_versatile_diffusion")
        self.components = components
        self.settings = settings
        self.device = torch.device(device)
        self.embed_dim = components.embed_dim
        self.dtype = components.image_unet.dtype
        set_mix_ratio(components.image_unet, settings.text_share)
        self.backend = make_backend(backend, components.image_unet, **backend_options)
        self._uncond: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_timings: dict[str, float] = {}

    # ----- settings and conditioning -----

    def configure(self, **changes) -> RefinerSettings:
        """Change settings (validated); the text share is applied to every dual transformer."""
        from .vd_compat import set_mix_ratio

        self.settings = replace(self.settings, **changes)
        if "text_share" in changes:
            set_mix_ratio(self.components.image_unet, self.settings.text_share)
        return self.settings

    def unconditional(self) -> tuple[np.ndarray, np.ndarray]:
        """(vision_uncond [257, D], text_uncond [77, D]): CLIP-Vision of mid-grey, CLIP-Text of ""."""
        vision, text = self._unconditional()
        return vision.float().cpu().numpy(), text.float().cpu().numpy()

    def set_unconditional(self, vision, text) -> None:
        """Use these unconditional embeddings instead (e.g. a reference implementation's own)."""
        vision, text = self._check_embeddings(vision, text, batch=None)
        self._uncond = (vision[0], text[0])

    def _unconditional(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._uncond is None:
            from .vd_embeddings import unconditional_embeddings

            vision, text = unconditional_embeddings(self.components)
            self._uncond = (vision.to(self.device, self.dtype), text.to(self.device, self.dtype))
        return self._uncond

    # ----- schedule -----

    def _schedule(self, steps: int, strength: float):
        return img2img_schedule(self.settings.scheduler, self.components.scheduler_config, steps, strength,
                                self.device)

    def unet_evaluations(self, steps: int | None = None, strength: float | None = None) -> int:
        """UNet evaluations per image: kept steps, x2 with classifier-free guidance (cond + uncond)."""
        settings = replace(self.settings, **{k: v for k, v in (("steps", steps), ("strength", strength))
                                             if v is not None})
        _, timesteps = self._schedule(settings.steps, settings.strength)
        return len(timesteps) * (2 if self._guided() else 1)

    def _guided(self) -> bool:
        return self.settings.guidance_scale > 1.0

    # ----- the loop -----

    @torch.no_grad()
    def refine(self, preview, vision, text, seed: int = 0, strength: float | None = None,
               steps: int | None = None, output_type: str = "uint8") -> np.ndarray:
        """Refine `preview` (uint8 [H,W,3] or [N,H,W,3]) guided by `vision` [(N,)257,D] and `text` [(N,)77,D].

        Returns uint8 [S,S,3] (or [N,S,S,3]), S = image_size (512); `output_type="float"` gives
        float32 in [0, 1]. The same seed and inputs give the same image. The preview enters as the
        mode of the VAE posterior, so all randomness is the seeded noise (drawn on the CPU, hence
        the same on any device). `strength` / `steps` override the settings for this call.
        """
        settings = replace(self.settings, **{k: v for k, v in (("steps", steps), ("strength", strength))
                                             if v is not None})
        if output_type not in ("uint8", "float"):
            raise UserError(f"output_type must be 'uint8' or 'float', got '{output_type}'")
        previews, single = self._check_preview(preview)
        vision_t, text_t = self._check_embeddings(vision, text, batch=len(previews))
        timings = {}
        start = time.perf_counter()

        scheduler, timesteps = self._schedule(settings.steps, settings.strength)
        context = torch.cat([text_t, vision_t], dim=1)  # text tokens first, then image tokens
        if self._guided():
            vision_u, text_u = self._unconditional()
            uncond = torch.cat([text_u, vision_u], dim=0).expand(len(previews), -1, -1)
            context = torch.cat([uncond, context])  # [uncond batch, cond batch], as diffusers

        generator = torch.Generator(device="cpu").manual_seed(int(seed))  # same noise on any device
        latents = self._start_latents(previews, settings, scheduler, timesteps, generator)
        timings["encode_ms"] = (time.perf_counter() - start) * 1e3

        step_kwargs = {}
        step_params = set(inspect.signature(scheduler.step).parameters)
        if "eta" in step_params:
            step_kwargs["eta"] = settings.eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator
        t0 = time.perf_counter()
        for t in timesteps:
            model_input = torch.cat([latents] * 2) if self._guided() else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self.backend(model_input, t, context)
            if self._guided():
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + settings.guidance_scale * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents, **step_kwargs).prev_sample
        timings["denoise_ms"] = (time.perf_counter() - t0) * 1e3
        timings["unet_calls"] = len(timesteps)

        t0 = time.perf_counter()
        vae = self.components.vae
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        timings["decode_ms"] = (time.perf_counter() - t0) * 1e3
        timings["total_ms"] = (time.perf_counter() - start) * 1e3
        self.last_timings = timings
        if output_type == "uint8":
            images = (images * 255).round().astype(np.uint8)
        return images[0] if single else images

    def _start_latents(self, previews: np.ndarray, settings, scheduler, timesteps, generator):
        """Noised VAE latents of the upsampled previews, or pure noise at strength 1.0."""
        from diffusers.utils.torch_utils import randn_tensor

        size = settings.image_size
        shape = (len(previews), self.components.vae.config.latent_channels, size // 8, size // 8)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        if settings.strength >= 1.0:
            return noise * scheduler.init_noise_sigma
        pixels = self._upsample(previews, size)
        vae = self.components.vae
        # The posterior mode: the start image is deterministic, all randomness is in `noise`.
        clean = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        return scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(previews)))

    def _upsample(self, previews: np.ndarray, size: int) -> torch.Tensor:
        """uint8 [N,h,w,3] -> float [N,3,size,size] in [-1, 1], bicubic like Brain-Diffuser (PIL)."""
        from PIL import Image

        resized = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in previews])
        pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return pixels.to(self.device, self.dtype)

    # ----- input checks (user-facing: one clear line) -----

    @staticmethod
    def _check_preview(preview) -> tuple[np.ndarray, bool]:
        preview = np.asarray(preview)
        single = preview.ndim == 3
        batch = preview[None] if single else preview
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.shape[0] < 1:
            raise UserError(f"preview must be uint8 [H,W,3] or [N,H,W,3], got shape {tuple(preview.shape)}")
        if batch.dtype != np.uint8:
            raise UserError(f"preview must be uint8, got {batch.dtype}")
        return batch, single

    def _check_embeddings(self, vision, text, batch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        def as_batch(x, tokens: int, what: str) -> torch.Tensor:
            try:
                # a copy: received arrays are read-only views, which torch warns about
                x = torch.from_numpy(np.array(x.detach().float().cpu() if torch.is_tensor(x) else x,
                                              dtype=np.float32))
            except (TypeError, ValueError) as exc:
                raise UserError(f"{what} embedding is not a numeric array ({exc})") from exc
            x = x[None] if x.ndim == 2 else x
            if x.ndim != 3 or tuple(x.shape[1:]) != (tokens, self.embed_dim):
                raise UserError(f"{what} embedding must be [{tokens},{self.embed_dim}] or "
                                f"[N,{tokens},{self.embed_dim}], got {tuple(x.shape)}")
            if batch is not None and x.shape[0] != batch:
                raise UserError(f"{what} embedding has batch {x.shape[0]} but there are {batch} preview(s)")
            if not torch.isfinite(x).all():
                raise UserError(f"{what} embedding has non-finite values")
            return x.to(self.device, self.dtype)

        return as_batch(vision, CLIP_IMAGE_TOKENS, "vision"), as_batch(text, CLIP_TEXT_TOKENS, "text")
