"""Model profiles and where their weights live.

Two profiles share one code path:

- `tiny`: the published architectures in small configurations, built offline. CLIP, BLIP-2 and
  Versatile Diffusion are random-weight models written once to the weights folder (by
  `spikevaediff models init-tiny`, or on first use); the VDVAE is trained by the project
  (`spikevaediff train-vdvae`).
- `paper`: the published weights, read from local files (a weights folder or the local Hugging
  Face cache). Nothing is ever downloaded at run time.

Every loader asks the profile for a path (`profile.path("clip")`) and calls `profile.require(...)`
first, so a missing file fails with one line naming it and where it comes from (exit 2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MissingWeightsError, UserError

PROFILE_NAMES = ("tiny", "paper")

# Width of the CLIP embeddings that condition Versatile Diffusion (tokens: 257 image, 77 text).
EMBED_DIM = {"tiny": 64, "paper": 768}
CLIP_IMAGE_TOKENS = 257
CLIP_TEXT_TOKENS = 77


@dataclass(frozen=True)
class WeightSpec:
    """One required weight: a file or a folder below the weights directory."""

    key: str
    relpath: str
    source: str
    marker: str = ""  # for folders: a file that must exist inside (e.g. config.json)
    hf_repo: str = ""  # where a local Hugging Face cache may hold it
    optional: bool = False  # needed only by some commands (e.g. the plain-VAE baseline)


_TINY_SOURCE = "built offline by `spikevaediff models init-tiny` (random weights)"

WEIGHTS: dict[str, tuple[WeightSpec, ...]] = {
    "paper": (
        WeightSpec("vdvae", "vdvae/imagenet64-iter-1600000-model-ema.th",
                   "openai/vdvae release assets (ImageNet-64 EMA checkpoint)"),
        WeightSpec("clip", "clip-vit-large-patch14", "Hugging Face openai/clip-vit-large-patch14",
                   marker="config.json", hf_repo="openai/clip-vit-large-patch14"),
        WeightSpec("versatile_diffusion", "versatile-diffusion",
                   "Hugging Face shi-labs/versatile-diffusion (diffusers format)",
                   marker="model_index.json", hf_repo="shi-labs/versatile-diffusion"),
        WeightSpec("blip2", "blip2-opt-2.7b", "Hugging Face Salesforce/blip2-opt-2.7b",
                   marker="config.json", hf_repo="Salesforce/blip2-opt-2.7b"),
        WeightSpec("vae", "vae/vae.th", "trained by `spikevaediff train-vdvae --arch vae` (optional baseline)",
                   optional=True),
    ),
    "tiny": (
        WeightSpec("vdvae", "vdvae-tiny/vdvae.th", "trained by `spikevaediff train-vdvae`"),
        WeightSpec("clip", "clip-tiny", _TINY_SOURCE, marker="config.json"),
        WeightSpec("versatile_diffusion", "versatile-diffusion-tiny", _TINY_SOURCE,
                   marker="model_index.json"),
        WeightSpec("blip2", "blip2-tiny", _TINY_SOURCE, marker="config.json"),
        WeightSpec("vae", "vae-tiny/vae.th", "trained by `spikevaediff train-vdvae --arch vae` (optional baseline)",
                   optional=True),
    ),
}


def default_weights_dir(profile: str) -> Path:
    """`$SPIKEVAEDIFF_WEIGHTS/<profile>` or `~/.cache/spikevaediff/<profile>`."""
    root = os.environ.get("SPIKEVAEDIFF_WEIGHTS")
    base = Path(root) if root else Path.home() / ".cache" / "spikevaediff"
    return base / profile


def _hf_cache_snapshot(repo: str, marker: str) -> Path | None:
    """A snapshot folder of `repo` in the local Hugging Face cache that holds `marker`."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")), "hub")
    snapshots = Path(hub) / ("models--" + repo.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return None
    for snap in sorted(snapshots.iterdir()):
        if (snap / marker).exists():
            return snap
    return None


@dataclass
class ModelProfile:
    """Which models to use and where their weights are.

    `overrides` maps a weight key to an explicit path (e.g. a tiny VDVAE trained elsewhere).
    """

    name: str = "tiny"
    weights_dir: Path | None = None
    device: str = "cpu"
    overrides: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in PROFILE_NAMES:
            raise UserError(f"unknown profile '{self.name}' (choose from {', '.join(PROFILE_NAMES)})")
        self.weights_dir = Path(self.weights_dir) if self.weights_dir else default_weights_dir(self.name)
        self.overrides = {k: Path(v) for k, v in self.overrides.items()}

    @property
    def embed_dim(self) -> int:
        return EMBED_DIM[self.name]

    def specs(self) -> tuple[WeightSpec, ...]:
        return WEIGHTS[self.name]

    def spec(self, key: str) -> WeightSpec:
        for spec in self.specs():
            if spec.key == key:
                return spec
        raise KeyError(key)

    def path(self, key: str) -> Path:
        """Where weight `key` is (or is expected): override, weights folder, then HF cache."""
        if key in self.overrides:
            return self.overrides[key]
        spec = self.spec(key)
        local = self.weights_dir / spec.relpath
        if not self._present(spec, local) and spec.hf_repo:
            cached = _hf_cache_snapshot(spec.hf_repo, spec.marker or "config.json")
            if cached is not None:
                return cached
        return local

    @staticmethod
    def _present(spec: WeightSpec, path: Path) -> bool:
        if spec.marker:
            return (path / spec.marker).is_file()
        return path.is_file()

    def status(self) -> list[tuple[WeightSpec, Path, bool]]:
        """(spec, path, present) for every weight this profile knows."""
        out = []
        for spec in self.specs():
            path = self.path(spec.key)
            out.append((spec, path, self._present(spec, path)))
        return out

    def require(self, *keys: str) -> None:
        """Raise MissingWeightsError listing every missing weight among `keys` (all if empty)."""
        wanted = set(keys) if keys else {s.key for s in self.specs() if not s.optional}
        missing = [(spec.key, str(path), spec.source)
                   for spec, path, present in self.status() if spec.key in wanted and not present]
        if missing:
            raise MissingWeightsError(self.name, missing)
