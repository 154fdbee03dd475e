"""Spike trains from the unit model over a session timeline, and the Allen unit-quality metrics.

The timeline (`Schedule`) says which movie frame is on screen when. Rates are evaluated on a
fine grid (`DT`): the frame a unit responds to is the one shown one latency earlier, its rate
comes from the unit's LNP model, multiplied by slow shared gain fluctuations; spikes are Bernoulli
draws per grid bin, placed uniformly inside it, thinned to respect a refractory period and
rounded to the 30 kHz sample clock of a Neuropixels probe.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .population import AREAS, REFRACTORY_S, Population

DT = 1.0 / 240.0            # fine time grid (8 steps per movie frame)
SAMPLE_RATE = 30000.0       # Neuropixels AP band
GAIN_STEP_S = 0.05          # shared gain noise is an AR(1) process sampled every 50 ms
GAIN_TAU_S = 2.0
SHARED_GAIN_SD = 0.30
AREA_GAIN_SD = 0.20
PRIVATE_GAIN_SD = 0.35      # each unit's own excitability drifts too (faster)
PRIVATE_GAIN_TAU_S = 0.5
ISI_THRESHOLD_S = 0.0015    # allensdk's isi_violations refractory threshold
PRESENCE_BLOCKS = 100
PRESENCE_MIN_BLOCK_S = 5.0


@dataclass
class Schedule:
    """What is on screen when: one entry per movie-frame presentation (all movies, time order)."""

    start_times: np.ndarray   # float64 [P]
    stop_times: np.ndarray    # float64 [P]
    movie: np.ndarray         # int64 [P], index into `movie_names`
    frame: np.ndarray         # int64 [P]
    block: np.ndarray         # int64 [P], stimulus_block
    repeat: np.ndarray        # int64 [P], per movie
    movie_names: tuple[str, ...]
    duration_s: float
    grey_intervals: list[tuple[float, float, int]]  # (start, stop, block) of spontaneous periods
    invalid_interval: tuple[float, float] | None = None


def grid_presentations(schedule: Schedule, dt: float = DT) -> np.ndarray:
    """For each fine-grid bin centre, the index of the presentation on screen (-1: grey)."""
    n_bins = int(np.ceil(schedule.duration_s / dt))
    centres = (np.arange(n_bins) + 0.5) * dt
    idx = np.searchsorted(schedule.start_times, centres, side="right") - 1
    on = (idx >= 0) & (centres < schedule.stop_times[np.clip(idx, 0, None)])
    return np.where(on, idx, -1)


def _ar1(n: int, step_s: float, tau_s: float, sd: float, rng: np.random.Generator,
         series: int = 1) -> np.ndarray:
    """Stationary AR(1) samples [series, n] with correlation time tau and standard deviation sd."""
    a = np.exp(-step_s / tau_s)
    noise = rng.normal(0.0, sd * np.sqrt(1 - a * a), (n, series))
    noise[0] = rng.normal(0.0, sd, series)
    for i in range(1, n):  # a few thousand steps: a plain loop over time, vectorised over series
        noise[i] += a * noise[i - 1]
    return noise.T.copy()


def _filtered_presentations(linear: np.ndarray, schedule: Schedule, kernels: np.ndarray) -> np.ndarray:
    """Temporal FIR over the presentation sequence [K, P]; history resets at block starts (grey)."""
    out = kernels[:, :1] * linear
    for lag in range(1, kernels.shape[1]):
        same_block = np.zeros(linear.shape[1], dtype=bool)
        same_block[lag:] = schedule.block[lag:] == schedule.block[:-lag]
        shifted = np.zeros_like(linear)
        shifted[:, lag:] = linear[:, :-lag]
        out += kernels[:, lag:lag + 1] * shifted * same_block[None, :]
    return out


def simulate_spike_trains(population: Population, movies: dict[str, np.ndarray],
                          schedule: Schedule, seed: int = 0, chunk: int = 32,
                          progress: bool = False) -> list[np.ndarray]:
    """Sorted spike times (s, float64) for every unit of `population` over `schedule`."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    # Filter outputs for every movie frame, concatenated over movies: [K, sum F].
    linear, offsets, owners = [], [0], None
    for name in schedule.movie_names:
        lin, owners = population.linear_responses(movies[name])
        linear.append(lin)
        offsets.append(offsets[-1] + lin.shape[1])
    linear = np.concatenate(linear, axis=1)
    global_frame = np.asarray(offsets)[schedule.movie] + schedule.frame

    grid = grid_presentations(schedule)
    n_bins = len(grid)
    n_steps = int(np.ceil(n_bins * DT / GAIN_STEP_S)) + 1
    coarse = (np.arange(n_bins) * DT / GAIN_STEP_S).astype(np.int64)
    shared = _ar1(n_steps, GAIN_STEP_S, GAIN_TAU_S, SHARED_GAIN_SD, rng)[0]
    per_area = dict(zip(AREAS, _ar1(n_steps, GAIN_STEP_S, GAIN_TAU_S, AREA_GAIN_SD, rng, len(AREAS))))
    kernels_all = population.temporal_kernels()

    trains: list[np.ndarray] = []
    starts = range(0, population.n_units, chunk)
    for start in tqdm(starts, desc="simulating spikes", disable=not progress, unit="chunk"):
        units = np.arange(start, min(start + chunk, population.n_units))
        rows = np.flatnonzero(np.isin(owners, units))
        seq = _filtered_presentations(linear[rows][:, global_frame], schedule, kernels_all[owners[rows]])
        drive = population.drive(seq, owners[rows], units)
        z = (drive - drive.mean(axis=1, keepdims=True)) / (drive.std(axis=1, keepdims=True) + 1e-6)
        rate_pres = population.rates(z, units)
        # Last column: the spontaneous rate, used on grey screen.
        rate_ext = np.concatenate([rate_pres, population.baseline_hz[units, None].astype(np.float32)], axis=1)
        private = _ar1(n_steps, GAIN_STEP_S, PRIVATE_GAIN_TAU_S, PRIVATE_GAIN_SD, rng, len(units))
        for i, u in enumerate(units):
            lag = int(round(population.latency_s[u] / DT))
            shown = np.full(n_bins, -1, dtype=np.int64)
            shown[lag:] = grid[:n_bins - lag]
            coupling = population.gain_coupling[u]
            log_gain = coupling * shared + per_area[population.area[u]] + private[i]
            log_gain -= 0.5 * (coupling**2 * SHARED_GAIN_SD**2 + AREA_GAIN_SD**2 + PRIVATE_GAIN_SD**2)
            rate = rate_ext[i][shown] * np.exp(log_gain[coarse]).astype(np.float32)
            p = np.minimum(rate * DT, 0.9)
            bins = np.flatnonzero(rng.random(n_bins, dtype=np.float32) < p)
            times = (bins + rng.random(len(bins))) * DT
            trains.append(_quantise(_refractory(times)))
    return trains


