"""The `onnx` UNet backend: the exported dual-attention UNet run by ONNX Runtime.

The execution provider is the best one this onnxruntime build offers: TensorRT EP (fp16, engine
cache beside the model) > CUDA EP > CPU. On the CPU the session runs with every graph
optimisation and as many intra-op threads as the refiner's budget (torch's thread count unless
told), without spin-waiting, so it does not steal the decoder's core. On a GPU, CUDA tensors
are bound in place (no host round trip).

`make_backend(unet, path=None, ...)` is what `unet_backends.make_backend("onnx", unet)` calls:
with an existing `path` it runs that file (checked against the UNet's weights and text share);
otherwise it exports one static-shape file per input shape on first use, into a cache folder.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .unet_backends import UNetBackend
from .unet_export import (CONTEXT_LEN, DEFAULT_OPSET, INPUT_NAMES, OUTPUT_NAME, ExportKey, PerShapeBackend,
                          check_matches_unet, current_mix_ratio, default_cache_dir, export_unet_onnx,
                          first_dual_transformer, read_metadata, unet_fingerprint)

__all__ = ["OnnxUNetBackend", "export_unet_onnx", "make_backend", "select_providers", "session_options"]

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def select_providers(requested=None, cache_dir=None, device_id: int = 0) -> list:
    """ONNX Runtime providers with their options: `requested` names, or the best available.

    UserError when a requested provider is not in this onnxruntime build.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        requested = [requested] if isinstance(requested, str) else list(requested)
        missing = [p for p in requested if p not in available]
        if missing:
            raise UserError(f"ONNX Runtime provider(s) {', '.join(missing)} not available here "
                            f"(available: {', '.join(available)})")
        names = requested
    else:
        names = [p for p in PROVIDER_PREFERENCE if p in available] or ["CPUExecutionProvider"]
    chosen = []
    for name in names:
        if name == "TensorrtExecutionProvider":
            options = {"device_id": device_id, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                       "trt_engine_cache_path": str(cache_dir or default_cache_dir())}
        elif name == "CUDAExecutionProvider":
            options = {"device_id": device_id}
        else:
            options = {}
        chosen.append((name, options))
    return chosen


