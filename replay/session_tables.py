"""The tables a session reader hands out: unit filters, selected units, movie presentations."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitFilters:
    """allensdk's default unit filters (inclusive bounds); set a field to None to drop it."""

    quality: str | None = "good"
    max_isi_violations: float | None = 0.5
    max_amplitude_cutoff: float | None = 0.1
    min_presence_ratio: float | None = 0.95

    def mask(self, table: "UnitTable") -> np.ndarray:
        keep = np.ones(len(table), dtype=bool)
        if self.quality is not None:
            keep &= table.quality == self.quality
        for value, column, upper in ((self.max_isi_violations, "isi_violations", True),
                                     (self.max_amplitude_cutoff, "amplitude_cutoff", True),
                                     (self.min_presence_ratio, "presence_ratio", False)):
            if value is None:
                continue
            x = getattr(table, column)
            if np.all(np.isnan(x)):  # a file without this metric: the filter cannot apply
                log.warning("units have no %s column; that filter is skipped", column)
                continue
            keep &= (x <= value) if upper else (x >= value)
        return keep


DEFAULT_UNIT_FILTERS = UnitFilters()


@dataclass
class UnitTable:
    """Selected units: one entry per unit, in file order."""

    ids: np.ndarray               # int64 unit ids
    areas: np.ndarray             # str
    peak_channel_ids: np.ndarray  # int64 (-1 when unknown)
    quality: np.ndarray           # str ("" when unknown)
    isi_violations: np.ndarray    # float64 (NaN when unknown), and so on
    amplitude_cutoff: np.ndarray
    presence_ratio: np.ndarray
    snr: np.ndarray
    firing_rate: np.ndarray
    rows: np.ndarray              # int64 row of each unit in the file's units table

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, mask: np.ndarray) -> "UnitTable":
        return UnitTable(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})


@dataclass
class Presentations:
    """One movie's presentations in time order: one row per frame shown."""

    movie: str
    start_times: np.ndarray  # float64 [P]
    stop_times: np.ndarray   # float64 [P]
    frames: np.ndarray       # int64 [P]
    repeats: np.ndarray      # int64 [P], counted over the whole session
    blocks: np.ndarray       # int64 [P], stimulus_block
    valid: np.ndarray        # bool [P], False where the presentation overlaps invalid_times
    n_frames: int
    n_repeats: int

    def __len__(self) -> int:
        return len(self.start_times)


def _text(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object).astype(str)


def derive_repeats(frames: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Repeat index per presentation: +1 wherever the frame does not advance, or a block starts."""
    new = np.ones(len(frames), dtype=bool)
    new[1:] = (frames[1:] <= frames[:-1]) | (blocks[1:] != blocks[:-1])
    return np.cumsum(new) - 1