def _refractory(times: np.ndarray, period: float = REFRACTORY_S) -> np.ndarray:
    """Drop spikes closer than `period` to the previous kept spike."""
    while len(times) > 1:
        bad = np.flatnonzero(np.diff(times) < period) + 1
        if len(bad) == 0:
            break
        # Remove only spikes whose predecessor is kept, so chains are thinned one step at a time.
        keep = np.ones(len(times), dtype=bool)
        keep[bad[np.isin(bad - 1, bad, invert=True)]] = False
        times = times[keep]
    return times


def _quantise(times: np.ndarray) -> np.ndarray:
    return np.unique(np.round(times * SAMPLE_RATE)) / SAMPLE_RATE


# ---- recording artefacts and quality metrics --------------------------------------------------

def add_sorting_artefacts(trains: list[np.ndarray], duration_s: float, seed: int
                          ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Make some units fail allensdk's default filters the way real ones do.

    ~12% miss spikes below the detection threshold (amplitude_cutoff >= 0.1), ~8% drift out of
    the recording for part of the session (presence_ratio < 0.95), ~7% are contaminated by
    another unit (isi_violations >= 0.5), ~4% are labelled noise. Returns the new trains and
    the per-unit amplitude_cutoff, quality, snr and amplitude.
    """
    rng = np.random.default_rng(seed)
    n = len(trains)
    out = []
    cutoff = np.clip(rng.gamma(2.0, 0.015, n), 0.0, 0.09)
    missing = rng.random(n) < 0.12
    cutoff[missing] = rng.uniform(0.11, 0.5, missing.sum())
    drifting = rng.random(n) < 0.08
    contaminated = rng.random(n) < 0.07
    for u, t in enumerate(trains):
        t = t[rng.random(len(t)) >= cutoff[u]]  # spikes lost below threshold
        if drifting[u]:
            gone = rng.uniform(0.1, 0.4) * duration_s
            begin = rng.uniform(0, duration_s - gone)
            t = t[(t < begin) | (t >= begin + gone)]
        if contaminated[u] and len(t) > 10:
            # Spikes of a neighbouring neuron, partly independent, partly firing just after this
            # one (a burst split between clusters): refractory violations appear.
            n_extra = rng.poisson(len(t) * rng.uniform(0.3, 1.0))
            extra = rng.uniform(0, duration_s, n_extra)
            target = rng.uniform(0.6, 2.0)  # Hill et al. contamination score to reach
            n_close = int(target * 2 * len(t) ** 2 * ISI_THRESHOLD_S / duration_s)
            close = rng.choice(t, size=min(n_close, len(t))) + rng.uniform(2e-4, ISI_THRESHOLD_S, min(n_close, len(t)))
            t = _quantise(np.concatenate([t, extra, close]))
        out.append(t)
    quality = np.where(rng.random(n) < 0.04, "noise", "good")
    snr = np.exp(rng.normal(np.log(3.0), 0.4, n))
    amplitude = np.exp(rng.normal(np.log(150.0), 0.4, n))  # microvolts
    return out, {"amplitude_cutoff": cutoff, "quality": quality, "snr": snr, "amplitude": amplitude}


def quality_metrics(trains: list[np.ndarray], duration_s: float) -> dict[str, np.ndarray]:
    """firing_rate, isi_violations (Hill et al. 2011, as allensdk) and presence_ratio from spikes."""
    n = len(trains)
    rate, isi, presence = np.zeros(n), np.zeros(n), np.zeros(n)
    # allensdk uses 100 blocks of a ~2.5 h recording; a short synthetic one keeps blocks >= 5 s so
    # that a slow but stable unit is not mistaken for one drifting out.
    n_blocks = int(np.clip(duration_s // PRESENCE_MIN_BLOCK_S, 10, PRESENCE_BLOCKS))
    edges = np.linspace(0.0, duration_s, n_blocks + 1)
    for u, t in enumerate(trains):
        rate[u] = len(t) / duration_s
        if len(t) > 1:
            violations = np.count_nonzero(np.diff(t) < ISI_THRESHOLD_S)
            isi[u] = violations * duration_s / (2 * len(t) ** 2 * ISI_THRESHOLD_S)
        counts = np.histogram(t, edges)[0]
        presence[u] = np.count_nonzero(counts) / n_blocks
    return {"firing_rate": rate, "isi_violations": isi, "presence_ratio": presence}
