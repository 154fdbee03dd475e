"""The Versatile Diffusion refiner: parity with diffusers, loading, img2img, schedulers, bad inputs.

Everything runs on the tiny random-weight Versatile Diffusion at small resolution (64x64 images,
8x8 latents) so each test takes about a second on one CPU core.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from spikevaediff.core.config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS, ModelProfile
from spikevaediff.core.errors import MissingWeightsError, UserError
from spikevaediff.core.refiner import SCHEDULER_NAMES, Refiner, img2img_schedule, make_scheduler
from spikevaediff.core.tiny import write_tiny_clip
from spikevaediff.core.tiny_vd import tiny_image_unet, tiny_text_unet, write_tiny_versatile_diffusion
from spikevaediff.core.unet_backends import TorchUNetBackend, UNetBackend, make_backend
from spikevaediff.core.vd_compat import (CompatDualTransformer2DModel, dual_transformers,
                                         ensure_compat_dual_transformers, set_mix_ratio, to_dual_attention)
from spikevaediff.core.vd_loader import load_dual_guided_pipeline, load_versatile_diffusion

SIZE = 64  # image side in the tests (latents 8x8)
PROMPT = "a dog running across a grassy field"


@pytest.fixture(scope="module")
def vd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    clip = write_tiny_clip(root / "clip-tiny", seed=0)
    return write_tiny_versatile_diffusion(root / "versatile-diffusion-tiny", clip, seed=0)


@pytest.fixture(scope="module")
def components(vd_folder):
    return load_versatile_diffusion(vd_folder)


@pytest.fixture()
def refiner(components):
    return Refiner.from_components(components, scheduler="ddim", steps=10, strength=0.75, image_size=SIZE)


def structured_preview(size=64):
    """A preview with clear structure: a bright bar, a dark field and a horizontal gradient."""
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3), np.uint8)
    img[size // 4: 3 * size // 4, size // 8: size // 2] = 230
    img[..., 1] = (xx * 255 // (size - 1)).astype(np.uint8)
    return img


def random_embeddings(dim, seed=0, batch=None):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    vision = rng.standard_normal(lead + (CLIP_IMAGE_TOKENS, dim)).astype(np.float32)
    text = rng.standard_normal(lead + (CLIP_TEXT_TOKENS, dim)).astype(np.float32)
    return vision, text


def reference_pipeline(components, scheduler_name):
    """diffusers' own dual-guided pipeline around the very same models."""
    from diffusers import VersatileDiffusionDualGuidedPipeline

    pipe = VersatileDiffusionDualGuidedPipeline(
        tokenizer=components.tokenizer, image_feature_extractor=components.image_feature_extractor,
        text_encoder=components.text_encoder, image_encoder=components.image_encoder,
        image_unet=components.image_unet, text_unet=None, vae=components.vae,
        scheduler=make_scheduler(scheduler_name, components.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----- parity with diffusers -----

@pytest.mark.parametrize("scheduler_name", SCHEDULER_NAMES)
def test_strength_one_reproduces_diffusers_dual_guided_pipeline(components, scheduler_name):
    pipe = reference_pipeline(components, scheduler_name)
    image = Image.fromarray(structured_preview(48))
    # The pipeline's own encoders give [negative, conditional] for each modality.
    text = pipe._encode_text_prompt([PROMPT], torch.device("cpu"), 1, True)
    vision = pipe._encode_image_prompt([image], torch.device("cpu"), 1, True)
    steps, seed = 6, 7
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, image=image, text_to_image_strength=0.4, height=SIZE, width=SIZE,
                        num_inference_steps=steps, guidance_scale=7.5,
                        generator=torch.Generator().manual_seed(seed), output_type="np").images[0]

    ours = Refiner.from_components(components, scheduler=scheduler_name, steps=steps, strength=1.0,
                                   guidance_scale=7.5, text_share=0.4, image_size=SIZE)
    ours.set_unconditional(vision[0], text[0])
    got = ours.refine(structured_preview(), vision[1], text[1], seed=seed, output_type="float")

    assert got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(got - expected).max() < 1e-5
    # and the comparison has teeth: another seed or text share gives a visibly different image
    other_seed = ours.refine(structured_preview(), vision[1], text[1], seed=seed + 1, output_type="float")
    assert np.abs(other_seed - expected).max() > 1e-2


def test_text_share_changes_the_image(components):
    vision, text = random_embeddings(components.embed_dim)
    images = []
    for share in (0.0, 1.0):
        refiner = Refiner.from_components(components, steps=4, strength=1.0, text_share=share, image_size=SIZE)
        images.append(refiner.refine(structured_preview(), vision * 10, text * 10, output_type="float"))
    assert np.abs(images[0] - images[1]).max() > 1e-3


def test_unconditional_inputs_are_grey_image_and_empty_text(components, refiner):
    pipe = reference_pipeline(components, "ddim")
    vision_u, text_u = refiner.unconditional()
    assert vision_u.shape == (CLIP_IMAGE_TOKENS, components.embed_dim)
    assert text_u.shape == (CLIP_TEXT_TOKENS, components.embed_dim)
    # text: exactly what the pipeline uses as its negative prompt ("")
    with torch.no_grad():
        expected_text = pipe._encode_text_prompt([PROMPT], torch.device("cpu"), 1, True)[0]
    np.testing.assert_allclose(text_u, expected_text.numpy(), atol=1e-6)
    # vision: CLIP of a truly mid-grey image (0.5 after rescaling), VD-normalised: token 0 has norm 1
    processor, side = components.image_feature_extractor, components.image_encoder.config.image_size
    grey = processor(images=[np.full((side, side, 3), 0.5, np.float32)], do_rescale=False, do_resize=False,
                     do_center_crop=False, return_tensors="pt").pixel_values
    with torch.no_grad():
        out = components.image_encoder(grey)
        embeds = components.image_encoder.visual_projection(
            components.image_encoder.vision_model.post_layernorm(out.last_hidden_state))
    embeds = embeds / embeds[:, :1].norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(vision_u, embeds[0].numpy(), atol=1e-5)
    assert abs(np.linalg.norm(vision_u[0]) - 1) < 1e-5


# ----- the two diffusers breakages -----

def test_plain_dual_transformer_breaks_and_compat_fixes_it():
    """Breakage 1: diffusers' own conversion leaves a UNet that fails on `encoder_attention_mask`."""
    from diffusers import VersatileDiffusionDualGuidedPipeline

    torch.manual_seed(0)
    image_unet, text_unet = tiny_image_unet(), tiny_text_unet()
    holder = type("Holder", (), {})()
    holder.image_unet, holder.text_unet = image_unet, text_unet
    VersatileDiffusionDualGuidedPipeline._convert_to_dual_attention(holder)  # upstream's conversion
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, CLIP_TEXT_TOKENS + CLIP_IMAGE_TOKENS, 64)
    with pytest.raises(TypeError, match="encoder_attention_mask"):
        image_unet(latents, 10, encoder_hidden_states=context)
    assert ensure_compat_dual_transformers(image_unet) == len(dual_transformers(image_unet)) > 0
    with torch.no_grad():
        fixed = image_unet(latents, 10, encoder_hidden_states=context).sample

    torch.manual_seed(0)
    ours_unet = tiny_image_unet()
    assert to_dual_attention(ours_unet, tiny_text_unet()) == len(dual_transformers(ours_unet))
    assert all(isinstance(m, CompatDualTransformer2DModel) for m in dual_transformers(ours_unet))
    with torch.no_grad():
        ours = ours_unet(latents, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, fixed, rtol=0, atol=0)


