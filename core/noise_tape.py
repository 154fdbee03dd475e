"""Seeded random draws that can be recorded once and played back: what makes a preview graphable.

The stage-1 models draw noise through `randn` / `rand` below, passing a `torch.Generator`
or a `NoiseTape` where torch takes a generator. A tape wraps a seeded generator: while
recording it draws from the generator and keeps every tensor; after `rewind()` it hands the
same tensors back in the same order. A decode with a fixed seed (the live preview) thus makes
the same draws on every call, and with them played back from fixed tensors its whole forward
pass can be captured as one CUDA graph (see `core.preview`).
"""
from __future__ import annotations

import torch


class NoiseTape:
    """Records the draws of `generator` (None: torch's global one), then replays them."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator
        self.draws: list[torch.Tensor] = []
        self.recording = True
        self._next = 0

    def rewind(self) -> "NoiseTape":
        """Stop recording; the next draws replay the recorded ones from the first."""
        self.recording = False
        self._next = 0
        return self

    def draw(self, kind: str, shape, device, dtype) -> torch.Tensor:
        if self.recording:
            fn = torch.randn if kind == "normal" else torch.rand
            tensor = fn(tuple(shape), generator=self.generator, device=device, dtype=dtype)
            self.draws.append(tensor)
            return tensor
        if self._next >= len(self.draws):
            raise RuntimeError("the noise tape ran out: this call draws more than the recorded one")
        tensor = self.draws[self._next]
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"the noise tape holds a draw of shape {tuple(tensor.shape)} "
                               f"where {tuple(shape)} is asked for: the call differs from the recorded one")
        self._next += 1
        return tensor


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal draws from a generator or a tape."""
    if isinstance(generator, NoiseTape):
        return generator.draw("normal", shape, device, dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def rand(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) draws from a generator or a tape."""
    if isinstance(generator, NoiseTape):
        return generator.draw("uniform", shape, device, dtype)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)
