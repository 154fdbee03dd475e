"""The run report of a live run: RUN_DIR/report.json, report.md and figures, from the recording.

- latency per hop (p50/p95/p99/max, ms) from the stamps each message carried
  (`recording.HOPS`; all on one host's monotonic clock);
- throughput: counts, previews and refined images per second against the movie's frame rate
  x speed (the bin period is read from the recorded neural times);
- the counts lane's sequence gaps (the recorder's own view and the file's seq column), drops per
  lane (previews and refined images the recorder never saw, refine requests superseded at the
  decoder), bad messages per service;
- pacing error of the replay: actual send time minus its schedule (relative to the first bin);
- figures: latency histograms, and a strip of ground truth | preview | refined over time (ground
  truth from the session's movie frames, square-cropped like training did).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spikevaediff.core.errors import UserError

from .recording import read_recording

PREVIEW_HOPS = ("transport", "decode", "preview_end_to_end")
REFINED_HOPS = ("request_transport", "refine", "refined_end_to_end")
DEFAULT_FRAME_RATE = 30.0  # Allen natural movies; used only when the recording has < 2 bins
STRIP_COLUMNS = 8


def latency_summary(values_ms) -> dict:
    """n, p50/p95/p99/max and mean of the finite values (ms); n=0 when there are none."""
    v = np.asarray(values_ms, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"n": int(v.size), "p50": float(p50), "p95": float(p95), "p99": float(p99),
            "max": float(v.max()), "mean": float(v.mean())}


def _rate(stamps_ns: np.ndarray) -> float | None:
    s = np.asarray(stamps_ns, dtype=np.int64)
    s = s[s >= 0]
    if s.size < 2 or s.max() == s.min():
        return None
    return float((s.size - 1) / ((s.max() - s.min()) / 1e9))


def seq_gaps(seq: np.ndarray) -> dict:
    """Gaps in a recorded seq column (sorted): how many jumps and how many numbers are missing."""
    s = np.sort(np.asarray(seq, dtype=np.int64))
    if s.size < 2:
        return {"gaps": 0, "missing": 0}
    d = np.diff(s)
    return {"gaps": int((d > 1).sum()), "missing": int((d[d > 1] - 1).sum()),
            "duplicates": int((d == 0).sum())}


def pacing_error_ms(counts: dict, speed: float) -> np.ndarray:
    """Send time minus schedule per bin (ms), the schedule anchored at the first recorded bin."""
    send = counts["stamps"].get("replay_send", np.array([], dtype=np.int64))
    t1 = counts["t1"]
    ok = send >= 0
    if ok.sum() < 2:
        return np.array([])
    send, t1 = send[ok].astype(np.float64), t1[ok]
    # consecutive bins can come from different presentations (loops, repeats): use the stream's
    # own clock only within one run of increasing neural time
    actual = (send - send[0]) / 1e6
    scheduled = (t1 - t1[0]) / speed * 1e3
    monotone = np.r_[True, np.diff(t1) > 0].cumprod().astype(bool)
    return (actual - scheduled)[monotone]


def _find_key(tree, key: str):
    """First value under `key` anywhere in a nested dict (service stats are free-form)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _service_lane_counters(stats: dict) -> dict:
    """gaps / missing / superseded / bad_total summed over the lane stats found in `stats`."""
    totals = {"gaps": 0, "missing": 0, "superseded": 0, "bad_total": 0}

    def walk(tree):
        if isinstance(tree, dict):
            if "received" in tree and "gaps" in tree:  # a LaneStats.as_dict()
                for k in totals:
                    totals[k] += int(tree.get(k, 0) or 0)
                return
            for value in tree.values():
                walk(value)
    walk(stats)
    return totals


