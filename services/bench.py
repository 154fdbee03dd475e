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
            if key == "payloads":  # per-payload copies of the top-level transport ratios
                continue
            name = f"{prefix}{key}"
            if key.endswith("ratio") and isinstance(value, (int, float)):
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


def _hop_stats(values) -> dict:
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"n": 0, "p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    return {"n": int(a.size), "p50_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def bench_live(sessions, bundle_dir, out: Path, duration: float = 20.0, speed: float = 1.0,
               warmup_s: float = 2.0, n_refiners: int = 1, refiner_steps: int | None = None,
               backend: str | None = None, transport: str = "tcp", seed: int = 0, device: str = "cpu") -> dict:
    """Run the live system and measure it, excluding the first `warmup_s` of neural time."""
    import numpy as np

    from .launcher import run_live
    from .run_config import build_run_config
    from .recording import read_recording
    from .run_report import PREVIEW_HOPS, REFINED_HOPS

    config = build_run_config(sessions, bundle_dir, out, speed=speed, duration=duration + warmup_s,
                              n_refiners=n_refiners, refiner_steps=refiner_steps, backend=backend,
                              transport=transport, device=device)
    config.preview_seed = config.refiner.seed = seed
    config.validate()
    outcome, summary = run_live(config)
    rec = read_recording(Path(config.out) / "recording.h5", images=False)
    result = {"reason": outcome.reason, "duration_s": duration, "warmup_s": warmup_s, "speed": speed,
              "n_refiners": n_refiners, "device": device, "hops": {}}
    t_start = rec["counts"]["t0"].min() if rec["counts"]["n"] else 0.0
    for group, hops in (("preview", PREVIEW_HOPS), ("refined", REFINED_HOPS)):
        data = rec[group]
        keep = data["t0"] >= t_start + warmup_s if data["n"] else np.zeros(0, bool)
        for hop in hops:
            values = np.asarray(data["hops"].get(hop, np.zeros(data["n"])))
            result["hops"][hop] = _hop_stats(values[keep])
    period = 1.0 / 30.0 if rec["counts"]["n"] < 2 else float(np.median(np.diff(rec["counts"]["t0"])))
    decode = result["hops"].get("decode", {}).get("p50_ms", float("nan"))
    refine = result["hops"].get("refine", {}).get("p50_ms", float("nan"))
    # FALCON's normalized latency: compute time over the neural time it covers (< 1 = real time).
    result["normalized_latency"] = {"decoder": decode / 1e3 / (period / speed),
                                    "refiner_per_bin": refine / 1e3 / (period / speed)}
    result["bin_period_s"] = period
    if summary:
        result["throughput_bins_per_s"] = summary.get("throughput_hz")
        result["counts_gaps"] = summary["counts"]["file_seq"]
        result["drops"] = {"preview_lane": summary["preview"]["lane"], "refined_lane": summary["refined"]["lane"],
                           "refine_requests": summary["refined"].get("decoder_requests")}
        result["pacing_error_ms"] = summary.get("pacing_error_ms")
    return result


def latency_plot(path: Path, live: dict) -> None:
    """Per-hop p50/p99 bars on a log axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = [h for h, s in live["hops"].items() if s["n"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k, (q, label) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max"))):
        ax.barh([i + 0.27 * (k - 1) for i in range(len(hops))], [live["hops"][h][q] for h in hops],
                height=0.25, label=label)
    ax.axvline(1e3 * live["bin_period_s"] / live["speed"], color="k", ls="--", lw=1, label="bin period")
    ax.set_yticks(range(len(hops)))
    ax.set_yticklabels(hops)
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_bench(sessions, bundle_dir, out, stages=STAGES, duration: float = 20.0, speed: float = 1.0,
              seed: int = 0, quick: bool = False, transport: str = "tcp", device: str = "cpu") -> dict:
    """Run the chosen stages and write bench.json + bench.md (+ latency.png).

    `device` "cuda" runs the refiner stage and the live run's decoder and refiners on the GPU."""
    import torch

    from spikevaediff.core.bundle import load_bundle
    from spikevaediff.core.config import ModelProfile

    out = Path(out)
    result = {"machine": machine_info(), "seed": seed, "stages": list(stages)}
    torch.manual_seed(seed)
    if "transport" in stages:
        from .bench_transport import bench_transport
        result["transport"] = bench_transport(transport, iterations=300 if quick else 2000,
                                              warmup=50 if quick else 200)
    if "projection" in stages:
        result["projection"] = bench_projection_stage(bundle_dir, paper_units=0 if quick else 500,
                                                      repeats=50 if quick else 200)
    if "refiner" in stages:
        from .bench_refiner import bench_refiner_backends
        m = load_bundle(bundle_dir).manifest
        torch.set_num_threads(1)
        result["refiner"] = bench_refiner_backends(ModelProfile(m.profile, m.weights_dir), steps=5,
                                                   repeats=3 if quick else 10, image_repeats=1 if quick else 2,
                                                   seed=seed, device=device)
    if "live" in stages:
        result["live"] = bench_live(sessions, bundle_dir, out / "live", duration=duration, speed=speed,
                                    seed=seed, transport=transport, device=device)
        latency_plot(out / "latency.png", result["live"])
    write_bench(out, result)
    return result
