"""The live preview: one bin's predicted latents -> a uint8 image, as fast as the device allows.

`PreviewDecoder(model)(latents)` gives exactly `model.decode_latents(latents[None], ...)[0]`.
With a fixed seed every call makes the same random draws (prior blocks past k, pixel noise),
so they are recorded once on a `NoiseTape` and replayed. On a CUDA device the whole decode is
then captured as one CUDA graph and replayed per bin: the imagenet64 VDVAE at batch 1 is 75
blocks of small kernels, bound by launch overhead (measured on an H200: 50 ms eager against
the 33 ms a 30 Hz bin allows). Elsewhere the decode runs eagerly with the replayed draws.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .errors import UserError
from .noise_tape import NoiseTape
from .vdvae import LatentImageModel, _generator, from_unit_range

log = logging.getLogger(__name__)


class PreviewDecoder:
    """Decode one bin's flat latents [latent_dim(k)] to uint8 [S, S, 3].

    `seed` None means fresh noise every call (no tape, no graph). `cuda_graph`: None (on when
    the model is on a CUDA device and the seed is fixed), True or False.
    """

    def __init__(self, model: LatentImageModel, k: int | None = None, temperature: float = 1.0,
                 seed: int | None = 0, pixels: str = "mode", cuda_graph: bool | None = None):
        if pixels not in ("sample", "mode"):
            raise UserError(f"pixels must be 'sample' or 'mode', got {pixels!r}")
        self.model = model
        self.k = model._k(k)
        self.temperature = float(temperature)
        self.seed = seed
        self.pixels = pixels
        self.latent_dim = model.latent_dim(self.k)
        on_cuda = model.device.type == "cuda"
        if cuda_graph and (not on_cuda or seed is None):
            raise UserError("a CUDA-graph preview needs the model on a CUDA device and a fixed seed")
        if cuda_graph is None:
            cuda_graph = on_cuda and seed is not None
        self._tape = None
        self._graph = None
        if seed is not None:
            self._tape = NoiseTape(_generator(model.device, seed))
            with torch.inference_mode():  # the recording call: its draws are the seeded ones
                self._forward(torch.zeros(1, self.latent_dim, device=model.device, dtype=model.dtype))
            self._tape.rewind()
        if cuda_graph:
            self._capture()

    def describe(self) -> str:
        how = "CUDA graph" if self._graph is not None else "eager"
        return f"{self.model.arch} preview, k={self.k}, {how} on {self.model.device}"

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        if self._tape is not None and not self._tape.recording:
            self._tape.rewind()  # every call replays the draws from the first
        zs = self.model.split_latents(z, self.k)
        generator = self._tape if self._tape is not None else _generator(self.model.device, None)
        return self.model._decode(zs, self.temperature, generator, self.pixels)

    def _capture(self) -> None:
        """Warm up on a side stream (as CUDA graph capture requires), then capture one decode."""
        self._static_in = torch.zeros(1, self.latent_dim, device=self.model.device, dtype=self.model.dtype)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                self._forward(self._static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self._graph):
            self._static_out = self._forward(self._static_in)
        log.info("captured the preview decode as a CUDA graph")

    def __call__(self, latents) -> np.ndarray:
        z = torch.as_tensor(latents)
        if z.numel() != self.latent_dim:
            raise UserError(f"a preview needs {self.latent_dim} latent values (k={self.k}), got {z.numel()}")
        z = z.reshape(1, self.latent_dim)
        with torch.inference_mode():
            if self._graph is not None:
                self._static_in.copy_(z)
                self._graph.replay()
                return from_unit_range(self._static_out)[0]
            return from_unit_range(self._forward(z.to(self.model.device, self.model.dtype)))[0]
