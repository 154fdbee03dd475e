"""Write a synthetic session in the Allen Visual Coding - Neuropixels NWB layout.

What a reader sees is what an Allen `session_<id>.nwb` holds (brain_observatory_1.1):
  - one `Device` and one `ElectrodeGroup` per probe (probeA..probeF, 384 channels each);
  - `electrodes` whose ids are channel ids, with `location` (structure acronym), probe positions,
    probe_id, local_index, valid_data;
  - `units` (ids are unit ids) with spike_times and the metrics columns, and `peak_channel_id`
    as the only link to an area (no area column);
  - `intervals["<movie>_presentations"]`: one row per frame, frame as float, stimulus_block,
    stimulus_name; repeats back to back inside a block, grey (`spontaneous_presentations`)
    between blocks; an `invalid_times` interval;
  - the movie as `stimulus_template/<movie>` (an ImageSeries), or, like Allen, outside the file
    as `<movie>.npy` next to it (`external_frames=True`).
"""
from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from spikevaediff.core.errors import UserError

from .movie import make_movie
from .population import Population
from .spiking import Schedule, add_sorting_artefacts, quality_metrics, simulate_spike_trains

FRAME_RATE = 30.0
KNOWN_MOVIES = ("natural_movie_one", "natural_movie_three")


@dataclass(frozen=True)
class MovieSpec:
    name: str
    n_frames: int
    n_repeats: int


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that defines a synthetic session (same config + seed -> same session).

    The default is sized for the demo (simulates and writes in a few seconds) while giving a
    decoder 9,000 single-trial frames of natural_movie_one; `full()` mirrors a real
    brain_observatory_1.1 session (natural_movie_three 3600 x 10, natural_movie_one 900 x 20,
    about 450 units). Frames are 64 x 128 by default: the Allen 1:2 aspect (304 x 608) at the
    resolution the 64 x 64 preview needs, which keeps the stored template small.
    """

    movies: tuple[MovieSpec, ...] = (MovieSpec("natural_movie_three", 600, 4),
                                     MovieSpec("natural_movie_one", 900, 10))
    frame_height: int = 64
    frame_width: int = 128
    units_scale: float = 1.0
    seed: int = 0
    movie_seed: int = 0          # the movie is the same for every session seed, as in Allen
    external_frames: bool = False
    blocks_per_movie: int = 2
    grey_s: float = 10.0
    invalid_s: float = 2.0

    @classmethod
    def full(cls, **overrides) -> "SimulationConfig":
        base = cls(movies=(MovieSpec("natural_movie_three", 3600, 10),
                           MovieSpec("natural_movie_one", 900, 20)),
                   units_scale=1.08, grey_s=30.0)
        return replace(base, **overrides)

    def validate(self) -> "SimulationConfig":
        if not self.movies:
            raise UserError("choose at least one movie")
        names = [m.name for m in self.movies]
        if len(set(names)) != len(names):
            raise UserError(f"movie listed twice: {', '.join(names)}")
        for m in self.movies:
            if m.name not in KNOWN_MOVIES:
                raise UserError(f"unknown movie '{m.name}' (choose from {', '.join(KNOWN_MOVIES)})")
            if m.n_frames < 2 or m.n_repeats < 1:
                raise UserError(f"{m.name}: need at least 2 frames and 1 repeat "
                                f"(got {m.n_frames} x {m.n_repeats})")
        if self.frame_height < 16 or self.frame_width < 16:
            raise UserError(f"frame size {self.frame_height}x{self.frame_width} is too small (min 16x16)")
        if self.frame_height * self.frame_width > 400 * 800:
            raise UserError(f"frame size {self.frame_height}x{self.frame_width} is too large (max 400x800)")
        if not 0.01 <= self.units_scale <= 20:
            raise UserError(f"units scale {self.units_scale} out of range (0.01 .. 20)")
        if self.blocks_per_movie < 1:
            raise UserError("blocks per movie must be at least 1")
        return self


@dataclass
class SimulationReport:
    path: Path
    n_units: int
    duration_s: float
    movies: dict[str, tuple[int, int]]
    frames_files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def movie_seed(config: SimulationConfig, name: str) -> int:
    """Movie content depends on its name and the movie seed only (not on the session seed)."""
    return (config.movie_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32


def build_schedule(config: SimulationConfig, seed: int) -> Schedule:
    """Blocks of back-to-back repeats, movies interleaved, grey between blocks (Allen style)."""
    rng = np.random.default_rng(seed)
    period = 1.0 / FRAME_RATE
    names = tuple(m.name for m in config.movies)
    starts, movie, frame, block, repeat = [], [], [], [], []
    grey, t, block_id = [], 0.0, 0
    repeats_done = {m.name: 0 for m in config.movies}
    for b in range(config.blocks_per_movie):
        for mi, m in enumerate(config.movies):
            # Split repeats over blocks as evenly as possible (earlier blocks get the extra ones).
            n_rep = m.n_repeats // config.blocks_per_movie + (b < m.n_repeats % config.blocks_per_movie)
            if n_rep == 0:
                continue
            grey.append((t, t + config.grey_s, block_id))
            t += config.grey_s
            block_id += 1
            n = n_rep * m.n_frames
            # Monitor frames jitter by ~0.1 ms around the nominal 30 Hz.
            onsets = t + np.arange(n) * period + rng.normal(0.0, 1e-4, n)
            starts.append(onsets)
            movie.append(np.full(n, mi))
            frame.append(np.tile(np.arange(m.n_frames), n_rep))
            block.append(np.full(n, block_id))
            repeat.append(repeats_done[m.name] + np.repeat(np.arange(n_rep), m.n_frames))
            repeats_done[m.name] += n_rep
            t += n * period
            block_id += 1
    grey.append((t, t + config.grey_s, block_id))
    t += config.grey_s
    start_times = np.concatenate(starts)
    stop_times = np.append(start_times[1:], np.inf)
    block = np.concatenate(block)
    # The last frame of a block ends one period after its onset, not at the next block's start.
    ends_block = np.append(block[1:] != block[:-1], True)
    stop_times[ends_block] = start_times[ends_block] + period
    # One stretch of unusable data (Allen: a probe's signal lost) inside the last movie block.
    last = block == block[-1]
    b0, b1 = start_times[last][0], stop_times[last][-1]
    # Short enough not to ruin presence ratios of short sessions (0.5% of the recording at most).
    length = min(config.invalid_s, (b1 - b0) / 4, 0.005 * t)
    invalid = (b0 + (b1 - b0) / 2, b0 + (b1 - b0) / 2 + length) if length > 0 else None
    return Schedule(start_times, stop_times, np.concatenate(movie), np.concatenate(frame), block,
                    np.concatenate(repeat), names, t, grey, invalid)


def simulate_session(out: str | os.PathLike, config: SimulationConfig | None = None,
                     progress: bool = False) -> SimulationReport:
    """Simulate a session and write it to `out` (NWB). Deterministic for `config.seed`."""
    t_start = time.perf_counter()
    config = (config or SimulationConfig()).validate()
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a directory; give a file name like {out / 'session.nwb'}")
    out.parent.mkdir(parents=True, exist_ok=True)

    movies = {m.name: make_movie(m.n_frames, config.frame_height, config.frame_width,
                                 movie_seed(config, m.name)) for m in config.movies}
    schedule = build_schedule(config, config.seed + 1)
    population = Population.sample(config.frame_width / config.frame_height, config.units_scale,
                                   config.seed + 2)
    trains = simulate_spike_trains(population, movies, schedule, config.seed + 3, progress=progress)
    if schedule.invalid_interval is not None:  # no data while the signal was lost
        a, b = schedule.invalid_interval
        trains = [t[(t < a) | (t >= b)] for t in trains]
    trains, sorting = add_sorting_artefacts(trains, schedule.duration_s, config.seed + 4)
    metrics = {**sorting, **quality_metrics(trains, schedule.duration_s)}

    from .nwb_writer import write_allen_nwb  # pynwb is heavy: import only when writing

    frames_files = []
    if config.external_frames:
        for name, frames in movies.items():
            path = out.parent / f"{name}.npy"
            np.save(path, frames)
            frames_files.append(path)
    write_allen_nwb(out, config, schedule, population, trains, metrics,
                    templates=None if config.external_frames else movies,
                    notes=json.dumps({"generator": "spikevaediff simulate", **asdict(config)}))
    return SimulationReport(out, population.n_units, schedule.duration_s,
                            {m.name: (m.n_frames, m.n_repeats) for m in config.movies},
                            frames_files, time.perf_counter() - t_start)
