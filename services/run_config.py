"""The configuration of a local live run: inputs checked, loopback endpoints allocated.

`build_run_config` is what `spikevaediff run` writes to RUN_DIR/config.json: every lane on a free
loopback tcp port (refiner instance k on the refined port + k) or an ipc socket in RUN_DIR/sock.
"""
from __future__ import annotations

from pathlib import Path

from spikevaediff.core.errors import UserError

from .runtime import default_cpu_pinning
from .settings import Endpoints, ServiceConfig


def _free_port_block(count: int) -> int:
    """A port p with p .. p+count-1 all free now (refiner instance k publishes on p + k)."""
    import socket

    from .transport import free_tcp_port

    for _ in range(50):
        base = free_tcp_port()
        probes = []
        try:
            for k in range(1, count):
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(probe)
                probe.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise UserError(f"could not find {count} consecutive free loopback ports")


def allocate_endpoints(transport: str, run_dir: Path, n_refiners: int = 1) -> Endpoints:
    """Fresh loopback endpoints: free tcp ports, or ipc sockets in RUN_DIR/sock."""
    from .transport import free_tcp_port, ipc_endpoint, tcp_endpoint

    names = ("counts", "sync", "preview", "work", "control")
    endpoints = Endpoints()
    if transport == "tcp":
        values = {name: tcp_endpoint(free_tcp_port()) for name in names}
        refined = tcp_endpoint(_free_port_block(max(1, n_refiners)))
    elif transport == "ipc":
        sock_dir = Path(run_dir) / "sock"
        values = {name: ipc_endpoint(name, sock_dir) for name in names}
        refined = ipc_endpoint("refined", sock_dir)
    else:
        raise UserError(f"unknown transport '{transport}' (choose tcp or ipc)")
    for name, value in values.items():
        setattr(endpoints, name, value)
    endpoints.refined = refined
    return endpoints


def build_run_config(sessions, bundle, out, *, speed=1.0, duration=30.0, start_frame=0, loop=False,
                     profile=None, weights_dir="", n_refiners=1, refiner_steps=None,
                     refiner_strength=None, backend=None, backend_path="", transport="tcp",
                     threads=1, curve_dir="", device="cpu", compile=None) -> ServiceConfig:
    """A validated ServiceConfig for a local run (inputs checked, endpoints allocated).

    `device` "cuda" puts the decoder and the refiners on the GPU, the refiner in float16 with
    its UNet step as one CUDA graph (compile "reduce-overhead": about 3x faster than eager at
    the published sizes on an H200); `compile` ("none", "default", "reduce-overhead") overrides that.
    """
    sessions = [Path(s) for s in sessions]
    if not sessions:
        raise UserError("give at least one --session")
    for session in sessions:
        if not session.is_file():
            raise UserError(f"session file not found: {session}")
    from spikevaediff.core.bundle import read_manifest

    manifest = read_manifest(bundle)  # checks the bundle without loading its weights
    if profile and profile != manifest.profile:
        raise UserError(f"--profile {profile} does not match the bundle's profile '{manifest.profile}'")
    if weights_dir and not Path(weights_dir).is_dir():
        raise UserError(f"weights folder not found: {weights_dir}")
    if threads < 1:
        raise UserError("--threads must be at least 1")
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = ServiceConfig(
        sessions=[str(s.resolve()) for s in sessions], bundle=str(Path(bundle).resolve()),
        weights_dir=str(Path(weights_dir).resolve()) if weights_dir else "",
        out=str(run_dir.resolve()), speed=float(speed), duration=float(duration),
        start_frame=int(start_frame), loop=bool(loop), n_refiners=int(n_refiners),
        threads={name: int(threads) for name in ("replay", "decoder", "refiner", "recorder")},
        curve_dir=str(Path(curve_dir).resolve()) if curve_dir else "",
        cpus=default_cpu_pinning(),
    )
    if curve_dir and transport != "tcp":
        raise UserError("CURVE (--curve-dir) secures tcp; use --transport tcp with it")
    if refiner_steps is not None:
        config.refiner.steps = int(refiner_steps)
    if refiner_strength is not None:
        config.refiner.strength = float(refiner_strength)
    if backend:
        config.refiner.backend = backend
        config.refiner.backend_path = str(backend_path or "")
    if device != "cpu":
        import torch

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device}: torch sees no CUDA device on this machine")
        config.decoder_device = config.refiner.device = str(device)
        config.refiner.precision = "float16"
        config.refiner.compile = "reduce-overhead" if config.refiner.backend == "torch" else ""
    if compile is not None:
        config.refiner.compile = "" if compile == "none" else str(compile)
    config.validate()
    config.endpoints = allocate_endpoints(transport, run_dir, config.n_refiners)
    return config.validate()
