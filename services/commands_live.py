"""Commands of the live system: `run` (all services + report), `serve` (one service), `keys`
(CURVE keypairs) and `bench-transport` (our transport vs bare pyzmq)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    register_run(subparsers)
    register_serve(subparsers)
    register_keys(subparsers)
    bench = subparsers.add_parser(
        "bench-transport",
        help="measure our message transport against a bare pyzmq echo (ratios)",
        description=(
            "Round trips between two real processes on loopback, for a 500-unit counts vector, "
            "a 64x64 RGB preview and a 257x768 float32 CLIP embedding: ours (encode, send, "
            "validating receive and decode, both ways) against a bare pyzmq echo of the same "
            "bytes, interleaved in one run. Prints p50/p99 in microseconds and the ratios "
            "ours/bare (in time: below 1 is faster)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--transport", choices=("tcp", "ipc"), default="tcp",
                       help="loopback transport to measure")
    bench.add_argument("--iterations", type=int, default=1000,
                       help="timed round trips per payload and per path")
    bench.add_argument("--warmup", type=int, default=100, help="untimed round trips first")
    bench.add_argument("--json", type=Path, default=None, help="also write the result here")
    bench.set_defaults(func=run_bench_transport)


def run_bench_transport(args) -> int:
    from spikevaediff.core.errors import UserError
    from spikevaediff.services.bench_transport import bench_transport, format_table

    if args.iterations < 10 or args.warmup < 0:
        raise UserError("--iterations must be at least 10 and --warmup at least 0")
    result = bench_transport(args.transport, iterations=args.iterations, warmup=args.warmup)
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


SERVICE_MODULES = {
    "replay": "spikevaediff.services.replay_service",
    "decoder": "spikevaediff.services.decoder_service",
    "refiner": "spikevaediff.services.refiner_service",
    "recorder": "spikevaediff.services.recorder_service",
}


def register_serve(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run one live service (replay, decoder, refiner or recorder) from a config file",
        description=(
            "Run one service of the live system alone, e.g. on its own host. Every address, input "
            "and setting comes from the config (a ServiceConfig JSON, like the config.json that "
            "`spikevaediff run` writes; see docs/LIVE.md). Stops on end of stream or Ctrl-C."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("service", choices=tuple(SERVICE_MODULES), help="which service to run")
    serve.add_argument("--config", type=Path, required=True, help="ServiceConfig JSON file")
    serve.add_argument("--instance", type=int, default=0,
                       help="instance number (refiners: picks its refined endpoint)")
    serve.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import importlib

    from spikevaediff.core.errors import UserError
    from spikevaediff.services.settings import ServiceConfig

    if args.instance < 0:
        raise UserError("--instance must be >= 0")
    config = ServiceConfig.load(args.config)
    try:
        module = importlib.import_module(SERVICE_MODULES[args.service])
    except ModuleNotFoundError as exc:
        if exc.name == SERVICE_MODULES[args.service]:
            raise UserError(f"the {args.service} service is not installed in this build") from None
        raise
    return int(module.main(config, args.instance) or 0)


def register_run(subparsers) -> None:
    run = subparsers.add_parser(
        "run",
        help="replay a session live: replay, decoder, refiner(s) and recorder as processes, then a report",
        description=(
            "Start the four live services as separate processes on loopback (tcp or ipc), wait "
            "for each to report ready, replay the session(s) in real time (x --speed) through the "
            "bundle's decoder and the refiner, record every preview and refined image to "
            "RUN_DIR/recording.h5, stop cleanly on end of stream or Ctrl-C, and write "
            "RUN_DIR/report.md (+ report.json, latency.png, strip.png): latency per hop, "
            "throughput, gaps and drops, pacing error, ground truth | preview | refined over time."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--session", type=Path, nargs="+", required=True,
                     help="NWB session(s) to replay (several: pooled, aligned by movie frame)")
    run.add_argument("--bundle", type=Path, required=True, help="trained bundle (`spikevaediff train`)")
    run.add_argument("--out", type=Path, required=True, help="run folder (config, logs, recording, report)")
    run.add_argument("--speed", type=float, default=1.0, help="replay speed (1 = real time)")
    run.add_argument("--duration", type=float, default=30.0,
                     help="seconds of movie time to stream (0 = the whole movie once)")
    run.add_argument("--start-frame", type=int, default=0, help="movie frame to start from")
    run.add_argument("--loop", action="store_true", help="loop the movie until Ctrl-C or --duration")
    run.add_argument("--profile", choices=("tiny", "paper"), default=None,
                     help="model profile; must match the bundle's (default: the bundle's)")
    run.add_argument("--weights", type=Path, default=None,
                     help="weights folder (default: the one the bundle was trained with)")
    run.add_argument("--refiners", type=int, default=1, help="refiner processes sharing the work (0: none)")
    run.add_argument("--refiner-steps", type=int, default=None, help="denoising steps per refined image")
    run.add_argument("--refiner-strength", type=float, default=None, help="img2img strength in (0, 1]")
    run.add_argument("--backend", choices=("torch", "onnx", "tensorrt"), default=None,
                     help="refiner UNet backend")
    run.add_argument("--backend-path", type=Path, default=None, help="ONNX file or TensorRT engine")
    run.add_argument("--device", default="cpu",
                     help="cpu, cuda or cuda:N: where the decoder and refiners run (on a GPU the "
                          "refiner runs float16 with CUDA graphs)")
    run.add_argument("--compile", choices=("none", "default", "reduce-overhead"), default=None,
                     help="torch.compile mode of the refiner's UNet (default: reduce-overhead on a GPU, none on the CPU)")
    run.add_argument("--transport", choices=("tcp", "ipc"), default="tcp", help="loopback transport")
    run.add_argument("--threads", type=int, default=1, help="torch/BLAS threads per service")
    run.add_argument("--curve-dir", type=Path, default=None,
                     help="CURVE keys folder (from `spikevaediff keys`): encrypt and authenticate every socket")
    run.add_argument("--ready-timeout", type=float, default=180.0,
                     help="seconds each service may take to report ready")
    run.set_defaults(func=run_run)


def run_run(args) -> int:
    from spikevaediff.core.errors import UserError
    from spikevaediff.services.launcher import run_live
    from spikevaediff.services.run_config import build_run_config
    from spikevaediff.services.run_report import format_summary

    if args.refiners < 0:
        raise UserError("--refiners must be >= 0")
    if args.ready_timeout <= 0:
        raise UserError("--ready-timeout must be > 0")
    config = build_run_config(
        args.session, args.bundle, args.out, speed=args.speed, duration=args.duration,
        start_frame=args.start_frame, loop=args.loop, profile=args.profile,
        weights_dir=str(args.weights or ""), n_refiners=args.refiners,
        refiner_steps=args.refiner_steps, refiner_strength=args.refiner_strength,
        backend=args.backend, backend_path=str(args.backend_path or ""), transport=args.transport,
        threads=args.threads, curve_dir=str(args.curve_dir or ""), device=args.device, compile=args.compile)
    outcome, summary = run_live(config, ready_timeout_s=args.ready_timeout)
    if summary is not None and (outcome.reason != "failed" or summary["counts"]["recorded"]):
        print(format_summary(summary))
        print(f"report: {Path(config.out) / 'report.md'}")
    if outcome.reason == "failed":
        raise UserError(outcome.error)
    if outcome.reason == "interrupted":
        print("spikevaediff run: interrupted; services stopped", file=sys.stderr)
        return 130
    return 0


def register_keys(subparsers) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="create CURVE keypairs for multi-host runs",
        description=(
            "Write <identity>.key (public: copy it to every host) and <identity>.key_secret "
            "(secret, mode 600: keep it only on the host that runs that service) for each "
            "identity. Point the config's curve_dir at the folder (see docs/LIVE.md)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    keys.add_argument("--out", type=Path, required=True, help="keys folder")
    keys.add_argument("--identities", nargs="+", default=["replay", "decoder", "refiner", "recorder"],
                      help="service identities to make keys for")
    keys.add_argument("--force", action="store_true", help="overwrite existing keys")
    keys.set_defaults(func=run_keys)


def run_keys(args) -> int:
    import re

    from spikevaediff.core.errors import UserError
    from spikevaediff.services.transport import generate_keypair

    for identity in args.identities:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", identity):
            raise UserError(f"bad identity '{identity}' (letters, digits, _ and - only)")
        secret = args.out / f"{identity}.key_secret"
        if secret.exists() and not args.force:
            raise UserError(f"{secret} exists (pass --force to replace it)")
    for identity in args.identities:
        public, secret = generate_keypair(args.out, identity)
        print(f"{identity}: public {public}, secret {secret}")
    return 0
