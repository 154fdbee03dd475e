"""The VDVAE: published architecture and key names, latent layout, checkpoints, and a tiny model
trained inside the test whose posterior latents carry the image."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from spikevaediff.core.config import ModelProfile
from spikevaediff.core.errors import MissingWeightsError, UserError
from spikevaediff.core.metrics import pixcorr
from spikevaediff.core.vdvae import (HPARAMS, VDVAE, bench_vdvae, load_autoencoder, load_vdvae,
                                     to_model_images)

torch.set_num_threads(1)

# Shapes in the published imagenet64-iter-1600000-model-ema.th state dict (width 512,
# bottleneck 128, zdim 16, 10 mixtures x 10 parameters).
PUBLISHED_SHAPES = {
    "encoder.in_conv.weight": (512, 3, 3, 3),
    "encoder.enc_blocks.0.c1.weight": (128, 512, 1, 1),
    "encoder.enc_blocks.0.c2.weight": (128, 128, 3, 3),
    "encoder.enc_blocks.59.c2.weight": (128, 128, 3, 3),  # the 4d4 block: 4x4 still uses 3x3
    "encoder.enc_blocks.64.c4.weight": (512, 128, 1, 1),
    "encoder.enc_blocks.64.c2.weight": (128, 128, 1, 1),  # 1x1 resolution: no 3x3
    "decoder.dec_blocks.0.enc.c1.weight": (128, 1024, 1, 1),
    "decoder.dec_blocks.0.enc.c4.weight": (32, 128, 1, 1),
    "decoder.dec_blocks.0.prior.c4.weight": (544, 128, 1, 1),
    "decoder.dec_blocks.0.z_proj.weight": (512, 16, 1, 1),
    "decoder.dec_blocks.2.resnet.c2.weight": (128, 128, 3, 3),
    "decoder.dec_blocks.74.prior.c4.bias": (544,),
    "decoder.bias_xs.0": (1, 512, 1, 1),
    "decoder.bias_xs.5": (1, 512, 64, 64),
    "decoder.out_net.out_conv.weight": (100, 512, 1, 1),
    "decoder.gain": (1, 512, 1, 1),
    "decoder.bias": (1, 512, 1, 1),
}


@pytest.fixture(scope="module")
def imagenet64_meta():
    """The published architecture without allocating its 125M parameters."""
    with torch.device("meta"):
        return VDVAE("imagenet64")


def narrow_imagenet64(width: int = 8):
    """imagenet64's block structure and zdim at a tiny width: same keys, same latent layout."""
    return dataclasses.replace(HPARAMS["imagenet64"], width=width)


def test_imagenet64_latent_layout(imagenet64_meta):
    m = imagenet64_meta
    assert len(m.decoder.dec_blocks) == 75 and len(m.encoder.enc_blocks) == 65
    assert m.n_latent_blocks == 31
    shapes = m.latent_shapes()
    expected = [(16, 1, 1)] * 2 + [(16, 4, 4)] * 4 + [(16, 8, 8)] * 8 + [(16, 16, 16)] * 16 + [(16, 32, 32)]
    assert shapes == expected
    assert m.latent_dim() == 91_168
    assert m.latent_dim(k=75) > m.latent_dim()
    n_params = sum(p.numel() for p in m.parameters())
    assert 120e6 < n_params < 130e6  # the published model has about 125M parameters


def test_imagenet64_published_key_names(imagenet64_meta):
    state = imagenet64_meta.state_dict()
    for key, shape in PUBLISHED_SHAPES.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("module.") for k in state)
    assert sum(k.startswith("decoder.bias_xs.") for k in state) == 6


def test_imagenet64_structure_encodes_91168_values_and_decodes():
    model = VDVAE(narrow_imagenet64()).eval()
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    z = model.encode_latents(images)
    assert z.shape == (2, 91_168) and z.dtype == torch.float32
    out = model.decode_latents(z)
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8


def test_state_dict_round_trip_under_published_names(tmp_path, imagenet64_meta):
    H = narrow_imagenet64()
    torch.manual_seed(1)
    model = VDVAE(H).eval()
    for p in model.parameters():  # make every tensor distinctive (zero inits would hide swaps)
        p.data.normal_()
    state = model.state_dict()
    assert set(state) == set(imagenet64_meta.state_dict())  # same names as the published file
    # Checkpoints saved from a DistributedDataParallel model carry a 'module.' prefix.
    path = tmp_path / "ckpt.th"
    torch.save({"module." + k: v for k, v in state.items()}, path)
    loaded = VDVAE.from_checkpoint(path, hparams=H)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    z = torch.randn(1, loaded.latent_dim())
    np.testing.assert_array_equal(loaded.decode_latents(z, seed=3), model.decode_latents(z, seed=3))