def session_options(threads: int | None = None, spin: bool = False):
    """CPU-tuned session options: all graph optimisations, `threads` intra-op threads.

    `spin=False` (default) lets idle worker threads sleep instead of busy-waiting: a little slower
    with several threads, but the refiner does not take CPU from the decoder beside it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.log_severity_level = 3  # errors only: fallbacks are reported by us, in one line
    return options


class OnnxUNetBackend(UNetBackend):
    """Runs one exported UNet file with ONNX Runtime.

    `providers`: provider names (default: the best available); `threads`: intra-op threads
    (default: torch's count, i.e. the refiner's budget); `spin`: see `session_options`; `unet`:
    when given, every call checks that its text share is still the one baked into the file.
    Inputs and output are torch tensors on the caller's device, in the caller's dtype.
    """

    name = "onnx"

    def __init__(self, path, providers=None, threads: int | None = None, device_id: int = 0,
                 unet: torch.nn.Module | None = None, spin: bool = False):
        import onnxruntime as ort

        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.threads = int(threads or torch.get_num_threads())
        self.device_id = int(device_id)
        self._dual = first_dual_transformer(unet) if unet is not None else None
        chosen = select_providers(providers, cache_dir=self.path.parent, device_id=self.device_id)
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(self.threads, spin),
                                                providers=chosen)
        except Exception as exc:  # onnxruntime raises its own pybind error types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise UserError(f"ONNX Runtime cannot load {self.path}: {first}") from None
        self.providers = self.session.get_providers()
        wanted = [name for name, _ in chosen]
        if self.providers[0] != wanted[0]:
            log.warning("ONNX Runtime could not start %s; running on %s", wanted[0], self.providers[0])
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) != set(INPUT_NAMES):
            raise UserError(f"{self.path} has inputs {sorted(inputs)}, expected {list(INPUT_NAMES)}")
        self.input_types = {name: _NUMPY_TYPES.get(inputs[name].type, np.float32) for name in INPUT_NAMES}
        self.latent_shape = [d if isinstance(d, int) else None for d in inputs["latents"].shape]
        self.context_shape = [d if isinstance(d, int) else None for d in inputs["context"].shape]
        self.on_gpu = self.providers[0] in _GPU_PROVIDERS

    def _check(self, latents: torch.Tensor, context: torch.Tensor) -> None:
        for what, tensor, expected in (("latents", latents, self.latent_shape),
                                       ("context", context, self.context_shape)):
            shape = list(tensor.shape)
            if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
                wanted = "x".join("B" if e is None else str(e) for e in expected)
                raise UserError(f"{self.path.name} was exported for {what} {wanted}, got "
                                f"{'x'.join(map(str, shape))}; export one for this shape")
        if self._dual is not None and abs(self._dual.mix_ratio - self.metadata["mix_ratio"]) > 1e-6:
            raise UserError(f"{self.path.name} bakes in text share {self.metadata['mix_ratio']:.3f} but the "
                            f"refiner now uses {self._dual.mix_ratio:.3f}; re-export it")

    @staticmethod
    def _timestep(t) -> np.ndarray:
        t = torch.as_tensor(t)
        if t.numel() != 1:
            raise UserError(f"the ONNX UNet takes one timestep per call, got {t.numel()}")
        return np.asarray(float(t.reshape(-1)[0]), dtype=np.float32)

    @torch.no_grad()
    def __call__(self, latents, t, context):
        self._check(latents, context)
        if self.on_gpu and latents.is_cuda:
            return self._run_on_device(latents, t, context)
        feeds = {"latents": latents.detach().cpu().numpy().astype(self.input_types["latents"], copy=False),
                 "timestep": self._timestep(t),
                 "context": context.detach().cpu().numpy().astype(self.input_types["context"], copy=False)}
        noise = self.session.run([OUTPUT_NAME], feeds)[0]
        return torch.from_numpy(noise).to(device=latents.device, dtype=latents.dtype)

    def _run_on_device(self, latents, t, context):
        """Bind CUDA tensors in place: no copies through host memory."""
        dtype = {np.float32: torch.float32, np.float16: torch.float16}[self.input_types["latents"]]
        caller_dtype = latents.dtype
        latents = latents.to(dtype).contiguous()
        context = context.to(dtype).contiguous()
        noise = torch.empty_like(latents)
        binding = self.session.io_binding()
        np_type = self.input_types["latents"]
        for name, tensor in (("latents", latents), ("context", context)):
            binding.bind_input(name, "cuda", tensor.device.index or 0, np_type, tuple(tensor.shape),
                               tensor.data_ptr())
        binding.bind_cpu_input("timestep", self._timestep(t))
        binding.bind_output(OUTPUT_NAME, "cuda", noise.device.index or 0, np_type, tuple(noise.shape),
                            noise.data_ptr())
        torch.cuda.current_stream(latents.device).synchronize()  # inputs written before ORT reads them
        self.session.run_with_iobinding(binding)
        return noise.to(caller_dtype)

    def describe(self) -> str:
        short = self.providers[0].replace("ExecutionProvider", "")
        threads = f", {self.threads} thread(s)" if short == "CPU" else ""
        return f"onnx ({short}{threads})"


def make_backend(unet: torch.nn.Module, path=None, latent_hw=None, batch: int = 2, dynamic_batch: bool = False,
                 providers=None, threads: int | None = None, device_id: int = 0, cache_dir=None,
                 opset: int = DEFAULT_OPSET, exporter: str = "legacy", spin: bool = False) -> UNetBackend:
    """The `onnx` backend around `unet` (dual attention, text share already set).

    - `path` exists: run that file (UserError if it came from other weights or text share);
    - `path` given but missing: export to it now (needs `latent_hw`; `batch`, `dynamic_batch`);
    - no `path`: export per input shape on first use into `cache_dir` (default
      `default_cache_dir()`), reusing files of the same weights; `latent_hw` exports one now.
    """
    common = dict(providers=providers, threads=threads, device_id=device_id, spin=spin)
    if path is not None:
        path = Path(path)
        if not path.exists():
            if latent_hw is None:
                raise UserError(f"{path} does not exist; give latent_hw to export it there, or leave the "
                                "path unset to export on first use")
            export_unet_onnx(unet, path, latent_hw, batch=batch, opset=opset,
                             dynamic_batch=dynamic_batch, exporter=exporter)
        check_matches_unet(read_metadata(path), unet, path)
        return OnnxUNetBackend(path, unet=unet, **common)

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    fingerprint = unet_fingerprint(unet)

    def factory(key: ExportKey) -> UNetBackend:
        file = cache / f"{key.stem(fingerprint, opset)}-{exporter}.onnx"
        if not file.exists():
            export_unet_onnx(unet, file, key.latent_hw, key.context_len, key.dim, batch=key.batch or 2,
                             opset=opset, dynamic_batch=key.batch is None, exporter=exporter)
        else:
            log.info("using the cached ONNX UNet %s", file)
        return OnnxUNetBackend(file, unet=unet, **common)

    backend = PerShapeBackend(unet, factory, "onnx", dynamic_batch=dynamic_batch)
    if latent_hw is not None:
        hw = (latent_hw, latent_hw) if isinstance(latent_hw, int) else tuple(latent_hw)
        dim = int(unet.config.cross_attention_dim)
        backend.engine(ExportKey(None if dynamic_batch else int(batch), hw, CONTEXT_LEN, dim,
                                 current_mix_ratio(unet)))
    return backend
