"""How the refiner runs its UNet: one small interface, several engines behind it.

A backend is a callable `(latents [B,4,h,w], t, context [B,77+257,D]) -> noise prediction
[B,4,h,w]` for the dual-attention image UNet, with the mix ratio already set. The refiner's
loop only ever calls this, so a faster engine drops in without touching the loop:

- `torch`: the diffusers module, eager (optionally `torch.compile`d). The reference.
- `onnx`, `tensorrt`: provided by their own modules (`unet_onnx`, `unet_tensorrt`), each with
  a `make_backend(unet, **options)` function; `make_backend` imports them lazily and says
  clearly when one is not available in this installation.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import torch

from .errors import UserError

# Engines that live in their own modules (exporters and runtimes are heavy, optional imports).
EXTERNAL_BACKENDS = {
    "onnx": "spikevaediff.core.unet_onnx",
    "tensorrt": "spikevaediff.core.unet_tensorrt",
}
BACKEND_NAMES = ("torch",) + tuple(EXTERNAL_BACKENDS)


class UNetBackend(ABC):
    """Runs the dual-attention UNet once: noise prediction for a batch of latents."""

    name: str = "abstract"

    @abstractmethod
    def __call__(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """latents [B,4,h,w], scalar timestep `t`, context [B, 77+257, D] -> noise [B,4,h,w]."""

    def describe(self) -> str:
        """One line for logs and benchmark tables."""
        return self.name


class TorchUNetBackend(UNetBackend):
    """The diffusers UNet itself, eager or compiled with `torch.compile`.

    `compile`: False (eager), True (torch.compile's default mode) or a torch.compile mode name;
    "reduce-overhead" replays the whole step as one CUDA graph on a GPU, the closest torch
    gets to a static-shape TensorRT engine. A graph's outputs live in memory the next replay
    overwrites, so this backend hands back a copy in that mode.
    """

    name = "torch"
    COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

    def __init__(self, unet: torch.nn.Module, compile: bool | str = False):
        if compile is True:
            compile = "default"
        if compile and compile not in self.COMPILE_MODES:
            raise UserError(f"unknown torch.compile mode '{compile}' (choose from {', '.join(self.COMPILE_MODES)})")
        self.unet = unet
        self.compile_mode = compile or None
        self._graphs = compile in ("reduce-overhead", "max-autotune")
        self._forward = torch.compile(unet, mode=compile) if compile else unet

    @property
    def compiled(self) -> bool:
        return self.compile_mode is not None

    @torch.no_grad()
    def __call__(self, latents, t, context):
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self._forward(latents, t, encoder_hidden_states=context, return_dict=False)[0].clone()
        return self._forward(latents, t, encoder_hidden_states=context, return_dict=False)[0]

    def describe(self) -> str:
        if not self.compiled:
            return "torch (eager)"
        return "torch (compiled)" if self.compile_mode == "default" else f"torch (compiled, {self.compile_mode})"


def make_backend(name: str, unet: torch.nn.Module, **options) -> UNetBackend:
    """Build the backend called `name` around `unet` (options go to the engine's constructor).

    Raises UserError for an unknown name, or for a known engine that is not available here.
    """
    if name == "torch":
        return TorchUNetBackend(unet, **options)
    if name not in EXTERNAL_BACKENDS:
        raise UserError(f"unknown UNet backend '{name}' (choose from {', '.join(BACKEND_NAMES)})")
    module_name = EXTERNAL_BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise UserError(f"the '{name}' UNet backend is not available in this installation; "
                            "use --backend torch") from exc
        raise UserError(f"the '{name}' UNet backend needs '{exc.name}', which is not installed; "
                        "use --backend torch") from exc
    return module.make_backend(unet, **options)