def test_saved_folder_loads_back(vd_folder, components):
    """Breakage 2: the pipeline's `from_pretrained` cannot find UNetFlatConditionModel; ours loads."""
    from diffusers import VersatileDiffusionDualGuidedPipeline

    index = json.loads((vd_folder / "model_index.json").read_text())
    assert index["text_unet"][1] == "UNetFlatConditionModel"
    with pytest.raises(ValueError, match="UNetFlatConditionModel"):
        VersatileDiffusionDualGuidedPipeline.from_pretrained(vd_folder, local_files_only=True)

    pipe = load_dual_guided_pipeline(vd_folder)
    assert all(isinstance(m, CompatDualTransformer2DModel) for m in dual_transformers(pipe.image_unet))
    ours = components.image_unet.state_dict()
    theirs = pipe.image_unet.state_dict()
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_folder_round_trip_is_deterministic_and_converted_unet_reloads(tmp_path, vd_folder, components):
    again = write_tiny_versatile_diffusion(tmp_path / "again", vd_folder.parent / "clip-tiny", seed=0)
    reloaded = load_versatile_diffusion(again)
    for a, b in [(components.image_unet, reloaded.image_unet), (components.vae, reloaded.vae)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

    # A folder saved after conversion (dual attention inside the image UNet) loads too.
    pipe = load_dual_guided_pipeline(vd_folder)
    pipe.save_pretrained(tmp_path / "converted")
    converted = load_versatile_diffusion(tmp_path / "converted")
    assert converted.image_unet.config.dual_cross_attention
    vision, text = random_embeddings(components.embed_dim)
    settings = dict(steps=4, strength=1.0, image_size=SIZE)
    a = Refiner.from_components(components, **settings).refine(structured_preview(), vision, text)
    b = Refiner.from_components(converted, **settings).refine(structured_preview(), vision, text)
    np.testing.assert_array_equal(a, b)


def test_missing_weights_and_bad_folder_are_user_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="versatile_diffusion"):
        Refiner(ModelProfile("tiny", weights_dir=tmp_path))
    (tmp_path / "vd").mkdir()
    (tmp_path / "vd" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="lacks Versatile Diffusion component"):
        load_versatile_diffusion(tmp_path / "vd")