def summarize(recording: dict, config, outcome=None) -> dict:
    """Every figure of the report as a JSON-ready dict."""
    counts, preview, refined = recording["counts"], recording["preview"], recording["refined"]
    speed = float(config.speed)
    t0 = counts["t0"]
    period = float(np.median(np.diff(t0))) if t0.size > 1 and np.median(np.diff(t0)) > 0 else 1 / DEFAULT_FRAME_RATE
    expected = speed / period
    latency = {hop: latency_summary(preview["hops"][hop]) for hop in PREVIEW_HOPS}
    latency.update({hop: latency_summary(refined["hops"][hop]) for hop in REFINED_HOPS})
    services = dict(outcome.services) if outcome is not None else {}
    recorder_stats = services.get("recorder", {}).get("stats", {}) or {}
    lanes = {name: recorder_stats.get(f"{name}_lane") or {} for name in ("counts", "preview", "refined")}
    pacing = pacing_error_ms(counts, speed)
    per_service = {}
    for label, info in services.items():
        per_service[label] = {"state": info.get("state"), "returncode": info.get("returncode"),
                              "error": info.get("error", ""),
                              **_service_lane_counters(info.get("stats") or {})}
    replay_pacing = _find_key(services.get("replay", {}).get("stats", {}), "pacing_error_ms") \
        or _find_key(services.get("replay", {}).get("stats", {}), "pacing")
    return {
        "reason": getattr(outcome, "reason", None),
        "error": getattr(outcome, "error", ""),
        "wall_s": getattr(outcome, "wall_s", None),
        "speed": speed,
        "bin_period_s": period,
        "counts": {"recorded": int(counts["n"]), "file_seq": seq_gaps(counts["seq"]),
                   "lane": _lane(lanes, "counts")},
        "preview": {"recorded": int(preview["n"]), "lane": _lane(lanes, "preview"),
                    "sent": _find_key(services.get("decoder", {}).get("stats", {}), "previews_sent"),
                    # bins the decoder passed over to catch up when it fell behind
                    "decoder_skipped": _find_key(services.get("decoder", {}).get("stats", {}), "stale_skipped")},
        "refined": {"recorded": int(refined["n"]), "lane": _lane(lanes, "refined"),
                    "sent": sum(int((info.get("stats") or {}).get("refined_sent", 0) or 0)
                                for label, info in services.items() if label.startswith("refiner")),
                    "by_stream": {str(s): int((refined["stream"] == s).sum()) for s in np.unique(refined["stream"])},
                    "decoder_requests": _find_key(services.get("decoder", {}).get("stats", {}), "refine"),
                    "skipped": sum(int((info.get("stats") or {}).get("skipped", 0) or 0)
                                   for label, info in services.items() if label.startswith("refiner"))},
        "throughput_hz": {"expected": expected, "counts": _rate(counts["stamps"]["replay_send"]),
                          "preview": _rate(preview["stamps"]["decoder_preview_send"]),
                          "refined": _rate(refined["stamps"]["refiner_send"])},
        "latency_ms": latency,
        "pacing_error_ms": latency_summary(np.abs(pacing)) | (
            {"mean_signed": float(pacing.mean())} if pacing.size else {}),
        "replay_reported_pacing": replay_pacing,
        "services": per_service,
    }


def _lane(lanes: dict, name: str) -> dict:
    stats = lanes.get(name) or {}
    return {k: stats.get(k) for k in ("received", "gaps", "missing", "dropped", "bad_total") if k in stats}


# ---------------------------------------------------------------------------- figures
def ground_truth_frames(config, frame_indices, size: int = 128) -> np.ndarray | None:
    """Square-cropped movie frames [N, size, size] for the recorded frame indices (None if unavailable)."""
    from spikevaediff.core.bundle import MANIFEST_NAME
    from spikevaediff.replay.nwb import open_session
    from spikevaediff.training.dataset import square_frames

    try:
        movie = json.loads((Path(config.bundle) / MANIFEST_NAME).read_text())["movie"]
        with open_session(config.sessions[0]) as session:
            frames = session.frames(movie)
    except (UserError, OSError, KeyError, ValueError, IndexError):
        return None
    idx = np.clip(np.asarray(frame_indices, dtype=np.int64), 0, len(frames) - 1)
    return square_frames(frames[idx], size)