@pytest.mark.slow
def test_full_size_imagenet64_checkpoint_round_trip(tmp_path):
    model = VDVAE("imagenet64")
    path = tmp_path / "imagenet64-iter-1600000-model-ema.th"
    torch.save(model.state_dict(), path)
    del model
    loaded = VDVAE.from_checkpoint(path)  # no json beside it: the published hparams
    assert loaded.hparams == HPARAMS["imagenet64"] and loaded.latent_dim() == 91_168
    assert tuple(loaded.state_dict()["decoder.bias_xs.5"].shape) == (1, 512, 64, 64)


def test_checkpoint_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        VDVAE.from_checkpoint(tmp_path / "missing.th")
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable"):
        VDVAE.from_checkpoint(bad, hparams="imagenet64")
    tiny = tmp_path / "tiny.th"
    torch.save(VDVAE("tiny").state_dict(), tiny)
    with pytest.raises(UserError, match="does not match|wrong shape"):
        VDVAE.from_checkpoint(tiny, hparams=narrow_imagenet64())
    with pytest.raises(MissingWeightsError):
        load_vdvae(ModelProfile("tiny", weights_dir=tmp_path))


def test_image_inputs_grayscale_and_sizes():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    assert torch.equal(to_model_images(grey), torch.from_numpy(rgb))
    model = VDVAE("tiny").eval()
    torch.testing.assert_close(model.encode_latents(grey), model.encode_latents(torch.from_numpy(rgb)))
    assert to_model_images(rng.integers(0, 256, (2, 96, 192), dtype=np.uint8)).shape == (2, 64, 64, 3)
    with pytest.raises(UserError, match="uint8"):
        model.encode_latents(grey.astype(np.float32))
    with pytest.raises(UserError, match="latents must be"):
        model.decode_latents(torch.zeros(1, 5))
    with pytest.raises(UserError, match="k must be"):
        model.latent_dim(k=99)


