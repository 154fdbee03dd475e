"""Tiny BLIP-2 captioner, its OPT tokenizer, and the captions file that caches captions."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded

import numpy as np
import pytest

from spikevaediff.core.captions import Captioner, captions_for_frames, load_captions, save_captions
from spikevaediff.core.config import ModelProfile
from spikevaediff.core.errors import MissingWeightsError, UserError
from spikevaediff.core.tiny import BLIP2_QUERY_TOKENS, write_tiny_blip2
from spikevaediff.core.tiny_tokenizers import IMAGE_TOKEN, opt_bpe


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    prof = ModelProfile("tiny", weights_dir=tmp_path_factory.mktemp("weights"))
    write_tiny_blip2(prof.path("blip2"), seed=0)
    return prof


@pytest.fixture(scope="module")
def captioner(profile):
    return Captioner(profile, batch_size=4)


def _frames(n, seed=0, rgb=False):
    shape = (n, 24, 40, 3) if rgb else (n, 24, 40)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_blip2_is_deterministic_and_loads_with_image_token(profile, tmp_path):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    path = profile.path("blip2")
    assert _files(write_tiny_blip2(tmp_path / "again", seed=0)) == _files(path)
    assert _files(write_tiny_blip2(tmp_path / "other", seed=1))["model.safetensors"] != _files(path)["model.safetensors"]
    model = Blip2ForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_token_index == image_id
    assert model.get_input_embeddings().num_embeddings > image_id
    assert processor.num_query_tokens == model.config.num_query_tokens == BLIP2_QUERY_TOKENS


def test_opt_tokenizer_round_trips_any_text(profile):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(profile.path("blip2"), local_files_only=True)
    for text in ["a man walking through a dark forest", "Café – 3 zebras, at NIGHT!", "  spaces\tand\nlines "]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("</s>")  # OPT starts with </s>
        assert tok.decode(ids, skip_special_tokens=True) == text
    vocab, _ = opt_bpe()
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert len(tok) == len(vocab) + 1  # plus <image>
    assert len(tok("a man walking through a dark forest")["input_ids"]) <= 8  # merges were learned


def test_caption_gives_one_deterministic_string_per_frame(captioner):
    frames = _frames(6, seed=1)
    first = captioner.caption(frames, max_new_tokens=6)
    assert len(first) == 6 and all(isinstance(t, str) for t in first)
    assert captioner.caption(frames, max_new_tokens=6) == first  # greedy decoding
    assert len(set(first)) > 1  # random weights, but the caption still depends on the image
    assert captioner.caption(_frames(2, rgb=True), max_new_tokens=3)[0]  # RGB input works too
    assert IMAGE_TOKEN not in "".join(first)


def test_captions_file_caches_and_second_call_generates_nothing(captioner, tmp_path):
    cache = tmp_path / "captions.json"
    frames, ids = _frames(5, seed=2), [10, 11, 12, 11, 13]  # frame 11 shown twice
    factory_calls = []

    def factory():
        factory_calls.append(1)
        return captioner

    before = captioner.images_captioned
    first = captions_for_frames(frames, ids, cache, factory, max_new_tokens=4, chunk=2)
    assert captioner.images_captioned - before == 4  # one per distinct frame
    assert first[1] == first[3]
    assert load_captions(cache) == dict(zip(ids, first))

    second = captions_for_frames(frames, ids, cache, factory, max_new_tokens=4)
    assert second == first
    assert captioner.images_captioned - before == 4 and len(factory_calls) == 1  # nothing new, model not even built


def test_user_captions_are_kept_and_only_missing_frames_generated(captioner, tmp_path):
    cache = save_captions(tmp_path / "mine.json", {0: "a cat on a table", 2: "a ship at sea"})
    before = captioner.images_captioned
    out = captions_for_frames(_frames(3, seed=3), [0, 1, 2], cache, lambda: captioner, max_new_tokens=4)
    assert captioner.images_captioned - before == 1
    assert out[0] == "a cat on a table" and out[2] == "a ship at sea"
    assert set(load_captions(cache)) == {0, 1, 2}


def test_captions_file_round_trip_and_bad_files(tmp_path):
    path = save_captions(tmp_path / "sub" / "c.json", {12: "grüne Bäume", 3: "a road"})
    assert load_captions(path) == {3: "a road", 12: "grüne Bäume"}
    assert list(json.loads(path.read_text(encoding="utf-8"))) == ["3", "12"]  # sorted by frame
    bad = tmp_path / "bad.json"
    for content, message in [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                             ('{"x": "a"}', "not a frame index"), ('{"1": 5}', "not a string")]:
        bad.write_text(content)
        with pytest.raises(UserError, match=message):
            load_captions(bad)
    with pytest.raises(UserError, match="not found"):
        load_captions(tmp_path / "nope.json")
    with pytest.raises(UserError, match="frame ids"):
        captions_for_frames(_frames(2), [0], None, lambda: None)


def test_missing_blip2_names_the_file(tmp_path):
    with pytest.raises(MissingWeightsError, match="blip2"):
        Captioner(ModelProfile("tiny", weights_dir=tmp_path))


def test_blip2_saved_without_image_token_still_captions(tmp_path):
    """Snapshots older than transformers 4.47 lack `<image>` / image_token_index: we add them."""
    from transformers import GPT2Tokenizer

    prof = ModelProfile("tiny", weights_dir=tmp_path)
    folder = write_tiny_blip2(prof.path("blip2"), seed=0)
    config = json.loads((folder / "config.json").read_text())
    config.pop("image_token_index", None)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    vocab, merges = opt_bpe()
    GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                  pad_token="<pad>", add_bos_token=True).save_pretrained(folder)
    processor_config = json.loads((folder / "processor_config.json").read_text())
    processor_config.pop("num_query_tokens", None)
    (folder / "processor_config.json").write_text(json.dumps(processor_config))

    legacy = Captioner(prof)
    assert legacy.model.config.image_token_index == legacy.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert legacy.processor.num_query_tokens == BLIP2_QUERY_TOKENS
    assert len(legacy.caption(_frames(2), max_new_tokens=3)) == 2
