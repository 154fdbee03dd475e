"""Spike counts of one or several sessions as one pseudo-population aligned by movie frame.

The seed pooled the cells of every session (over 20,000 units). Sessions are recorded in different
mice on different days, so "the same trial" means the same (movie frame, repeat index): for each
session we bin every presentation, then keep the (frame, repeat) pairs valid in all sessions and
concatenate the units side by side. A unit's identity is (session id, unit id).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spikevaediff.core.errors import UserError


@dataclass
class Population:
    counts: np.ndarray          # [P, U] float32, single presentations
    frames: np.ndarray          # [P] movie frame index
    repeats: np.ndarray         # [P] repeat index
    valid: np.ndarray           # [P] bool (outside invalid_times in every session)
    unit_keys: list             # [U] (session id, unit id)
    unit_areas: np.ndarray      # [U] area names
    n_frames: int               # frames in the movie
    window: tuple               # (start, stop) s after frame onset
    n_subbins: int
    sessions: list              # [{"id": ..., "path": ...}]

    @property
    def n_units(self) -> int:
        return self.counts.shape[1]


def session_id(session) -> str:
    """A stable id for a session: its own id if the reader has one, else the file stem."""
    return str(getattr(session, "session_id", None) or Path(session.path).stem)


def load_population(paths, movie: str, areas=None, window=None, n_subbins: int = 1,
                    unit_ids: dict | None = None) -> Population:
    """Bin `movie` in every session and align them by (frame, repeat).

    `unit_ids` optionally maps session id -> the unit ids to keep, in order (a bundle's layout).
    """
    from spikevaediff.replay.binning import bin_session, default_window
    from spikevaediff.replay.nwb import open_session

    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no session given")
    if window is None:
        window = default_window(areas)
    binned, sessions = [], []
    for path in paths:
        with open_session(path) as session:
            sid = session_id(session)
            if any(s["id"] == sid for s in sessions):
                raise UserError(f"session {sid} given twice")
            b = bin_session(session, movie, areas=areas, window=window, n_subbins=n_subbins)
            if unit_ids is not None:
                b = _select_units(b, unit_ids.get(sid), sid)
            binned.append(b)
            sessions.append({"id": sid, "path": str(path.resolve())})
    n_frames = int(max(b.frames.max() for b in binned)) + 1
    if len(binned) == 1:
        b = binned[0]
        counts = b.counts.reshape(len(b.counts), -1).astype(np.float32)
        keys = [(sessions[0]["id"], int(u)) for u in b.unit_ids]
        return Population(counts, b.frames, b.repeats, b.valid, keys, np.asarray(b.unit_areas),
                          n_frames, tuple(window), n_subbins, sessions)
    # Pool: keep the (frame, repeat) pairs every session has, in (repeat, frame) order.
    pairs = [set(zip(b.frames.tolist(), b.repeats.tolist())) for b in binned]
    common = sorted(set.intersection(*pairs), key=lambda fr: (fr[1], fr[0]))
    if not common:
        raise UserError(f"the sessions share no (frame, repeat) presentation of {movie}")
    frames = np.array([f for f, _ in common], dtype=np.int64)
    repeats = np.array([r for _, r in common], dtype=np.int64)
    columns, valid, keys, areas_out = [], np.ones(len(common), bool), [], []
    for b, s in zip(binned, sessions):
        index = {fr: i for i, fr in enumerate(zip(b.frames.tolist(), b.repeats.tolist()))}
        rows = np.array([index[fr] for fr in common])
        columns.append(b.counts[rows].reshape(len(rows), -1))
        valid &= b.valid[rows]
        keys += [(s["id"], int(u)) for u in b.unit_ids]
        areas_out += list(b.unit_areas)
    return Population(np.concatenate(columns, axis=1).astype(np.float32), frames, repeats, valid, keys,
                      np.asarray(areas_out), n_frames, tuple(window), n_subbins, sessions)


def _select_units(b, wanted, sid):
    """Restrict binned counts to `wanted` unit ids in that order (UserError if one is absent)."""
    if wanted is None:
        raise UserError(f"session {sid} is not part of the bundle")
    position = {int(u): i for i, u in enumerate(b.unit_ids)}
    missing = [u for u in wanted if int(u) not in position]
    if missing:
        raise UserError(f"session {sid} lacks {len(missing)} of the bundle's units (first: {missing[0]}); "
                        "was the bundle trained on this session with the same areas and filters?")
    cols = np.array([position[int(u)] for u in wanted], dtype=np.int64)
    b.counts = b.counts[:, cols]
    b.unit_ids = np.asarray(b.unit_ids)[cols]
    b.unit_areas = np.asarray(b.unit_areas)[cols]
    return b


def movie_frames(paths, movie: str) -> np.ndarray:
    """The movie's frames [F,H,W] uint8 from the first session that has them."""
    from spikevaediff.replay.nwb import open_session

    for path in paths:
        with open_session(path) as session:
            if session.has_frames(movie):
                return session.frames(movie)
    raise UserError(f"no session has the frames of {movie}: put {movie}.npy beside the NWB file "
                    "(Allen ships movie templates separately)")


def subsample_units(pop: Population, n_per_area: int, seed: int = 0) -> Population:
    """Keep `n_per_area` randomly chosen units of every area (all of an area that has fewer)."""
    rng = np.random.default_rng(seed)
    keep = []
    for area in np.unique(pop.unit_areas):
        idx = np.flatnonzero(pop.unit_areas == area)
        keep.append(np.sort(rng.choice(idx, size=min(n_per_area, len(idx)), replace=False)))
    cols = np.sort(np.concatenate(keep))
    from dataclasses import replace
    return replace(pop, counts=pop.counts[:, cols], unit_keys=[pop.unit_keys[i] for i in cols],
                   unit_areas=pop.unit_areas[cols])
