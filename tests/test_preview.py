"""The live preview decoder: the same image as decode_latents with the same seed, from recorded
draws (and, on a CUDA device, from one captured CUDA graph)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spikevaediff.core.errors import UserError
from spikevaediff.core.noise_tape import NoiseTape
from spikevaediff.core.preview import PreviewDecoder
from spikevaediff.core.vae import PlainVAE
from spikevaediff.core.vdvae import VDVAE

torch.set_num_threads(1)


def random_latents(model, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, model.latent_dim(), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pixels", ["mode", "sample"])
def test_vdvae_preview_matches_decode_latents_for_every_bin(pixels):
    torch.manual_seed(0)
    model = VDVAE("tiny").eval()
    preview = PreviewDecoder(model, seed=3, pixels=pixels)
    assert preview._tape is not None and preview._tape.draws  # prior blocks past k draw noise
    for z in random_latents(model, 3):  # different bins, same replayed draws
        expected = model.decode_latents(z[None], seed=3, pixels=pixels)[0]
        np.testing.assert_array_equal(preview(z.numpy()), expected)


def test_plain_vae_preview_matches_decode_latents():
    torch.manual_seed(0)
    model = PlainVAE("tiny").eval()
    preview = PreviewDecoder(model, seed=0, pixels="sample")
    z = random_latents(model, 1)[0]
    np.testing.assert_array_equal(preview(z), model.decode_latents(z[None], seed=0, pixels="sample")[0])


def test_unseeded_preview_draws_fresh_noise_and_wrong_sizes_are_user_errors():
    torch.manual_seed(0)
    model = VDVAE("tiny").eval()
    preview = PreviewDecoder(model, seed=None, pixels="sample")
    z = random_latents(model, 1)[0]
    assert not np.array_equal(preview(z), preview(z))
    with pytest.raises(UserError, match="latent values"):
        preview(np.zeros(model.latent_dim() + 1, np.float32))
    with pytest.raises(UserError, match="CUDA"):
        PreviewDecoder(model, seed=0, cuda_graph=True)  # the model is on the CPU


def test_noise_tape_refuses_a_call_that_differs_from_the_recorded_one():
    tape = NoiseTape(torch.Generator().manual_seed(0))
    first = tape.draw("normal", (2, 3), "cpu", torch.float32)
    tape.rewind()
    assert torch.equal(tape.draw("normal", (2, 3), "cpu", torch.float32), first)
    with pytest.raises(RuntimeError, match="ran out"):
        tape.draw("normal", (2, 3), "cpu", torch.float32)
    tape.rewind()
    with pytest.raises(RuntimeError, match="shape"):
        tape.draw("normal", (4,), "cpu", torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_preview_matches_eager_decode():
    torch.manual_seed(0)
    model = VDVAE("tiny").eval().cuda()
    preview = PreviewDecoder(model, seed=0)
    assert preview._graph is not None
    for z in random_latents(model, 3):
        expected = model.decode_latents(z[None].cuda(), seed=0)[0]
        np.testing.assert_array_equal(preview(z), expected)
