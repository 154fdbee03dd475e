"""The refiner's dual-attention UNet as an ONNX file, and what accelerated backends share.

The exported graph is the UNet exactly as the refiner calls it: `(latents [B,4,h,w], timestep
(scalar float), context [B,77+257,D]) -> noise [B,4,h,w]`, with the dual attention inside and the
mix ratio (text share) baked in as a constant. Shapes are static by default (TensorRT and ONNX
Runtime plan best for one shape; the refiner's classifier-free guidance batch is 2); the batch
axis can be made dynamic. What went into a file is written into it as metadata (`read_metadata`).

Both exporters work on the tiny and the published UNet; the legacy (TorchScript) one is about
10x faster to export here and is the default, `exporter="dynamo"` uses `torch.export`.

`ExportKey` / `PerShapeBackend`: the refiner never tells a backend its latent size or batch up
front, so ONNX and TensorRT backends built around a live UNet export (and build) one static
file per input shape and mix ratio on first use, named by a fingerprint of the weights so a
cache folder can be shared across runs.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CLIP_IMAGE_TOKENS, CLIP_TEXT_TOKENS
from .errors import UserError
from .unet_backends import UNetBackend

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
CONTEXT_LEN = CLIP_TEXT_TOKENS + CLIP_IMAGE_TOKENS
INPUT_NAMES = ("latents", "timestep", "context")
OUTPUT_NAME = "noise"
EXPORTERS = ("legacy", "dynamo")
DYNAMO_MIN_OPSET = 18
METADATA_KEY = "spikevaediff.unet"
METADATA_FORMAT = 1
# Past this many bytes of weights the model goes to one external data file (protobuf caps at 2 GB).
LARGE_MODEL_BYTES = 1536 * 2 ** 20


def default_cache_dir() -> Path:
    """`$SPIKEVAEDIFF_ENGINE_CACHE` or `~/.cache/spikevaediff/engines`: exported UNets live here."""
    root = os.environ.get("SPIKEVAEDIFF_ENGINE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "spikevaediff" / "engines"


def first_dual_transformer(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet's first dual transformer (`set_mix_ratio` sets them all alike); UserError if none."""
    from .vd_compat import dual_transformers

    duals = dual_transformers(unet)
    if not duals:
        raise UserError("the image UNet has no dual attention; load it with load_versatile_diffusion")
    return duals[0]


def current_mix_ratio(unet: torch.nn.Module) -> float:
    """The text share set on the UNet's dual transformers (UserError if it has none)."""
    return float(first_dual_transformer(unet).mix_ratio)


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """A short hex digest of the UNet's config and weights (a cache key, not a security hash).

    Per tensor: name, shape, dtype, sum, absolute sum and a strided sample of raw values, so a
    different checkpoint, dtype or architecture gives a different key without hashing gigabytes.
    """
    digest = hashlib.sha256(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in itertools.chain(unet.named_parameters(), unet.named_buffers()):
            flat = tensor.detach().reshape(-1)
            wide = flat.double()
            sample = flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes()
            stats = torch.stack([wide.sum(), wide.abs().sum()]).cpu().numpy().tobytes()
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode() + stats + sample)
    return digest.hexdigest()[:16]


def _as_hw(latent_hw) -> tuple[int, int]:
    hw = (int(latent_hw), int(latent_hw)) if isinstance(latent_hw, (int, float)) else tuple(map(int, latent_hw))
    if len(hw) != 2 or min(hw) < 1:
        raise UserError(f"latent size must be one positive side or (height, width), got {latent_hw}")
    return hw


@dataclass(frozen=True)
class ExportKey:
    """Everything a static-shape export depends on besides the weights. `batch` None = dynamic."""

    batch: int | None
    latent_hw: tuple[int, int]
    context_len: int
    dim: int
    mix_ratio: float

    def stem(self, fingerprint: str, opset: int) -> str:
        """A file name stem that differs whenever the exported graph would differ."""
        batch = "bdyn" if self.batch is None else f"b{self.batch}"
        h, w = self.latent_hw
        return (f"unet-{fingerprint}-{batch}-{h}x{w}-ctx{self.context_len}x{self.dim}"
                f"-mix{self.mix_ratio:.4f}-op{opset}")


