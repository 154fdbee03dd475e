"""Peri-stimulus time histograms per area (the seed paper's figure 4).

Left: each area's population rate over the movie, averaged over repeats (band: SEM across
repeats), so stimulus-locked structure shows as peaks that repeat. Right: all areas aligned to scene
cuts (found in the frames when they are available; else the movie's start, itself a cut from
the last frame back to the first), which shows each area's latency.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spikevaediff.core.errors import UserError

from .nwb import DEFAULT_UNIT_FILTERS

AREA_COLOURS = {"VISp": "#1f77b4", "VISl": "#ff7f0e", "VISrl": "#2ca02c", "VISal": "#d62728",
                "VISpm": "#9467bd", "VISam": "#8c564b"}
ONSET_RANGE_S = (-0.2, 0.5)
ONSET_BIN_S = 0.01


@dataclass
class AreaPsth:
    area: str
    n_units: int
    movie_time: np.ndarray    # bin starts (s from the movie's first frame)
    rate_mean: np.ndarray     # Hz per unit, averaged over repeats
    rate_sem: np.ndarray      # SEM across repeats
    onset_time: np.ndarray    # bin starts relative to scene cuts
    onset_rate: np.ndarray    # Hz per unit around scene cuts
    reliability: float        # correlation of odd- vs even-repeat averages


@dataclass
class PsthResult:
    movie: str
    session: str
    n_repeats: int
    areas: list[AreaPsth]
    n_cuts: int = 1           # scene cuts per repeat used for the latency panel


def _count(trains, edges: np.ndarray) -> np.ndarray:
    """Spikes of all `trains` together between consecutive `edges` (any shape, last axis)."""
    total = np.zeros(edges.size, dtype=np.int64)
    flat = edges.ravel()
    for train in trains:
        total += np.searchsorted(train, flat)
    total = total.reshape(edges.shape)
    return np.diff(total, axis=-1)


def compute_psth(session, movie: str, areas=None, filters=DEFAULT_UNIT_FILTERS,
                 bin_s: float = 2 / 30) -> PsthResult:
    """Per-area PSTHs of `movie` for the units passing `filters`."""
    if not 0.005 <= bin_s <= 5:
        raise UserError(f"PSTH bin {bin_s:g} s out of range (0.005 .. 5 s)")
    pres = session.presentations(movie)
    # One onset per complete, valid repeat: the presentation of frame 0.
    onsets = []
    for r in np.unique(pres.repeats):
        rows = pres.repeats == r
        if pres.valid[rows].all() and rows.sum() == pres.n_frames and pres.frames[rows][0] == 0:
            onsets.append(pres.start_times[rows][0])
    if not onsets:
        raise UserError(f"'{movie}' has no complete valid repeat to build a PSTH from")
    onsets = np.asarray(onsets)
    # Events for the latency panel: every scene cut (from the frames, when available) in every
    # complete repeat; the movie start is a cut too (last frame -> first).
    cuts = detect_cuts(session.frames(movie)) if session.has_frames(movie) else np.zeros(1, dtype=np.int64)
    events = (onsets[:, None] + cuts[None, :] / 30.0).ravel()
    duration = pres.n_frames / 30.0
    movie_edges = np.arange(0.0, duration + 1e-9, bin_s)
    onset_edges = np.arange(ONSET_RANGE_S[0], ONSET_RANGE_S[1] + 1e-9, ONSET_BIN_S)
    chosen = session.resolve_areas(areas) if areas is not None else session.areas()
    results = []
    for area in chosen:
        units = session.units([area], filters=filters)
        trains = session.spike_trains(units.ids)
        n = len(units)
        per_repeat = _count(trains, onsets[:, None] + movie_edges[None, :]) / (n * bin_s)  # [R, T]
        around = _count(trains, events[:, None] + onset_edges[None, :]).sum(0) / (n * len(events) * ONSET_BIN_S)
        around = np.convolve(np.pad(around, 1, mode="edge"), np.ones(3) / 3, mode="valid")  # 30 ms boxcar
        sem = per_repeat.std(0, ddof=1) / np.sqrt(len(onsets)) if len(onsets) > 1 else np.zeros(per_repeat.shape[1])
        reliability = np.nan
        if len(onsets) >= 2:
            odd, even = per_repeat[1::2].mean(0), per_repeat[::2].mean(0)
            if odd.std() > 0 and even.std() > 0:
                reliability = float(np.corrcoef(odd, even)[0, 1])
        results.append(AreaPsth(area, n, movie_edges[:-1], per_repeat.mean(0), sem,
                                onset_edges[:-1], around, reliability))
    return PsthResult(movie, Path(session.path).name, len(onsets), results, len(cuts))


def detect_cuts(frames: np.ndarray, factor: float = 6.0) -> np.ndarray:
    """Frame indices that start a new shot: 0, and frames much unlike their predecessor."""
    change = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2))
    threshold = factor * max(float(np.median(change)), 0.5)
    return np.r_[0, np.flatnonzero(change > threshold) + 1].astype(np.int64)


def plot_psth(result: PsthResult, out: str | os.PathLike) -> Path:
    """Draw the figure to `out` (PNG, PDF or SVG by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.areas)
    fig = plt.figure(figsize=(13, 1.6 * n + 1.2), constrained_layout=True)
    grid = fig.add_gridspec(n, 3)
    left = [fig.add_subplot(grid[i, :2]) for i in range(n)]
    right = fig.add_subplot(grid[:, 2])
    for ax, a in zip(left, result.areas):
        colour = AREA_COLOURS.get(a.area, "0.3")
        ax.fill_between(a.movie_time, a.rate_mean - a.rate_sem, a.rate_mean + a.rate_sem,
                        color=colour, alpha=0.25, linewidth=0, step="post")
        ax.step(a.movie_time, a.rate_mean, where="post", color=colour, linewidth=0.9)
        ax.set_ylabel("Hz / unit")
        ax.text(0.005, 0.95, f"{a.area}  ({a.n_units} units, repeat reliability r = {a.reliability:.2f})",
                transform=ax.transAxes, va="top", fontsize=9, fontweight="bold",
                bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
        ax.set_xlim(a.movie_time[0], a.movie_time[-1] + (a.movie_time[1] - a.movie_time[0]))
        ax.spines[["top", "right"]].set_visible(False)
        if ax is not left[-1]:
            ax.tick_params(labelbottom=False)
    left[-1].set_xlabel("time in movie (s)")
    left[0].set_title(f"{result.movie}: population rate per area, mean of {result.n_repeats} "
                      f"repeats (band: SEM)", fontsize=10, loc="left")
    for a in result.areas:
        right.plot(a.onset_time * 1000, a.onset_rate, color=AREA_COLOURS.get(a.area, "0.3"),
                   label=a.area, linewidth=1.2)
    right.axvline(0, color="0.4", linestyle="--", linewidth=0.8)
    right.set_xlabel("time from scene cut (ms)")
    right.set_ylabel("Hz / unit")
    right.set_title(f"aligned to scene cuts\n({result.n_cuts} per repeat x {result.n_repeats} repeats)",
                    fontsize=10)
    right.legend(frameon=False, fontsize=9)
    right.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"Peri-stimulus time histograms per area - {result.session}", fontsize=12)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
