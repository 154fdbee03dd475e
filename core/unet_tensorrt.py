"""The `tensorrt` UNet backend: a static-shape fp16 TensorRT engine built from the exported ONNX UNet.

Only where `import tensorrt` works (NVIDIA GPU hosts; `pip install tensorrt`): elsewhere
`make_backend` raises a one-line UserError and the refiner falls back. The engine is built with
the TensorRT Python API (`build_engine`) or by `trtexec` (deploy/build_engine.sh); a JSON sidecar
`<engine>.json` carries the ONNX file's metadata (shapes, text share, weights fingerprint).

`TensorRTUNetBackend` runs an engine with torch CUDA tensors as its I/O buffers (static
addresses, so the whole step can be captured once as a CUDA graph and replayed: fewer launch
gaps than enqueueing every kernel, which is what wins for the UNet's many small kernels).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .errors import UserError
from .unet_backends import UNetBackend
from .unet_export import (CONTEXT_LEN, DEFAULT_OPSET, INPUT_NAMES, OUTPUT_NAME, ExportKey, PerShapeBackend,
                          check_matches_unet, current_mix_ratio, default_cache_dir, export_unet_onnx,
                          first_dual_transformer, read_metadata, unet_fingerprint)

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".plan"


def import_tensorrt():
    """The `tensorrt` module, or UserError with the one-line reason it cannot be used here."""
    try:
        import tensorrt
    except ImportError as exc:
        raise UserError(f"the 'tensorrt' UNet backend needs NVIDIA TensorRT, which does not import here "
                        f"({exc.__class__.__name__}: {exc}); on a CUDA host `pip install tensorrt`, "
                        "or use --backend onnx / torch") from None
    return tensorrt


def require_cuda() -> None:
    """UserError unless torch sees a CUDA device (TensorRT engines run nowhere else)."""
    if not torch.cuda.is_available():
        raise UserError("the 'tensorrt' UNet backend needs a CUDA GPU, and torch sees none here; "
                        "use --backend onnx / torch")


def sidecar_path(engine_path) -> Path:
    """`<engine>.json`: the metadata of the ONNX file an engine was built from."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_sidecar(onnx_path, engine_path, **build) -> Path:
    """Record the ONNX file's metadata (plus `build` settings) beside an engine built from it."""
    metadata = dict(read_metadata(onnx_path), onnx=str(onnx_path), build=build)
    path = sidecar_path(engine_path)
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return path


def read_sidecar(engine_path) -> dict:
    """The sidecar of an engine (UserError when it is missing or unreadable)."""
    path = sidecar_path(engine_path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: build engines with `spikevaediff export-unet --format "
                        "tensorrt` or deploy/build_engine.sh, which write it") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc})") from None


