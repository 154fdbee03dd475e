"""Tiny CLIP folder, its tokenizer, and CLIP features in Versatile Diffusion's normalisation."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded

import numpy as np
import pytest
import torch

from spikevaediff.core.config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS, EMBED_DIM, ModelProfile
from spikevaediff.core.errors import MissingWeightsError, UserError
from spikevaediff.core.tiny import write_tiny_clip
from spikevaediff.core.tiny_tokenizers import clip_tokenizer


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    prof = ModelProfile("tiny", weights_dir=tmp_path_factory.mktemp("weights"))
    write_tiny_clip(prof.path("clip"), seed=0)
    return prof


@pytest.fixture(scope="module")
def encoder(profile):
    from spikevaediff.core.clip import ClipEncoder

    return ClipEncoder(profile, batch_size=3)


def _frames(n=5, h=30, w=50, seed=0, rgb=False):
    shape = (n, h, w, 3) if rgb else (n, h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_clip_is_deterministic_for_a_seed(profile, tmp_path):
    again = write_tiny_clip(tmp_path / "again", seed=0)
    other = write_tiny_clip(tmp_path / "other", seed=1)
    first = _files(profile.path("clip"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "vocab.json", "merges.txt"} <= set(first)
    assert _files(again) == first
    assert _files(other)["model.safetensors"] != first["model.safetensors"]
    assert _files(other)["tokenizer.json"] == first["tokenizer.json"]  # the tokenizer does not depend on the seed


def test_tiny_clip_loads_into_the_classes_versatile_diffusion_uses(profile):
    from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    path = profile.path("clip")
    full = CLIPModel.from_pretrained(path, local_files_only=True)
    text = CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True)
    vision = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
    assert text.config.projection_dim == vision.config.projection_dim == EMBED_DIM["tiny"]
    assert torch.equal(text.text_projection.weight, full.text_projection.weight)
    assert torch.equal(vision.visual_projection.weight, full.visual_projection.weight)
    assert torch.equal(vision.vision_model.post_layernorm.weight, full.vision_model.post_layernorm.weight)


def test_clip_tokenizer_round_trips_text_and_pads_to_77(profile):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(profile.path("clip"), local_files_only=True)
    built = clip_tokenizer()
    for text in ["a grey cat sitting near the river", "a zebra jumps over quixotic fjords"]:
        ids = tok(text)["input_ids"]
        assert ids == built(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text  # unseen words fall back to bytes
    assert tok.decode(tok("A Dark  FOREST")["input_ids"], skip_special_tokens=True) == "a dark forest"
    batch = tok(["a man", ""], padding="max_length", max_length=CLIP_TEXT_TOKENS, return_tensors="pt")
    assert batch["input_ids"].shape == (2, CLIP_TEXT_TOKENS)
    assert tok.model_max_length == CLIP_TEXT_TOKENS
    # Seen words are merged into few tokens: the BPE was really trained.
    assert len(tok("walking through the forest")["input_ids"]) <= 6


def test_image_embeds_shape_and_token0_unit_norm(encoder):
    grey = encoder.image_embeds(_frames(5))
    assert grey.shape == (5, CLIP_IMAGE_TOKENS, EMBED_DIM["tiny"]) and grey.dtype == torch.float32
    torch.testing.assert_close(grey[:, 0].norm(dim=-1), torch.ones(5))
    other_norms = grey[:, 1:].norm(dim=-1)
    assert (other_norms - 1).abs().max() > 1e-3  # only token 0 is normalised to 1, not every token
    rgb = encoder.image_embeds(_frames(2, rgb=True, seed=1))
    assert rgb.shape == (2, CLIP_IMAGE_TOKENS, EMBED_DIM["tiny"])
    assert not torch.allclose(grey[0], grey[1])  # different images, different features


def test_image_embeds_grey_equals_rgb_copy_and_batching_is_invisible(encoder):
    frames = _frames(7, seed=3)
    batched = encoder.image_embeds(frames)  # batch_size 3 -> 3 forward passes
    one_by_one = torch.cat([encoder.image_embeds(frames[i:i + 1]) for i in range(7)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    rgb = encoder.image_embeds(np.repeat(frames[..., None], 3, axis=-1))
    torch.testing.assert_close(batched, rgb)


def test_text_embeds_shape_and_pooled_unit_norm(encoder):
    texts = ["a man walking", "a dark forest at night", ""]
    embeds = encoder.text_embeds(texts)
    assert embeds.shape == (3, CLIP_TEXT_TOKENS, EMBED_DIM["tiny"]) and embeds.dtype == torch.float32
    ids = encoder.tokenizer(texts, padding="max_length", max_length=CLIP_TEXT_TOKENS)["input_ids"]
    eos_positions = [row.index(encoder.tokenizer.eos_token_id) for row in ids]
    pooled = torch.stack([embeds[i, p] for i, p in enumerate(eos_positions)])
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))
    assert (embeds[0, 1:eos_positions[0]].norm(dim=-1) - 1).abs().max() > 1e-3


def test_features_match_diffusers_versatile_diffusion_encoders(profile, encoder):
    """Our features equal those of diffusers' own VersatileDiffusionDualGuidedPipeline encoders."""
    from types import SimpleNamespace

    from diffusers import VersatileDiffusionDualGuidedPipeline as VD
    from transformers import (AutoImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionModelWithProjection)

    path = profile.path("clip")
    pipe = SimpleNamespace(
        tokenizer=CLIPTokenizer.from_pretrained(path, local_files_only=True),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True).eval(),
        image_feature_extractor=AutoImageProcessor.from_pretrained(path, local_files_only=True),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval())
    texts = ["a man walking through a dark forest", "snow", ""]
    images = _frames(3, h=40, w=64, rgb=True, seed=5)
    with torch.no_grad():
        ref_text = VD._encode_text_prompt(pipe, texts, torch.device("cpu"), 1, False)
        ref_image = VD._encode_image_prompt(pipe, list(images), torch.device("cpu"), 1, False)
    torch.testing.assert_close(encoder.text_embeds(texts), ref_text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(encoder.image_embeds(images), ref_image, atol=1e-6, rtol=1e-5)


def test_bad_inputs_and_missing_weights_are_user_errors(encoder, tmp_path):
    from spikevaediff.core.clip import ClipEncoder

    with pytest.raises(UserError, match="uint8"):
        encoder.image_embeds(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(UserError, match="shape"):
        encoder.image_embeds(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(UserError, match="list of strings"):
        encoder.text_embeds("one string")
    with pytest.raises(MissingWeightsError, match="clip"):
        ClipEncoder(ModelProfile("tiny", weights_dir=tmp_path))


def test_profile_with_wrong_width_is_refused(profile):
    from spikevaediff.core.clip import ClipEncoder

    paper_named = ModelProfile("paper", weights_dir=profile.weights_dir, overrides={"clip": profile.path("clip")})
    with pytest.raises(UserError, match="expects 768"):
        ClipEncoder(paper_named)