def test_decode_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    model = VDVAE("tiny").eval()
    for p in model.parameters():  # a random model whose prior and output head are not all zero
        p.data.normal_(0, 0.05)
    z = torch.randn(2, model.latent_dim(k=2))
    a = model.decode_latents(z, k=2, seed=7)
    b = model.decode_latents(z, k=2, seed=7)
    c = model.decode_latents(z, k=2, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    s1 = model.encode_latents(images, mode="sample", seed=5)
    assert torch.equal(s1, model.encode_latents(images, mode="sample", seed=5))
    assert not torch.equal(s1, model.encode_latents(images, mode="mean"))


def smooth_images(n: int, seed: int) -> np.ndarray:
    """Low-frequency grayscale images (random smooth fields): structure a VAE learns in seconds."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=False)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()


def train_briefly(model, images: np.ndarray, steps: int, kl_weight: float, lr: float, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all = to_model_images(images, model.hparams.image_size)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = x_all[torch.randint(0, len(x_all), (16,), generator=g)]
        loss = model.elbo(x, kl_weight=kl_weight)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
    return model.eval()


# The tiny code path at 32x32 and width 8, so that training inside the test takes seconds.
TEST_TINY = dataclasses.replace(
    HPARAMS["tiny"], image_size=32, width=8, zdim=4, num_mixtures=2,
    custom_width_str="16:16,8:16,4:16,1:16", enc_blocks="32d2,16d2,8d2,4d4,1x1",
    dec_blocks="1x1,4m1,8m4,16m8,32m16", n_latent_blocks=3)


def test_tiny_vdvae_trained_in_test_reconstructs_from_its_own_latents():
    train = smooth_images(256, seed=0)
    model = train_briefly(VDVAE(TEST_TINY), train, steps=80, kl_weight=0.01, lr=5e-3)
    held_out = to_model_images(smooth_images(16, seed=10), 32)[..., 0].numpy()
    k_all = len(model.latent_shapes_all())
    z = model.encode_latents(held_out, k=k_all)
    recon = model.decode_latents(z, k=k_all, pixels="mode")
    prior = model.sample_prior(len(held_out), pixels="mode")
    assert recon.shape == (16, 32, 32, 3)
    r_recon = pixcorr(recon[..., 0], held_out).mean()
    r_prior = pixcorr(prior[..., 0], held_out).mean()
    assert r_recon > 0.5 and r_recon > r_prior + 0.3, (r_recon, r_prior)


def test_bench_reports_decode_ms_per_image():
    result = bench_vdvae(VDVAE("tiny").eval(), batch_sizes=(1, 2), repeats=1)
    assert result["decode_ms_per_image_b1"] > 0 and result["decode_ms_per_image_b2"] > 0
    assert result["latent_dim"] == VDVAE("tiny").latent_dim()


def write_image_folder(folder, n=14):
    from PIL import Image

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 1, 3, 6, generator=g)
    frames = torch.nn.functional.interpolate(coarse, size=(40, 80), mode="bilinear")
    for i, f in enumerate((frames[:, 0] * 255).byte().numpy()):
        Image.fromarray(f).save(folder / f"frame_{i:03d}.png")


def test_cli_trains_on_an_image_folder_and_writes_its_files(tmp_path):
    write_image_folder(tmp_path / "frames")
    out = tmp_path / "vdvae-tiny"
    cmd = [sys.executable, "-m", "spikevaediff.services.cli", "train-vdvae", "--frames",
           str(tmp_path / "frames"), "--out", str(out), "--minutes", "0.5", "--max-steps", "3",
           "--threads", "1", "--batch-size", "4", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for name in ("vdvae.th", "vdvae.json", "metrics.json", "reconstructions.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "vdvae.json").read_text())
    assert meta["arch"] == "vdvae" and meta["n_latent_blocks"] == HPARAMS["tiny"].n_latent_blocks
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3
    for key in ("posterior_k", "mean_frame", "prior_samples"):
        assert -1 <= metrics[key]["pixcorr"] <= 1 and "ssim" in metrics[key]
    model = load_vdvae(ModelProfile("tiny", overrides={"vdvae": out / "vdvae.th"}))
    assert isinstance(model, VDVAE) and not model.training
    assert load_autoencoder(out / "vdvae.th").latent_dim() == model.latent_dim()


def test_cli_reports_bad_frames_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "spikevaediff.services.cli", "train-vdvae", "--frames",
           str(tmp_path / "nope.npy"), "--out", str(tmp_path / "o")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "frames not found" in run.stderr and "Traceback" not in run.stderr


def test_gaussian_kl_matches_torch_distributions():
    from spikevaediff.core.vdvae_blocks import gaussian_kl

    g = torch.Generator().manual_seed(0)
    mq, mp, lq, lp = (torch.randn(50, generator=g) for _ in range(4))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mq, lq.exp()),
                                                 torch.distributions.Normal(mp, lp.exp()))
    torch.testing.assert_close(gaussian_kl(mq, mp, lq, lp), expected)


def constant_dmol(mean, log_scale, coeff):
    """A one-component DmolNet whose parameters are the same at every pixel."""
    from types import SimpleNamespace

    from spikevaediff.core.vdvae_blocks import DmolNet

    net = DmolNet(SimpleNamespace(width=1, num_mixtures=1))
    params = [0.0]  # the mixture logit
    for c in range(3):  # per colour channel: mean, log-scale, coefficient (pre-tanh)
        params += [mean[c], log_scale, coeff[c]]
    with torch.no_grad():
        net.out_conv.weight.zero_()
        net.out_conv.bias.copy_(torch.tensor(params))
    return net


def test_dmol_likelihood_is_the_discretised_logistic():
    net = constant_dmol(mean=[0.1, -0.2, 0.3], log_scale=-2.0, coeff=[0.0, 0.0, 0.0])
    x = torch.tensor([[[[0.0, 0.5, -1.0], [1.0, -0.3, 0.2]]]])  # N=1, H=1, W=2, C=3 in [-1, 1]
    s = np.exp(-2.0)
    means = torch.tensor([0.1, -0.2, 0.3])
    cdf = lambda v: torch.sigmoid((v - means) / s)  # noqa: E731
    logp = torch.where(x < -0.999, torch.log(cdf(x + 1 / 255)),
                       torch.where(x > 0.999, torch.log(1 - cdf(x - 1 / 255)),
                                   torch.log(cdf(x + 1 / 255) - cdf(x - 1 / 255))))
    expected = -logp.sum() / x.numel()
    got = net.nll(torch.zeros(1, 1, 1, 2), x)
    torch.testing.assert_close(got, expected.reshape(1), rtol=1e-5, atol=1e-6)


def test_dmol_mode_applies_the_colour_coefficients():
    net = constant_dmol(mean=[0.5, 0.0, 0.1], log_scale=-3.0, coeff=[1.0, 0.0, -1.0])
    with torch.no_grad():
        out = net.sample(torch.zeros(1, 1, 2, 2), pixels="mode")[0, 0, 0]
    t = np.tanh(1.0)
    x0 = 0.5
    x1 = 0.0 + t * x0
    x2 = 0.1 + 0.0 * x0 + np.tanh(-1.0) * x1
    np.testing.assert_allclose(out.numpy(), [x0, x1, x2], rtol=1e-5)