def build_engine(onnx_path, engine_path, fp16: bool = True, workspace_gb: float | None = None,
                 max_batch: int = 8) -> Path:
    """Build a TensorRT engine from an exported ONNX UNet; returns the engine path.

    Static shapes as exported (a dynamic batch gets one optimisation profile 1..`max_batch`,
    tuned for the exported batch of 2). `fp16` lets TensorRT pick half-precision kernels.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    metadata = read_metadata(onnx_path)  # fails first, without TensorRT, on a missing / foreign file
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external weights beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors.splitlines()[0] if errors else 'unknown'}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2 ** 30))
    if metadata.get("batch") is None:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = list(tensor.shape)
            if shape and shape[0] == -1:
                rest = shape[1:]
                profile.set_shape(tensor.name, [1] + rest, [2] + rest, [int(max_batch)] + rest)
        config.add_optimization_profile(profile)
    log.info("building a TensorRT engine from %s (fp16=%s); this takes minutes for the paper UNet",
             onnx_path, fp16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    staged = engine_path.with_name(f".{engine_path.name}.{os.getpid()}")
    staged.write_bytes(bytes(serialized))
    write_sidecar(onnx_path, engine_path, fp16=bool(fp16), tensorrt=trt.__version__,
                  gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    os.replace(staged, engine_path)
    return engine_path


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for name, torch_type in (("bfloat16", torch.bfloat16), ("int64", torch.int64)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = torch_type
    return table[dtype]


class TensorRTUNetBackend(UNetBackend):
    """Runs a TensorRT engine of the UNet; inputs and output are torch tensors.

    `device`: the CUDA device; `cuda_graph`: capture each input shape's step once and replay
    it (falls back to plain enqueueing if capture fails); `unet`: when given, each call checks
    its text share against the one baked into the engine.
    """

    name = "tensorrt"

    def __init__(self, engine_path, device: str = "cuda", cuda_graph: bool = True,
                 unet: torch.nn.Module | None = None):
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UserError(f"TensorRT engine {self.path} does not exist (build it with `spikevaediff "
                            "export-unet --format tensorrt` or deploy/build_engine.sh)")
        self.metadata = read_sidecar(self.path)
        trt = import_tensorrt()
        require_cuda()
        self.device = torch.device(device)
        self._dual = first_dual_transformer(unet) if unet is not None else None
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT cannot load {self.path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if set(names) != set(INPUT_NAMES) | {OUTPUT_NAME}:
            raise UserError(f"{self.path} has tensors {sorted(names)}, "
                            f"expected {list(INPUT_NAMES)} -> {OUTPUT_NAME}")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.cuda_graph = bool(cuda_graph)
        self.stream = torch.cuda.Stream(self.device)
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph | None] = {}

    def _prepare(self, key: tuple) -> dict[str, torch.Tensor]:
        """Static I/O buffers for one (latents shape, context shape), bound to the context."""
        latent_shape, context_shape = key
        shapes = {"latents": latent_shape, "timestep": (), "context": context_shape, OUTPUT_NAME: latent_shape}
        for name in INPUT_NAMES:
            expected = tuple(self.engine.get_tensor_shape(name))
            if len(expected) != len(shapes[name]) or any(e not in (-1, s) for e, s in zip(expected, shapes[name])):
                raise UserError(f"{self.path.name} was built for {name} {expected}, got {shapes[name]}")
            if -1 in expected:
                self.context.set_input_shape(name, shapes[name])
        return {n: torch.empty(shape, dtype=self.dtypes[n], device=self.device) for n, shape in shapes.items()}

    def _bind(self, buffers: dict[str, torch.Tensor]) -> None:
        for name, tensor in buffers.items():
            if name in INPUT_NAMES and -1 in tuple(self.engine.get_tensor_shape(name)):
                self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path.name}")

    @torch.no_grad()
    def __call__(self, latents, t, context):
        if self._dual is not None and abs(self._dual.mix_ratio - self.metadata["mix_ratio"]) > 1e-6:
            raise UserError(f"{self.path.name} bakes in text share {self.metadata['mix_ratio']:.3f} but the "
                            f"refiner now uses {self._dual.mix_ratio:.3f}; rebuild it")
        key = (tuple(latents.shape), tuple(context.shape))
        if key not in self._buffers:
            self._buffers[key] = self._prepare(key)
        buffers = self._buffers[key]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buffers["latents"].copy_(latents)
            buffers["context"].copy_(context)
            buffers["timestep"].copy_(torch.as_tensor(t).reshape(()))
            self._bind(buffers)
            graph = self._graphs.get(key, False)
            if graph is False:  # first call of this shape: run plainly, then try to capture
                self._enqueue()
                self._graphs[key] = self._capture() if self.cuda_graph else None
            elif graph is None:
                self._enqueue()
            else:
                graph.replay()
            noise = buffers[OUTPUT_NAME].to(latents.dtype, copy=True)
        caller = torch.cuda.current_stream(self.device)
        caller.wait_stream(self.stream)
        noise.record_stream(caller)  # allocated on our stream, used on the caller's
        return noise

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue()
        except Exception as exc:  # capture is an optimisation: keep running without it
            log.warning("CUDA graph capture of the TensorRT UNet failed (%s); enqueueing each step", exc)
            return None
        return graph

    def describe(self) -> str:
        return f"tensorrt ({'CUDA graph' if self.cuda_graph else 'no CUDA graph'})"


def engine_name(key: ExportKey, fingerprint: str, opset: int, fp16: bool) -> str:
    """Cache file name of an engine: ONNX stem + precision + TensorRT version + GPU."""
    trt = import_tensorrt()
    gpu = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name())
    return f"{key.stem(fingerprint, opset)}-{'fp16' if fp16 else 'fp32'}-trt{trt.__version__}-{gpu}{ENGINE_SUFFIX}"


def make_backend(unet: torch.nn.Module, path=None, latent_hw=None, batch: int = 2, fp16: bool = True,
                 cuda_graph: bool = True, device: str = "cuda", cache_dir=None, opset: int = DEFAULT_OPSET,
                 workspace_gb: float | None = None) -> UNetBackend:
    """The `tensorrt` backend around `unet`; UserError (one line) where TensorRT or CUDA is absent.

    - `path` exists: run that engine (UserError if built from other weights or text share);
    - `path` given but missing: export + build it now (needs `latent_hw`, `batch`);
    - no `path`: export and build per input shape on first use into `cache_dir`.
    """
    if int(batch) < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    import_tensorrt()
    require_cuda()
    common = dict(device=device, cuda_graph=cuda_graph, unet=unet)
    if path is not None:
        path = Path(path)
        if not path.exists():
            if latent_hw is None:
                raise UserError(f"{path} does not exist; give latent_hw to build it there, or leave the "
                                "path unset to build on first use")
            onnx_file = path.with_suffix(".onnx")
            export_unet_onnx(unet, onnx_file, latent_hw, batch=batch, opset=opset)
            build_engine(onnx_file, path, fp16=fp16, workspace_gb=workspace_gb)
        check_matches_unet(read_sidecar(path), unet, path)
        return TensorRTUNetBackend(path, **common)

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    fingerprint = unet_fingerprint(unet)

    def factory(key: ExportKey) -> UNetBackend:
        engine = cache / engine_name(key, fingerprint, opset, fp16)
        if not engine.exists():
            onnx_file = cache / f"{key.stem(fingerprint, opset)}-legacy.onnx"
            if not onnx_file.exists():
                export_unet_onnx(unet, onnx_file, key.latent_hw, key.context_len, key.dim,
                                 batch=key.batch, opset=opset)
            build_engine(onnx_file, engine, fp16=fp16, workspace_gb=workspace_gb)
        return TensorRTUNetBackend(engine, **common)

    backend = PerShapeBackend(unet, factory, "tensorrt")
    if latent_hw is not None:
        hw = (latent_hw, latent_hw) if isinstance(latent_hw, int) else tuple(latent_hw)
        backend.engine(ExportKey(int(batch), hw, CONTEXT_LEN, int(unet.config.cross_attention_dim),
                                 current_mix_ratio(unet)))
    return backend
