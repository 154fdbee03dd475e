"""Commands of the live system. For now: `bench-transport` (our transport vs bare pyzmq)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
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
