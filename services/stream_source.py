"""What the replay streams: a bundle's units, read from one or several sessions, bin by bin.

`StreamSource` opens the sessions, picks the bundle's units in the bundle's order (a pooled
pseudo-population spans several sessions), and aligns the sessions' presentations of the bundle's
movie by (frame, repeat), as training did. The first session's presentations set the order and
the clock.

`schedule(start_frame, duration, loop)` yields `ScheduledBin`s: which presentation to count and
when, in stream time, its counting window closes. Stream time follows the recording's own frame
onsets, except that a pause between presentations longer than `MAX_STEP_S` (a gap between
stimulus blocks, often minutes of other stimuli in Allen sessions) is shortened to one frame
period: the replay streams the movie, not the intermissions. `counts(bin)` bins the spikes of
that presentation on the fly (`SpikeBinner`, one search per session).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from spikevaediff.core.errors import UserError

log = logging.getLogger("spikevaediff.replay")

MAX_STEP_S = 1.0            # a longer pause between presentations counts as one frame period
DEFAULT_PERIOD_S = 1.0 / 30.0


@dataclass(frozen=True)
class ScheduledBin:
    """One presentation to stream. `due_s`: stream time (s, before speed scaling) when its
    counting window closes, counted from the start of the stream."""

    index: int      # position in the stream (0, 1, ...): the message's bin index and seq
    row: int        # row in the aligned presentation table
    frame: int
    repeat: int
    loop: int       # how many times the presentations wrapped around (loop mode)
    onset: float    # onset in the first session's clock (s)
    due_s: float
    valid: bool


def _stream_id(ids: list[str]) -> str:
    raw = ids[0] if len(ids) == 1 else f"pooled-{len(ids)}"
    clean = "".join(c if c.isalnum() or c in "_.:-" else "_" for c in raw)[:64]
    return clean or "replay"


class StreamSource:
    """The bundle's units from `paths`, binned per presentation of the bundle's movie."""

    def __init__(self, paths, manifest):
        from spikevaediff.replay.binning import SpikeBinner, check_window
        from spikevaediff.replay.nwb import open_session
        from spikevaediff.training.population import session_id

        self.movie = manifest.movie
        self.n_subbins = int(manifest.n_subbins)
        self.window = check_window(manifest.window, self.n_subbins)
        paths = [Path(p) for p in (paths or [s["path"] for s in manifest.sessions if "path" in s])]
        if not paths:
            raise UserError("no session to replay: give sessions in the config (the bundle lists none)")
        wanted: dict[str, list[int]] = {}
        for sid, uid in manifest.units:
            wanted.setdefault(str(sid), []).append(int(uid))
        self.session_ids, self.binners, tables, unit_keys = [], [], [], []
        for path in paths:
            with open_session(path) as session:
                sid = session_id(session)
                if sid not in wanted:
                    raise UserError(f"session {sid} ({path.name}) is not part of the bundle "
                                    f"(its sessions: {', '.join(wanted)})")
                if sid in self.session_ids:
                    raise UserError(f"session {sid} given twice")
                trains = session.spike_trains(wanted[sid])
                tables.append(session.presentations(self.movie))
            self.session_ids.append(sid)
            self.binners.append(SpikeBinner(trains))
            unit_keys += [(sid, u) for u in wanted[sid]]
        absent = [sid for sid in wanted if sid not in self.session_ids]
        if absent:
            raise UserError(f"the bundle pools {len(wanted)} sessions; session {absent[0]} was not given")
        # Columns come session by session; put them in the bundle's unit order.
        position = {key: i for i, key in enumerate(unit_keys)}
        self.unit_order = np.asarray([position[(str(s), int(u))] for s, u in manifest.units], dtype=np.int64)
        self.n_units = len(self.unit_order)
        self.n_values = self.n_units * self.n_subbins
        self.stream = _stream_id(self.session_ids)
        self._align(tables)

    def _align(self, tables) -> None:
        """Rows every session has, keyed by (frame, repeat), in the first session's time order."""
        first = tables[0]
        keys = list(zip(first.frames.tolist(), first.repeats.tolist()))
        onsets = [first.start_times]
        valid = first.valid.copy()
        keep = np.ones(len(keys), dtype=bool)
        for table in tables[1:]:
            index = {fr: i for i, fr in enumerate(zip(table.frames.tolist(), table.repeats.tolist()))}
            rows = np.array([index.get(k, -1) for k in keys])
            keep &= rows >= 0
            onsets.append(np.where(rows >= 0, table.start_times[np.maximum(rows, 0)], np.nan))
            valid &= np.where(rows >= 0, table.valid[np.maximum(rows, 0)], False)
        if not keep.any():
            raise UserError(f"the sessions share no (frame, repeat) presentation of {self.movie}")
        self.frames = first.frames[keep]
        self.repeats = first.repeats[keep]
        self.onsets = np.stack([o[keep] for o in onsets], axis=1)  # [rows, sessions]
        self.valid = valid[keep]
        self.n_frames = int(first.n_frames)
        steps = np.diff(self.onsets[:, 0])
        regular = steps[(steps > 0) & (steps <= MAX_STEP_S)]
        self.period = float(np.median(regular)) if len(regular) else DEFAULT_PERIOD_S
        self.steps = np.where((steps > 0) & (steps <= MAX_STEP_S), steps, self.period)

    def __len__(self) -> int:
        return len(self.frames)

    def schedule(self, start_frame: int = 0, duration: float = 0.0, loop: bool = False) -> Iterator[ScheduledBin]:
        """Bins from the first presentation of `start_frame` for `duration` s of stream time
        (0: one movie's worth of frames); `loop` wraps around at the last presentation."""
        starts = np.flatnonzero(self.frames == start_frame)
        if not len(starts):
            raise UserError(f"start frame {start_frame} is not presented in {self.movie} "
                            f"(frames 0..{self.n_frames - 1})")
        row, wraps, elapsed, index = int(starts[0]), 0, 0.0, 0
        limit_bins = self.n_frames if duration <= 0 else None
        stop = self.window[1]
        while (elapsed < duration) if limit_bins is None else (index < limit_bins):
            yield ScheduledBin(index, row, int(self.frames[row]), int(self.repeats[row]), wraps,
                               float(self.onsets[row, 0]), elapsed + stop, bool(self.valid[row]))
            index += 1
            if row + 1 < len(self.frames):
                elapsed += float(self.steps[row])
                row += 1
            elif loop:
                elapsed += self.period
                row, wraps = 0, wraps + 1
            else:
                log.info("reached the last presentation of %s after %d bins", self.movie, index)
                return

    def counts(self, item: ScheduledBin) -> np.ndarray:
        """float32 [units * sub-bins] of one presentation, in the bundle's unit order."""
        parts = [binner.bin(self.onsets[item.row, s:s + 1], self.window, self.n_subbins)[0]
                 for s, binner in enumerate(self.binners)]
        counts = np.concatenate(parts, axis=0)[self.unit_order]
        return np.ascontiguousarray(counts.reshape(-1), dtype=np.float32)

    def window_times(self, item: ScheduledBin) -> tuple[float, float]:
        """The counting window (t0, t1) in the first session's clock."""
        return item.onset + self.window[0], item.onset + self.window[1]
