"""`spikevaediff bench`: the whole chain and each stage, with same-run baselines as ratios."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from spikevaediff.services.bench import STAGES  # light module: no heavy imports at top

    p = subparsers.add_parser(
        "bench", help="latency benchmark: live chain and each stage, with same-run baselines (ratios)",
        description=(
            "Measure the system on a session and bundle and write DIR/bench.json, DIR/bench.md and "
            "DIR/latency.png. Stages: transport (our protocol vs a bare pyzmq echo), projection (the "
            "decoder's projection vs a naive dense numpy matmul, for the bundle and for the published "
            "widths), refiner (ONNX Runtime vs eager torch per UNet step; reduced steps vs the paper's "
            "37-step DDIM: UNet evaluations, time, SSIM and CLIP similarity of the two images), live "
            "(the services for real: per-hop and end-to-end latency p50/p95/p99/max, throughput, "
            "normalized latency = compute time / neural time (< 1 is real time), drops, pacing). "
            "Ratios are ours / baseline in time: below 1 is faster. Warm-up is excluded."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--session", nargs="+", required=True, help="NWB session file(s) of the bundle")
    p.add_argument("--bundle", required=True, help="bundle directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of neural time in the live stage")
    p.add_argument("--speed", type=float, default=1.0, help="replay speed of the live stage")
    p.add_argument("--transport", choices=("tcp", "ipc"), default="tcp", help="loopback transport")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and decoding")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N: where the refiner stage and the live run's decoder and refiners run")
    p.set_defaults(func=run_bench_command)


def run_bench_command(args) -> int:
    from spikevaediff.core.errors import UserError
    from spikevaediff.services.bench import run_bench

    if not Path(args.bundle).is_dir():
        raise UserError(f"bundle not found: {args.bundle}")
    for s in args.session:
        if not Path(s).is_file():
            raise UserError(f"session file not found: {s}")
    if args.device != "cpu":
        import re

        import torch

        if not re.fullmatch(r"cuda(:\d+)?", args.device):
            raise UserError(f"--device must be cpu, cuda or cuda:N, got '{args.device}'")
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: torch sees no CUDA device on this machine")
    result = run_bench(args.session, args.bundle, args.out, stages=tuple(args.stage), duration=args.duration,
                       speed=args.speed, seed=args.seed, quick=args.quick, transport=args.transport,
                       device=args.device)
    print(f"{'ratio (ours / baseline, time)':58s} value")
    for key, value in sorted(result["ratios"].items()):
        print(f"{key:58s} {value:.3f}")
    live = result.get("live")
    if live:
        for hop, s in live["hops"].items():
            print(f"live {hop:28s} p50 {s['p50_ms']:9.2f}  p99 {s['p99_ms']:9.2f}  max {s['max_ms']:9.2f} ms (n {s['n']})")
        print(f"normalized latency (compute / neural time): {live['normalized_latency']}")
    print(f"wrote {Path(args.out) / 'bench.json'} and bench.md")
    return 0
