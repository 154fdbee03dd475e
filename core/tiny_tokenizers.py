"""Offline byte-level BPE tokenizers for the tiny models, trained on a few fixed sentences.

Nothing is downloaded: a `tokenizers` BPE was trained once on `TINY_CORPUS` and its vocabulary
and merges are kept in `core/assets/` (the trainer breaks ties between equally frequent pairs
in a per-process random order, so training at write time would not give the same files twice;
`python -m spikevaediff.core.tiny_tokenizers` regenerates them). They load into the real
transformers classes, so the tiny folders are read by exactly the code that reads the
published ones:

- `clip_tokenizer()`  -> `CLIPTokenizer` (CLIP's lower-casing, `</w>` word endings,
  `<|startoftext|>` / `<|endoftext|>`, 77-token context);
- `opt_tokenizer()`   -> `GPT2Tokenizer` laid out like OPT's (`<s>`, `<pad>`, `</s>`, `<unk>` first,
  `</s>` as BOS/EOS) plus the `<image>` token BLIP-2 needs in transformers 5.
"""
from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"

# Short captions of the kind BLIP-2 writes about natural movie frames; any text still
# tokenizes (every byte is in the base alphabet), these only decide the merges.
TINY_CORPUS = (
    "a man walking through a dark forest",
    "a photo of a cat sitting on a wooden table",
    "the camera follows a car driving on a road",
    "a black and white photo of a city street at night",
    "a group of people standing in front of a building",
    "a close up of a person's face in the dark",
    "a blurry image of trees and a river",
    "two men talking in a room with a window",
    "a woman sitting at a table with a cup of coffee",
    "an old movie scene with a man holding a gun",
    "a dog running across a grassy field",
    "a boat on the water near the shore",
    "a view of the sky with clouds over the mountains",
    "a man in a suit and hat walking down the street",
    "a car parked in front of a house",
    "a bird flying over the trees",
    "a black and white image of a woman looking out of a window",
    "people walking on a sidewalk in the city",
    "a white horse standing in a field",
    "a large building with many windows at night",
    "the light shines through the leaves of a tree",
    "a man and a woman dancing in a ballroom",
    "a train moving along the tracks",
    "snow falling on a quiet street",
    "a grey image with a bright spot in the middle",
    "a picture of 3 children playing with a ball",
    "a close up of a flower with 5 petals",
    "an empty room with a chair and a lamp",
)

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_CONTEXT = 77
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in facebook/opt
IMAGE_TOKEN = "<image>"

# CLIP's pre-tokenizer split (words, single digits, punctuation runs, contractions).
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
               r"""|[^\s\p{L}\p{N}]+""")


def _merge_pairs(tokenizer) -> list[tuple[str, str]]:
    """The learned merges of a trained `tokenizers` BPE, in order."""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def train_clip_bpe(corpus=TINY_CORPUS, num_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train CLIP-style BPE: returns (vocab, merges) laid out like OpenAI's CLIP files.

    Vocab order: the 256 byte symbols, the same with `</w>`, one token per merge, then
    `<|startoftext|>` and `<|endoftext|>` last (so EOS has the largest id, as in CLIP).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=2 * len(alphabet) + num_merges, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False, min_frequency=1)
    tok.train_from_iterator(list(corpus), trainer)
    merges = _merge_pairs(tok)[:num_merges]

    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(pair) for pair in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def train_opt_bpe(corpus=TINY_CORPUS, num_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train GPT-2/OPT-style byte-level BPE (spaces carried as `Ġ`): returns (vocab, merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=""))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=len(OPT_SPECIALS) + len(alphabet) + num_merges,
                                  initial_alphabet=alphabet, special_tokens=list(OPT_SPECIALS),
                                  show_progress=False, min_frequency=1)
    tok.train_from_iterator(list(corpus), trainer)
    merges = _merge_pairs(tok)[:num_merges]
    tokens = list(OPT_SPECIALS) + alphabet + ["".join(pair) for pair in merges]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_bpe_files(folder, vocab: dict[str, int], merges: list[tuple[str, str]], prefix: str = "") -> None:
    """Write `<prefix>vocab.json` / `<prefix>merges.txt` in the classic GPT-2 / CLIP file format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n",
                                                encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / f"{prefix}merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_bpe_files(folder, prefix: str = "") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read what `write_bpe_files` wrote: (vocab, merges)."""
    folder = Path(folder)
    vocab = json.loads((folder / f"{prefix}vocab.json").read_text(encoding="utf-8"))
    lines = (folder / f"{prefix}merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return vocab, merges


def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The shipped tiny CLIP BPE (vocab, merges)."""
    return read_bpe_files(ASSETS, "tiny_clip_")


def opt_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The shipped tiny OPT BPE (vocab, merges)."""
    return read_bpe_files(ASSETS, "tiny_opt_")


def clip_tokenizer():
    """A real `transformers.CLIPTokenizer` over the tiny BPE (77-token context, pads with EOS)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=merges, bos_token=CLIP_BOS, eos_token=CLIP_EOS,
                         unk_token=CLIP_EOS, pad_token=CLIP_EOS, model_max_length=CLIP_CONTEXT)


def opt_tokenizer():
    """A real `transformers.GPT2Tokenizer` laid out like OPT's, with `<image>` added for BLIP-2."""
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer

    vocab, merges = opt_bpe()
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>",
                              unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
                              model_max_length=512)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tokenizer


def regenerate_assets(folder=ASSETS) -> None:
    """Retrain both BPEs on `TINY_CORPUS` and rewrite the asset files (changes the tiny models' vocab)."""
    write_bpe_files(folder, *train_clip_bpe(), prefix="tiny_clip_")
    write_bpe_files(folder, *train_opt_bpe(), prefix="tiny_opt_")


if __name__ == "__main__":
    regenerate_assets()
    print(f"wrote tiny tokenizer assets to {ASSETS}")