def test_refiner_from_profile(vd_folder):
    profile = ModelProfile("tiny", weights_dir=vd_folder.parent)
    refiner = Refiner(profile, scheduler="dpmsolver++", steps=4, image_size=SIZE)
    vision, text = random_embeddings(refiner.embed_dim)
    out = refiner.refine(structured_preview(), vision, text)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


# ----- image-to-image -----

def _pixcorr(a, b):
    return float(np.corrcoef(a.astype(float).mean(-1).ravel(), b.astype(float).mean(-1).ravel())[0, 1])


def test_low_strength_keeps_the_preview_structure(components):
    """With random weights the VAE does not reproduce pixels, so structure is judged against the
    VAE's own round trip of the upsampled preview: low strength keeps it, strength 1.0 cannot."""
    refiner = Refiner.from_components(components, steps=10, image_size=SIZE)
    preview = structured_preview()
    with torch.no_grad():
        pixels = refiner._upsample(preview[None], SIZE)
        vae = components.vae
        round_trip = vae.decode(vae.encode(pixels).latent_dist.mode(), return_dict=False)[0]
    round_trip = ((round_trip[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    vision, text = random_embeddings(components.embed_dim)
    corr = {s: np.mean([_pixcorr(refiner.refine(preview, vision, text, seed=k, strength=s), round_trip)
                        for k in range(3)]) for s in (0.3, 1.0)}
    assert corr[0.3] > 0.3
    assert corr[0.3] > corr[1.0] + 0.2


def test_batch_matches_single_images(refiner, components):
    vision, text = random_embeddings(components.embed_dim, batch=2)
    previews = np.stack([structured_preview(), structured_preview()[::-1]])
    batch = refiner.refine(previews, vision, text, seed=3, output_type="float")
    assert batch.shape == (2, SIZE, SIZE, 3)
    # image 0 of the batch uses the first half of the same noise draw as a batch of one would
    single = refiner.refine(previews[0], vision[0], text[0], seed=3, output_type="float")
    assert np.abs(batch[0] - single).max() < 1e-4
    assert np.abs(batch[0] - batch[1]).max() > 1e-2


@pytest.mark.parametrize("scheduler_name", SCHEDULER_NAMES)
def test_schedulers_run_and_count_unet_evaluations(components, scheduler_name):
    refiner = Refiner.from_components(components, scheduler=scheduler_name, steps=8, strength=0.75,
                                      image_size=SIZE)
    calls = []
    inner = refiner.backend

    def counting(latents, t, context):
        calls.append(latents.shape[0])
        return inner(latents, t, context)

    refiner.backend = counting
    vision, text = random_embeddings(components.embed_dim)
    a = refiner.refine(structured_preview(), vision, text, seed=1)
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
    assert sum(calls) == refiner.unet_evaluations() == 2 * int(8 * 0.75)
    np.testing.assert_array_equal(a, refiner.refine(structured_preview(), vision, text, seed=1))
    assert not np.array_equal(a, refiner.refine(structured_preview(), vision, text, seed=2))


def test_paper_schedule_counts(components):
    """Paper defaults: DDIM 50 steps x strength 0.75 runs the last 37 steps = 74 UNet evaluations."""
    paper = Refiner.from_components(components)
    assert (paper.settings.scheduler, paper.settings.steps, paper.settings.strength) == ("ddim", 50, 0.75)
    assert paper.unet_evaluations() == 74
    assert paper.unet_evaluations(steps=5, strength=1.0) == 10
    full = img2img_schedule("ddim", components.scheduler_config, 50, 1.0)[1]
    kept = img2img_schedule("ddim", components.scheduler_config, 50, 0.75)[1]
    assert len(kept) == 37 and torch.equal(kept, full[13:])
    no_cfg = Refiner.from_components(components, guidance_scale=1.0)
    assert no_cfg.unet_evaluations() == 37


# ----- bad inputs -----

@pytest.mark.parametrize("vision_shape, text_shape, match", [
    ((256, 64), (77, 64), "vision embedding must be"),
    ((257, 32), (77, 64), "vision embedding must be"),
    ((257, 64), (76, 64), "text embedding must be"),
    ((3, 257, 64), (3, 77, 64), "batch 3 but there are 1 preview"),
])
def test_wrong_embedding_shapes_are_user_errors(refiner, vision_shape, text_shape, match):
    with pytest.raises(UserError, match=match):
        refiner.refine(structured_preview(), np.zeros(vision_shape, np.float32), np.zeros(text_shape, np.float32))


def test_other_bad_inputs_are_user_errors(refiner, components):
    vision, text = random_embeddings(components.embed_dim)
    with pytest.raises(UserError, match="uint8"):
        refiner.refine(structured_preview().astype(np.float32), vision, text)
    with pytest.raises(UserError, match="preview must be"):
        refiner.refine(np.zeros((64, 64), np.uint8), vision, text)
    vision[0, 0] = np.nan
    with pytest.raises(UserError, match="non-finite"):
        refiner.refine(structured_preview(), vision, text)
    with pytest.raises(UserError, match="unknown scheduler"):
        Refiner.from_components(components, scheduler="euler")
    with pytest.raises(UserError, match="strength"):
        Refiner.from_components(components, strength=0.0)
    with pytest.raises(UserError, match="no denoising step"):
        Refiner.from_components(components, steps=2, strength=0.4)
    with pytest.raises(UserError, match="unknown UNet backend"):
        Refiner.from_components(components, backend="tpu")


def test_backend_factory(components):
    backend = make_backend("torch", components.image_unet)
    assert isinstance(backend, TorchUNetBackend) and backend.describe() == "torch (eager)"
    set_mix_ratio(components.image_unet, 0.4)
    latents = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, CLIP_TEXT_TOKENS + CLIP_IMAGE_TOKENS, components.embed_dim)
    out = backend(latents, torch.tensor(500), context)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    for name in ("onnx", "tensorrt"):
        try:
            other = make_backend(name, components.image_unet)
        except UserError as exc:  # not built yet, or its runtime is absent: one clear line
            assert name in str(exc) and "\n" not in str(exc)
        else:
            assert isinstance(other, UNetBackend)


# ----- command line -----

def test_refine_command_writes_a_png(vd_folder, tmp_path, capsys):
    from spikevaediff.services.cli import main

    weights = str(vd_folder.parent)  # holds clip-tiny/ and versatile-diffusion-tiny/
    preview = tmp_path / "preview.png"
    Image.fromarray(structured_preview()).save(preview)
    vision, text = random_embeddings(64)
    np.save(tmp_path / "v.npy", vision)
    np.save(tmp_path / "t.npy", text)
    out = tmp_path / "out.png"
    code = main(["refine", "--weights", weights, "--preview", str(preview), "--vision", str(tmp_path / "v.npy"),
                 "--text", str(tmp_path / "t.npy"), "--out", str(out), "--scheduler", "unipc", "--steps", "4"])
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (512, 512) and image.mode == "RGB"
    assert "3 steps (6 UNet evaluations)" in capsys.readouterr().out

    np.save(tmp_path / "bad.npy", np.zeros((77, 64), np.float32))
    code = main(["refine", "--weights", weights, "--preview", str(preview), "--vision", str(tmp_path / "bad.npy"),
                 "--text", str(tmp_path / "t.npy"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "vision embedding must be [257,64]" in err and "Traceback" not in err
    assert main(["refine", "--weights", weights, "--out", str(out)]) == 2
    assert "--demo" in capsys.readouterr().err


def test_paper_shaped_models_have_the_published_parameter_counts():
    """gpu_check times the paper profile on these random-weight twins: their sizes must be the
    published ones (SD/VD UNet, SD VAE, CLIP ViT-L/14 towers), counted without allocating."""
    from spikevaediff.core import vd_shapes

    with torch.device("meta"):
        counts = {"unet": vd_shapes.paper_image_unet(), "vae": vd_shapes.paper_vae()}
        counts["text"], counts["vision"] = vd_shapes.clip_l14_towers(eos_id=2)
    counts = {name: vd_shapes.parameter_count(model) for name, model in counts.items()}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text": 123_650_304, "vision": 303_966_208}
    components = vd_shapes.paper_shaped_components("meta")
    assert components.embed_dim == 768
    # dual attention: every cross-attention transformer gained a text twin of the same size
    assert vd_shapes.parameter_count(components.image_unet) > counts["unet"]


def test_materialise_gives_meta_modules_fresh_weights():
    from spikevaediff.core.vd_shapes import materialise

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    assert materialise(model, "cpu") == 2
    assert all(not p.is_meta and torch.isfinite(p).all() for p in model.parameters())
    assert model[0].weight.abs().sum() > 0  # drawn, not left as uninitialised zeros
