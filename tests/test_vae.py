"""The plain single-latent VAE baseline: same API as the VDVAE, checkpoints, profile loading."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from spikevaediff.core.config import ModelProfile
from spikevaediff.core.errors import UserError
from spikevaediff.core.metrics import pixcorr
from spikevaediff.core.vae import VAE_HPARAMS, PlainVAE, load_vae
from spikevaediff.core.vdvae import VDVAE, load_autoencoder, to_model_images

torch.set_num_threads(1)

SMALL = dataclasses.replace(VAE_HPARAMS["tiny"], image_size=32, width=8, zdim=16,
                            custom_width_str="16:16,8:16,4:16")


def test_same_api_as_the_vdvae():
    model = PlainVAE("tiny").eval()
    assert model.n_latent_blocks == 1
    assert model.latent_shapes() == [(VAE_HPARAMS["tiny"].zdim, 1, 1)]
    assert model.latent_dim() == VAE_HPARAMS["tiny"].zdim
    n_vae = sum(p.numel() for p in model.parameters())
    n_vdvae = sum(p.numel() for p in VDVAE("tiny").parameters())
    assert 0.4 < n_vae / n_vdvae < 2.5  # "of similar size"
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    z = model.encode_latents(frames)
    assert z.shape == (3, model.latent_dim()) and z.dtype == torch.float32
    images = model.decode_latents(z, seed=1)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, model.decode_latents(z, seed=1))
    with pytest.raises(UserError, match="k must be"):
        model.latent_dim(k=2)


def test_checkpoint_round_trip_and_dispatch(tmp_path):
    torch.manual_seed(0)
    model = PlainVAE(SMALL).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    path = tmp_path / "vae.th"
    model.save_checkpoint(path)
    loaded = load_autoencoder(path)  # the .json says arch "vae"
    assert isinstance(loaded, PlainVAE) and loaded.hparams == SMALL
    z = torch.randn(2, loaded.latent_dim())
    np.testing.assert_array_equal(loaded.decode_latents(z, seed=0), model.decode_latents(z, seed=0))
    with pytest.raises(UserError, match="not a VDVAE"):
        VDVAE.from_checkpoint(path)
    assert isinstance(load_vae(ModelProfile("tiny", overrides={"vae": path})), PlainVAE)


def test_load_vae_without_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        load_vae(ModelProfile("tiny", weights_dir=tmp_path))


def test_brief_training_makes_the_latent_carry_the_image():
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(272, 1, 3, 3, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
    images = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    train, held_out = images[:256], images[256:]
    model = PlainVAE(SMALL)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_all = to_model_images(train, 32)
    for _ in range(80):  # the full ELBO (KL weight 1), as train-vdvae trains it
        x = x_all[torch.randint(0, len(x_all), (16,), generator=g)]
        loss = model.elbo(x)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
    model.eval()
    recon = model.reconstruct(held_out, pixels="mode")[..., 0]
    prior = model.sample_prior(len(held_out), pixels="mode")[..., 0]
    r_recon, r_prior = pixcorr(recon, held_out).mean(), pixcorr(prior, held_out).mean()
    assert r_recon > 0.5 and r_recon > r_prior + 0.3, (r_recon, r_prior)


def test_cli_trains_the_baseline_with_arch_vae(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (12, 40, 80), dtype=np.uint8)
    np.save(tmp_path / "frames.npy", frames)
    out = tmp_path / "vae-tiny"
    cmd = [sys.executable, "-m", "spikevaediff.services.cli", "train-vdvae", "--frames",
           str(tmp_path / "frames.npy"), "--out", str(out), "--arch", "vae", "--minutes", "0.5",
           "--max-steps", "2", "--threads", "1", "--batch-size", "4", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    meta = json.loads((out / "vae.json").read_text())
    assert meta["arch"] == "vae" and meta["n_latent_blocks"] == 1
    assert json.loads((out / "metrics.json").read_text())["arch"] == "vae"
    assert isinstance(load_autoencoder(out / "vae.th"), PlainVAE)