class UNetForExport(torch.nn.Module):
    """The UNet as a function of three positional tensors returning one (what exporters want)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latents, timestep, context):
        return self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0]


def export_unet_onnx(unet: torch.nn.Module, path, latent_hw, context_len: int = CONTEXT_LEN,
                     dim: int | None = None, batch: int = 2, opset: int = DEFAULT_OPSET,
                     dynamic_batch: bool = False, exporter: str = "legacy") -> Path:
    """Export the dual-attention `unet` (mix ratio as set now) to `path`; returns the path.

    Inputs: latents [batch,4,h,w] (`latent_hw` = h or (h, w)), timestep (float32 scalar) and
    context [batch, context_len, dim] (`dim` defaults to the UNet's cross-attention width); the
    UNet's own dtype and device are used. `dynamic_batch` makes the batch axis symbolic. The file
    is written atomically; weights past 1.5 GB go to one `<name>.data` file beside it.
    """
    if exporter not in EXPORTERS:
        raise UserError(f"unknown ONNX exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    if int(batch) < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    if exporter == "dynamo":
        # torch.export's translator starts at opset 18; converting down breaks Split here.
        opset = max(int(opset), DYNAMO_MIN_OPSET)
    h, w = _as_hw(latent_hw)
    dim = int(dim or unet.config.cross_attention_dim)
    if dim != int(unet.config.cross_attention_dim):
        raise UserError(f"context width {dim} differs from the UNet's cross-attention width "
                        f"{unet.config.cross_attention_dim}")
    mix_ratio = current_mix_ratio(unet)
    param = next(unet.parameters())
    example = (torch.randn(int(batch), unet.config.in_channels, h, w, device=param.device, dtype=param.dtype),
               torch.tensor(500.0, device=param.device),
               torch.randn(int(batch), int(context_len), dim, device=param.device, dtype=param.dtype))
    metadata = dict(format=METADATA_FORMAT, mix_ratio=mix_ratio, text_tokens=CLIP_TEXT_TOKENS,
                    image_tokens=CLIP_IMAGE_TOKENS, batch=None if dynamic_batch else int(batch),
                    latent_hw=[h, w], context_len=int(context_len), dim=dim,
                    dtype=str(param.dtype).replace("torch.", ""), opset=int(opset), exporter=exporter,
                    fingerprint=unet_fingerprint(unet), torch=torch.__version__)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        raw = staging / "raw" / "model.onnx"
        raw.parent.mkdir()
        was_training = unet.training
        unet.eval()
        try:
            _run_exporter(UNetForExport(unet), example, raw, opset, dynamic_batch, exporter)
        finally:
            unet.train(was_training)
        _finalise(raw, path, staging, metadata)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported the UNet to %s (%s exporter, batch %s, latents %dx%d, text share %.2f)",
             path, exporter, metadata["batch"] or "dynamic", h, w, mix_ratio)
    return path


def _run_exporter(module, example, out: Path, opset: int, dynamic_batch: bool, exporter: str) -> None:
    names = dict(input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on static shapes
        if exporter == "legacy":
            axes = {n: {0: "batch"} for n in ("latents", "context", OUTPUT_NAME)} if dynamic_batch else None
            torch.onnx.export(module, example, str(out), opset_version=int(opset), dynamo=False,
                              dynamic_axes=axes, do_constant_folding=True, **names)
        else:
            shapes = None
            if dynamic_batch:
                batch = torch.export.Dim("batch", min=1, max=64)
                shapes = ({0: batch}, None, {0: batch})
            program = torch.onnx.export(module, example, dynamo=True, opset_version=int(opset), verbose=False,
                                        dynamic_shapes=shapes, optimize=True, **names)
            program.save(str(out), external_data=True)


def _finalise(raw: Path, path: Path, staging: Path, metadata: dict) -> None:
    """Add the metadata, gather weights into one file when large, move into place atomically."""
    import onnx

    model = onnx.load(str(raw))  # external data, if any, is read back in
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata, sort_keys=True))
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    data_name = path.name + ".data"
    staged = staging / path.name
    if size > LARGE_MODEL_BYTES:
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        os.replace(staging / data_name, path.parent / data_name)
    else:
        onnx.save_model(model, str(staged))
    os.replace(staged, path)  # the model last: its presence means the export is complete


def read_metadata(path) -> dict:
    """What `export_unet_onnx` recorded in an ONNX file (UserError if missing or unreadable)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist (export one with `spikevaediff export-unet`)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf / onnx raise several unrelated types on a corrupt file
        raise UserError(f"{path} is not a readable ONNX file ({exc.__class__.__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise UserError(f"{path} was not exported by spikevaediff (no '{METADATA_KEY}' metadata); "
                        "export it with `spikevaediff export-unet`")
    return json.loads(props[METADATA_KEY])


def check_matches_unet(metadata: dict, unet: torch.nn.Module, where) -> None:
    """UserError unless a file exported as `metadata` came from these weights at this text share."""
    share = current_mix_ratio(unet)
    if abs(float(metadata["mix_ratio"]) - share) > 1e-6:
        raise UserError(f"{where} bakes in text share {metadata['mix_ratio']:.3f} but the refiner uses "
                        f"{share:.3f}; re-export it (or leave the path unset to export on first use)")
    if metadata.get("fingerprint") != unet_fingerprint(unet):
        raise UserError(f"{where} was exported from other UNet weights than the refiner's; re-export it")


class PerShapeBackend(UNetBackend):
    """Runs a live UNet through static-shape engines made on demand, one per `ExportKey`.

    `factory(key)` returns the engine for one input shape and text share (exporting or building
    it, usually into a cache). The current text share is read from the UNet on every call, so
    `Refiner.configure(text_share=...)` switches engines instead of running a stale one.
    """

    def __init__(self, unet: torch.nn.Module, factory, name: str, dynamic_batch: bool = False):
        self.unet = unet
        self._dual = first_dual_transformer(unet)  # read per call: cheaper than walking the modules
        self.factory = factory
        self.name = name
        self.dynamic_batch = bool(dynamic_batch)
        self.engines: dict[ExportKey, UNetBackend] = {}

    def key_for(self, latents: torch.Tensor, context: torch.Tensor) -> ExportKey:
        if latents.ndim != 4 or context.ndim != 3 or latents.shape[0] != context.shape[0]:
            raise UserError(f"UNet inputs must be latents [B,C,h,w] and context [B,L,D] with the same B, "
                            f"got {tuple(latents.shape)} and {tuple(context.shape)}")
        return ExportKey(None if self.dynamic_batch else int(latents.shape[0]),
                         (int(latents.shape[2]), int(latents.shape[3])), int(context.shape[1]),
                         int(context.shape[2]), float(self._dual.mix_ratio))

    def engine(self, key: ExportKey) -> UNetBackend:
        """The engine for `key`, made on first use."""
        if key not in self.engines:
            self.engines[key] = self.factory(key)
        return self.engines[key]

    def __call__(self, latents, t, context):
        return self.engine(self.key_for(latents, context))(latents, t, context)

    def describe(self) -> str:
        engines = list(self.engines.values())
        inner = engines[-1].describe() if engines else f"{self.name} (exported on first use)"
        return f"{inner}, {len(engines)} shape(s)" if len(engines) > 1 else inner
