"""`spikevaediff bench`: latency of the whole chain and of each stage, with same-run baselines.

Every comparison is measured side by side in one run and reported as a ratio (ours / baseline, in
time: below 1 is faster) under a key containing "ratio":
- transport: our protocol round trip vs a bare pyzmq echo of the same payloads;
- projection: the decoder's projection vs a naive dense numpy matmul (session shape and the
  published-model widths);
- refiner: ONNX Runtime vs eager torch per UNet step, and the reduced-step schedule vs the paper's
  37-step DDIM schedule (UNet evaluations, time, SSIM and CLIP similarity of the two images);
- live: the services run for real on the session (per-hop and end-to-end latency, throughput,
  normalized latency = compute time / neural time, drops).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
from pathlib import Path

log = logging.getLogger(__name__)

STAGES = ("transport", "projection", "refiner", "live")


def machine_info() -> dict:
    """CPU, GPU and versions, so a bench.json says where it was measured."""
    import numpy
    import torch
    import zmq

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "numpy": numpy.__version__,
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return info


def bench_projection_stage(bundle_dir, paper_units: int = 500, repeats: int = 200, threads: int = 1) -> dict:
    """The bundle's own projection, and the published-model widths at `paper_units` units."""
    from spikevaediff.core.bundle import load_bundle

    from .bench_projection import PAPER_WIDTHS, bench_projection, synthetic_ridges

    bundle = load_bundle(bundle_dir)
    out = {"bundle": bench_projection(bundle.ridges, repeats=repeats, refine_every=15, threads=threads)}
    if paper_units:
        ridges = synthetic_ridges(paper_units, PAPER_WIDTHS, n_train=max(600, paper_units + 100))
        out["paper_widths"] = bench_projection(ridges, repeats=max(10, repeats // 10), warmup=3,
                                               refine_every=15, threads=threads)
    return out


def collect_ratios(tree, prefix: str = "") -> dict:
    """Every key containing 'ratio' in a nested result, flattened to 'a.b.key'."""
    found = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if "ratio" in key and isinstance(value, (int, float)):
                found[name] = float(value)
            else:
                found.update(collect_ratios(value, name + "."))
    return found


def write_bench(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["ratios"] = collect_ratios({k: v for k, v in result.items() if k != "ratios"})
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=float))
    lines = ["# spikevaediff bench", "", f"machine: {result['machine'].get('cpu')} "
             f"({result['machine'].get('cpu_count')} cores), GPU: {result['machine'].get('gpu')}", "",
             "## Ratios (ours / baseline, in time: below 1 is faster)", "", "| measure | ratio |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in sorted(result["ratios"].items())]
    live = result.get("live")
    if live and "hops" in live:
        lines += ["", "## Live run latencies (ms)", "", "| hop | p50 | p95 | p99 | max | n |", "|---|---|---|---|---|---|"]
        for hop, s in live["hops"].items():
            lines.append(f"| {hop} | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} | {s['p99_ms']:.2f} | {s['max_ms']:.2f} | {s['n']} |")
        for key in ("normalized_latency", "throughput_bins_per_s", "counts_gaps", "drops"):
            if key in live:
                lines.append(f"\n- {key}: {live[key]}")
        lines += ["", "![latency](latency.png)"]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
