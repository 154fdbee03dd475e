"""Benchmark: vectorised frame-aligned binning vs a naive per-unit-per-frame loop, same run.

The naive loop (a boolean mask over the unit's whole train for every presentation) is what
binning code often starts as; it is timed on a few units and scaled linearly to all of them
(it is linear in units by construction) and checked to give the same counts.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .binning import SpikeBinner, bin_spikes, default_window
from .nwb import open_session

LIVE_CALLS = 300


def naive_bin(trains, onsets, window) -> np.ndarray:
    """Reference: one Python iteration per (presentation, unit)."""
    a, b = window
    counts = np.zeros((len(onsets), len(trains)), dtype=np.float32)
    for u, train in enumerate(trains):
        for p, t in enumerate(onsets):
            counts[p, u] = np.count_nonzero((train >= t + a) & (train < t + b))
    return counts


@dataclass
class BenchResult:
    session: str
    movie: str
    presentations: int
    units: int
    spikes: int
    window: tuple[float, float]
    vectorised_s: list[float]
    prepared_bin_s: list[float]
    prepare_s: float
    naive_units: int
    naive_measured_s: float
    simulated: bool
    live_vectorised_s: list[float]   # one onset per call (the live replay)
    live_prepared_s: list[float]

    @property
    def naive_scaled_s(self) -> float:
        return self.naive_measured_s * self.units / self.naive_units

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(naive_scaled_s=self.naive_scaled_s,
                 vectorised_median_s=float(np.median(self.vectorised_s)),
                 prepared_median_s=float(np.median(self.prepared_bin_s)),
                 speedup_vectorised=self.naive_scaled_s / float(np.median(self.vectorised_s)),
                 speedup_prepared=self.naive_scaled_s / float(np.median(self.prepared_bin_s)),
                 live_vectorised_median_s=float(np.median(self.live_vectorised_s)),
                 live_prepared_median_s=float(np.median(self.live_prepared_s)))
        return d

    def table(self) -> str:
        d = self.as_dict()
        src = "simulated full-size session" if self.simulated else self.session
        lines = [
            f"bench-binning: {self.movie} of {src}",
            f"  {self.presentations} presentations x {self.units} units, {self.spikes} spikes, "
            f"window {self.window[0]:.3f}-{self.window[1]:.3f} s",
            f"  {'method':<44}{'median (s)':>12}{'p99 (s)':>10}{'speed-up':>10}",
            f"  {'naive loop (' + str(self.naive_units) + ' units measured, scaled)':<44}"
            f"{self.naive_scaled_s:>12.3f}{'':>10}{'1.0x':>10}",
            f"  {'bin_spikes (searchsorted per unit)':<44}{d['vectorised_median_s']:>12.4f}"
            f"{np.percentile(self.vectorised_s, 99):>10.4f}{d['speedup_vectorised']:>9.0f}x",
            f"  {'SpikeBinner.bin (one searchsorted)':<44}{d['prepared_median_s']:>12.4f}"
            f"{np.percentile(self.prepared_bin_s, 99):>10.4f}{d['speedup_prepared']:>9.0f}x",
            f"  (SpikeBinner preparation, once per session: {self.prepare_s:.3f} s; "
            f"all counts checked equal to the naive loop on the measured units)",
            f"  live replay, one frame per call ({len(self.live_vectorised_s)} calls): "
            f"bin_spikes median {1e3 * np.median(self.live_vectorised_s):.3f} ms "
            f"(p99 {1e3 * np.percentile(self.live_vectorised_s, 99):.3f}), SpikeBinner median "
            f"{1e3 * np.median(self.live_prepared_s):.3f} ms "
            f"(p99 {1e3 * np.percentile(self.live_prepared_s, 99):.3f}); naive per frame "
            f"{1e3 * self.naive_scaled_s / self.presentations:.3f} ms",
        ]
        return "\n".join(lines)


def run_benchmark(session_path: Path | None = None, movie: str = "natural_movie_three",
                  naive_units: int = 8, runs: int = 5, progress: bool = False) -> BenchResult:
    """Time the three ways of binning on one session (simulating a full-size one if none given)."""
    with tempfile.TemporaryDirectory(prefix="spikevaediff-bench-") as tmp:
        simulated = session_path is None
        if simulated:
            from .simulate import MovieSpec, SimulationConfig, simulate_session

            session_path = Path(tmp) / "full.nwb"
            config = SimulationConfig.full(movies=(MovieSpec("natural_movie_three", 3600, 10),))
            simulate_session(session_path, config, progress=progress)
            movie = "natural_movie_three"
        with open_session(session_path) as session:
            units = session.units(filters=None)
            trains = session.spike_trains(units.ids)
            onsets = session.presentations(movie).start_times
        window = default_window(np.unique(units.areas))

    bin_spikes(trains, onsets[:100], window)  # warm-up
    vectorised = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        ours = bin_spikes(trains, onsets, window)
        vectorised.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    binner = SpikeBinner(trains)
    prepare = time.perf_counter() - t0
    prepared = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fast = binner.bin(onsets, window)
        prepared.append(time.perf_counter() - t0)

    # The live replay's case: one frame's onset per call.
    live_ours, live_prepared = [], []
    for i in np.linspace(0, len(onsets) - 1, LIVE_CALLS).astype(int):
        t0 = time.perf_counter()
        bin_spikes(trains, onsets[i:i + 1], window)
        t1 = time.perf_counter()
        binner.bin(onsets[i:i + 1], window)
        live_ours.append(t1 - t0)
        live_prepared.append(time.perf_counter() - t1)

    k = int(np.clip(naive_units, 1, len(trains)))
    subset = np.linspace(0, len(trains) - 1, k).astype(int)
    t0 = time.perf_counter()
    reference = naive_bin([trains[i] for i in subset], onsets, window)
    naive = time.perf_counter() - t0
    if not (np.array_equal(reference, ours[:, subset]) and np.array_equal(reference, fast[:, subset])):
        raise RuntimeError("vectorised binning disagrees with the naive reference")
    return BenchResult(str(session_path), movie, len(onsets), len(trains), int(sum(map(len, trains))),
                       window, vectorised, prepared, prepare, k, naive, simulated, live_ours, live_prepared)