def strip_figure(recording: dict, config, path: Path, columns: int = STRIP_COLUMNS) -> bool:
    """Ground truth | preview | refined at `columns` moments of the run; False when nothing was recorded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preview, refined = recording["preview"], recording["refined"]
    if preview["n"] == 0 or "image" not in preview:
        return False
    have_refined = refined["n"] > 0 and "image" in refined
    source = refined if have_refined else preview
    picks = np.unique(np.linspace(0, source["n"] - 1, min(columns, source["n"])).round().astype(int))
    bins = source["bin"][picks]
    frames = source["frame"][picks]
    # the preview of the same bin (or the latest one before it)
    prev_rows = [int(np.searchsorted(preview["bin"], b, side="right") - 1) for b in bins]
    gt = ground_truth_frames(config, np.where(frames >= 0, frames, 0))
    rows = 3 if have_refined else 2
    fig, axes = plt.subplots(rows, len(picks), figsize=(1.6 * len(picks), 1.7 * rows), squeeze=False)
    for j, pick in enumerate(picks):
        t = (source["t0"][pick] - recording["counts"]["t0"][0]) if recording["counts"]["n"] else source["t0"][pick]
        ax = axes[0, j]
        if gt is not None and frames[j] >= 0:
            ax.imshow(gt[j], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"bin {bins[j]}\nt={t:.1f}s", fontsize=7)
        axes[1, j].imshow(preview["image"][max(prev_rows[j], 0)])
        if have_refined:
            axes[2, j].imshow(refined["image"][pick])
    for i, label in enumerate(["ground truth", "preview", "refined"][:rows]):
        axes[i, 0].set_ylabel(label, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def latency_figure(recording: dict, path: Path) -> None:
    """One histogram per hop, p50/p99 marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = [("preview", h) for h in PREVIEW_HOPS] + [("refined", h) for h in REFINED_HOPS]
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5))
    for ax, (group, hop) in zip(axes.ravel(), hops):
        v = recording[group]["hops"][hop]
        v = v[np.isfinite(v)]
        ax.set_title(hop.replace("_", " "), fontsize=9)
        ax.set_xlabel("ms", fontsize=8)
        if v.size == 0:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(v, bins=min(50, max(5, v.size // 3)), color="tab:blue", alpha=0.8)
        for q, style in ((50, "-"), (99, "--")):
            ax.axvline(np.percentile(v, q), color="k", linestyle=style, linewidth=1, label=f"p{q}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- text
def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(summary: dict, figures: dict) -> str:
    lines = ["# Live run report", "",
             f"Ended: **{summary['reason']}**" + (f" ({summary['error']})" if summary.get("error") else "")
             + f"; wall time {_fmt(summary['wall_s'], 1)} s; speed {summary['speed']:g}.", "",
             "## Latency per hop (ms)", "", "| hop | n | p50 | p95 | p99 | max |", "|---|---|---|---|---|---|"]
    for hop, s in summary["latency_ms"].items():
        lines.append(f"| {hop} | {s['n']} | " + " | ".join(_fmt(s.get(k)) for k in ("p50", "p95", "p99", "max")) + " |")
    tp = summary["throughput_hz"]
    lines += ["", "## Throughput", "", f"Expected bin rate: {_fmt(tp['expected'])} Hz "
              f"(bin period {summary['bin_period_s'] * 1000:.2f} ms of neural time, speed {summary['speed']:g}).", "",
              "| stream | recorded | rate (Hz) |", "|---|---|---|",
              f"| counts | {summary['counts']['recorded']} | {_fmt(tp['counts'])} |",
              f"| preview | {summary['preview']['recorded']} of {_fmt(summary['preview']['sent'])} sent | {_fmt(tp['preview'])} |",
              f"| refined | {summary['refined']['recorded']} of {_fmt(summary['refined']['sent'])} sent | {_fmt(tp['refined'])} |",
              "", "## Gaps and drops", "",
              f"Counts lane (recorder): {summary['counts']['lane']}; in the file: {summary['counts']['file_seq']}.",
              f"Preview lane (recorder): {summary['preview']['lane']}; bins the decoder skipped to catch up: "
              f"{_fmt(summary['preview']['decoder_skipped'])}.",
              f"Refined lane (recorder): {summary['refined']['lane']}; per refiner: {summary['refined']['by_stream']}.",
              f"Refine requests at the decoder (superseded = bins no refiner was free for): "
              f"{summary['refined']['decoder_requests']}; skipped as unchanged by the refiners: "
              f"{summary['refined']['skipped']}.",
              "", "| service | state | exit | gaps | missing | superseded | bad |", "|---|---|---|---|---|---|---|"]
    for label, s in summary["services"].items():
        lines.append(f"| {label} | {s['state']} | {s['returncode']} | {s['gaps']} | {s['missing']} | "
                     f"{s['superseded']} | {s['bad_total']} |")
    p = summary["pacing_error_ms"]
    lines += ["", "## Pacing", "", f"|send - schedule| over {p['n']} bins: p50 {_fmt(p.get('p50'))} ms, "
              f"p99 {_fmt(p.get('p99'))} ms, max {_fmt(p.get('max'))} ms (schedule anchored at the first bin).",
              f"The replay's own report: {summary['replay_reported_pacing']}.", "", "## Figures", ""]
    for name, file in figures.items():
        lines.append(f"![{name}]({file})")
    return "\n".join(lines) + "\n"


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    lat = summary["latency_ms"]
    tp = summary["throughput_hz"]

    def hop(name):
        s = lat[name]
        return f"p50 {s['p50']:.1f} / p99 {s['p99']:.1f} ms" if s["n"] else "no data"

    gaps = summary["counts"]["lane"].get("gaps", summary["counts"]["file_seq"]["gaps"])
    return "\n".join([
        f"run ended: {summary['reason']}" + (f" ({summary['error']})" if summary.get("error") else ""),
        f"bins {summary['counts']['recorded']} at {_fmt(tp['counts'])} Hz (expected {_fmt(tp['expected'])}); "
        f"previews recorded {summary['preview']['recorded']} of {_fmt(summary['preview']['sent'])}; "
        f"refined {summary['refined']['recorded']} of {summary['refined']['sent']}; counts-lane gaps {gaps}",
        f"decode {hop('decode')}; preview end to end {hop('preview_end_to_end')}; "
        f"refine {hop('refine')}; refined end to end {hop('refined_end_to_end')}",
        f"pacing |error| p99 {_fmt(summary['pacing_error_ms'].get('p99'))} ms",
    ])


def write_run_report(run_dir, config, outcome=None) -> dict:
    """Write report.json, report.md, latency.png and strip.png into RUN_DIR; the summary dict."""
    run_dir = Path(run_dir)
    recording = read_recording(run_dir / "recording.h5")
    summary = summarize(recording, config, outcome)
    figures = {}
    latency_figure(recording, run_dir / "latency.png")
    figures["latency histograms"] = "latency.png"
    if strip_figure(recording, config, run_dir / "strip.png"):
        figures["ground truth | preview | refined"] = "strip.png"
    summary["figures"] = figures
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    (run_dir / "report.md").write_text(markdown(summary, figures))
    return summary


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
