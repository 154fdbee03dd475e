"""Frame-aligned spike counts: for every presentation, the spikes of every unit in a window after
the frame's onset (optionally split into sub-bins).

Counting is two binary searches per unit over all window edges at once, so the cost is
O(U * P * log N) with no Python loop over presentations; `SpikeBinner` goes further for
repeated small calls (the live replay): it prepares all trains once, then answers any chunk of
onsets with a single search.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spikevaediff.core.errors import UserError

from .nwb import DEFAULT_UNIT_FILTERS, Session, open_session
from .population import AREAS, area_latency

MAX_WINDOW_S = 1.0       # a frame-aligned bin longer than this is not a frame's response
FRAME_PERIOD_S = 1.0 / 30.0


def default_window(areas=None) -> tuple[float, float]:
    """(start, stop) after frame onset: from just before the earliest area's median latency to
    one frame after the latest one (e.g. VISp..VISam: 0.051 .. 0.106 s). None: all six areas."""
    if areas is None:
        areas = AREAS
    areas = [areas] if isinstance(areas, str) else list(areas)
    if not areas:
        raise UserError("no areas given for the default window")
    latencies = [area_latency(a) for a in areas]
    start = min(latencies) - 0.010
    stop = max(latencies) + FRAME_PERIOD_S
    return round(start, 4), round(stop, 4)


def check_window(window, n_subbins: int = 1) -> tuple[float, float]:
    """Validate a window after frame onset; UserError (one line) when it does not fit."""
    try:
        a, b = (float(x) for x in window)
    except (TypeError, ValueError):
        raise UserError(f"window must be two numbers (start, stop) in seconds, got {window!r}") from None
    if not (np.isfinite(a) and np.isfinite(b)) or a < 0 or b <= a or b > MAX_WINDOW_S:
        raise UserError(f"window {a:g}..{b:g} s does not fit: need 0 <= start < stop <= "
                        f"{MAX_WINDOW_S:g} s after frame onset")
    if int(n_subbins) != n_subbins or n_subbins < 1:
        raise UserError(f"sub-bins must be a positive integer, got {n_subbins}")
    return a, b


def _edges(onsets: np.ndarray, window: tuple[float, float], n_subbins: int) -> np.ndarray:
    a, b = window
    offsets = a + (b - a) * np.arange(n_subbins + 1) / n_subbins
    return np.asarray(onsets, dtype=np.float64)[:, None] + offsets[None, :]  # [P, S+1]


def bin_spikes(spike_trains, onsets, window=(0.05, 0.1), n_subbins: int = 1) -> np.ndarray:
    """Counts float32 [P, U] (or [P, U, S] with n_subbins > 1) of each sorted spike train in
    [onset + start, onset + stop) (sub-bins split that window evenly)."""
    window = check_window(window, n_subbins)
    n_subbins = int(n_subbins)
    edges = _edges(onsets, window, n_subbins)
    flat = edges.ravel()
    counts = np.empty((edges.shape[0], len(spike_trains), n_subbins), dtype=np.float32)
    for u, train in enumerate(spike_trains):
        pos = np.searchsorted(train, flat, side="left").reshape(edges.shape)
        counts[:, u, :] = np.diff(pos, axis=1)
    return counts[:, :, 0] if n_subbins == 1 else counts


class SpikeBinner:
    """Prepared spike trains for many cheap `bin` calls on chunks of onsets (live replay).

    All trains go into one sorted array, unit u shifted by u * span; one `searchsorted` then
    counts every unit and every edge. Results equal `bin_spikes` except when a spike lies
    within ~1e-9 s of a window edge (float rounding of the shift).
    """

    def __init__(self, spike_trains):
        self.n_units = len(spike_trains)
        lengths = [len(t) for t in spike_trains]
        last = max((float(t[-1]) for t in spike_trains if len(t)), default=0.0)
        self.span = 2.0 ** np.ceil(np.log2(last + MAX_WINDOW_S + 2.0))
        self.shift = np.arange(self.n_units, dtype=np.float64) * self.span
        self.merged = (np.concatenate([np.asarray(t, dtype=np.float64) + s
                                       for t, s in zip(spike_trains, self.shift)])
                       if sum(lengths) else np.zeros(0))

    def bin(self, onsets, window=(0.05, 0.1), n_subbins: int = 1) -> np.ndarray:
        """Same output as `bin_spikes(trains, onsets, window, n_subbins)`."""
        window = check_window(window, n_subbins)
        n_subbins = int(n_subbins)
        edges = _edges(onsets, window, n_subbins)                       # [P, S+1]
        # Unit-major order keeps the queries sorted when onsets are: cache-friendly search.
        shifted = self.shift[:, None, None] + edges[None, :, :]         # [U, P, S+1]
        pos = np.searchsorted(self.merged, shifted.ravel()).reshape(shifted.shape)
        counts = np.diff(pos, axis=2).astype(np.float32).transpose(1, 0, 2)
        return np.ascontiguousarray(counts[:, :, 0] if n_subbins == 1 else counts)


@dataclass
class BinnedCounts:
    """Frame-aligned counts of one movie: rows are presentations, columns units."""

    counts: np.ndarray       # float32 [P, U] or [P, U, S]
    frames: np.ndarray       # int64 [P]
    repeats: np.ndarray      # int64 [P]
    valid: np.ndarray        # bool [P]
    unit_ids: np.ndarray     # int64 [U]
    unit_areas: np.ndarray   # str [U]
    window: tuple[float, float]
    movie: str = ""
    onsets: np.ndarray | None = None   # float64 [P] frame onset times
    blocks: np.ndarray | None = None   # int64 [P]

    def save_npz(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path, counts=self.counts, frames=self.frames, repeats=self.repeats, valid=self.valid,
            unit_ids=self.unit_ids, unit_areas=self.unit_areas.astype(str),
            window=np.asarray(self.window, dtype=np.float64), movie=np.asarray(self.movie),
            onsets=self.onsets if self.onsets is not None else np.zeros(0),
            blocks=self.blocks if self.blocks is not None else np.zeros(0, dtype=np.int64))
        return path

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "BinnedCounts":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no such file: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                onsets, blocks = z["onsets"], z["blocks"]
                return cls(counts=z["counts"], frames=z["frames"], repeats=z["repeats"],
                           valid=z["valid"], unit_ids=z["unit_ids"], unit_areas=z["unit_areas"],
                           window=tuple(float(x) for x in z["window"]), movie=str(z["movie"]),
                           onsets=onsets if len(onsets) else None,
                           blocks=blocks if len(blocks) else None)
        except (KeyError, ValueError, OSError) as exc:
            raise UserError(f"{path} is not a binned-counts file ({type(exc).__name__}: {exc})") from None


def bin_session(session, movie: str, areas=None, window=None, n_subbins: int = 1,
                filters=DEFAULT_UNIT_FILTERS) -> BinnedCounts:
    """Bin every presentation of `movie` for the units of `areas` (all if None) that pass
    `filters` (allensdk's defaults; None keeps every unit). `session` is an open `Session` or a
    path. The default window comes from the selected areas' latencies (`default_window`)."""
    if not isinstance(session, Session):
        with open_session(session) as opened:
            return bin_session(opened, movie, areas, window, n_subbins, filters)
    units = session.units(areas, filters=filters)
    if window is None:
        window = default_window(np.unique(units.areas))
    window = check_window(window, n_subbins)
    pres = session.presentations(movie)
    trains = session.spike_trains(units.ids)
    counts = bin_spikes(trains, pres.start_times, window, n_subbins)
    return BinnedCounts(counts, pres.frames, pres.repeats, pres.valid, units.ids, units.areas,
                        window, movie, pres.start_times, pres.blocks)
