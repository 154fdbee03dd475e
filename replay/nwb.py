"""Read Allen Visual Coding - Neuropixels sessions (real ones or ours) with plain pynwb.

The Allen layout, and how it is read here:
  - `units` has no area column: a unit's area is `electrodes.location` at the row whose id is
    the unit's `peak_channel_id` (files without it fall back to the units' electrodes region);
  - movie presentations are `intervals["<movie>_presentations"]`, one row per frame, with a float
    `frame` and a `stimulus_block`, and no repeat column: a repeat starts wherever the frame index
    wraps around inside a block;
  - `invalid_times` marks presentations as not valid;
  - movie frames are usually NOT in the file: Allen ships them as `natural_movie_N.npy`; they are
    looked for as a stimulus template first, then as a `.npy` next to the file.
Spike times are read lazily, one unit at a time.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spikevaediff.core.errors import UserError

from .session_tables import (DEFAULT_UNIT_FILTERS, Presentations, UnitFilters, UnitTable,  # noqa: F401
                             _text, derive_repeats)

HIERARCHY = ("VISp", "VISl", "VISrl", "VISal", "VISpm", "VISam")
AREA_ALIASES = {"VISI": "VISl"}  # the seed paper's spelling of the lateral area
METRIC_COLUMNS = ("isi_violations", "amplitude_cutoff", "presence_ratio", "snr", "firing_rate")
MOVIE_NUMBERS = {"one": 1, "two": 2, "three": 3}


class Session:
    """An open Allen-layout NWB session. Use `open_session(path)`; close it (or use `with`)."""

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"no such file: {self.path}")
        if self.path.is_dir():
            raise UserError(f"{self.path} is a directory, not an NWB file")
        if not h5py.is_hdf5(self.path):
            raise UserError(f"{self.path} is not an NWB file (not HDF5)")
        from pynwb import NWBHDF5IO

        try:
            self._io = NWBHDF5IO(str(self.path), "r")
            self.nwb = self._io.read()
        except Exception as exc:  # any failure to parse means: not a readable NWB file
            raise UserError(f"{self.path} is not a readable NWB file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if self.nwb.units is None or len(self.nwb.units.id) == 0:
            self.close()
            raise UserError(f"{self.path} has no units (no sorted spikes to decode)")
        self._all_units: UnitTable | None = None
        self._spike_index: np.ndarray | None = None
        self._row_of_id: dict[int, int] | None = None

    # ---- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_io", None) is not None:
            self._io.close()
            self._io = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- units --------------------------------------------------------------------------

    def _unit_areas(self, units) -> tuple[np.ndarray, np.ndarray]:
        """Area per unit and peak channel ids, joined through the electrodes table."""
        n = len(units.id)
        cols = set(units.colnames)
        electrodes = self.nwb.electrodes
        if "peak_channel_id" in cols and electrodes is not None and "location" in electrodes.colnames:
            peaks = np.asarray(units["peak_channel_id"].data[:], dtype=np.int64)
            channel_ids = np.asarray(electrodes.id.data[:], dtype=np.int64)
            locations = _text(electrodes["location"].data[:])
            order = np.argsort(channel_ids)
            pos = np.clip(np.searchsorted(channel_ids, peaks, sorter=order), 0, len(order) - 1)
            hit = channel_ids[order[pos]] == peaks
            return np.where(hit, locations[order[pos]], "unknown"), peaks
        for name in ("location", "ecephys_structure_acronym", "area"):
            if name in cols:
                return _text(units[name].data[:]), np.full(n, -1, dtype=np.int64)
        if "electrodes" in cols and electrodes is not None:
            first = [int(np.atleast_1d(units["electrodes"][i].index)[0]) if len(units["electrodes"][i]) else -1
                     for i in range(n)]
            locations = _text(electrodes["location"].data[:])
            return np.array([locations[i] if i >= 0 else "unknown" for i in first]), np.full(n, -1)
        return np.full(n, "unknown"), np.full(n, -1, dtype=np.int64)

    def _unit_table(self) -> UnitTable:
        if self._all_units is None:
            units = self.nwb.units
            n = len(units.id)
            cols = set(units.colnames)
            areas, peaks = self._unit_areas(units)
            metric = {c: (np.asarray(units[c].data[:], dtype=np.float64) if c in cols else np.full(n, np.nan))
                      for c in METRIC_COLUMNS}
            quality = _text(units["quality"].data[:]) if "quality" in cols else np.full(n, "")
            self._all_units = UnitTable(
                ids=np.asarray(units.id.data[:], dtype=np.int64), areas=areas.astype(str),
                peak_channel_ids=peaks.astype(np.int64), quality=quality, rows=np.arange(n), **metric)
        return self._all_units

    @property
    def session_id(self) -> str:
        """The file's session id (Allen's ecephys session id), else the file name's stem."""
        return str(self.nwb.session_id or self.path.stem)

    def areas(self) -> list[str]:
        """Areas that hold units, in visual-hierarchy order (other structures after, by name)."""
        present = set(self._unit_table().areas.tolist())
        return [a for a in HIERARCHY if a in present] + sorted(present - set(HIERARCHY))

    def resolve_areas(self, areas) -> list[str]:
        """Check and normalise area names (case-insensitive; 'VISI' means VISl)."""
        known = self.areas()
        lookup = {a.lower(): a for a in known}
        out = []
        for name in ([areas] if isinstance(areas, str) else areas):
            name = AREA_ALIASES.get(str(name).strip(), str(name).strip())
            if name.lower() not in lookup:
                raise UserError(f"unknown area '{name}' (areas in {self.path.name}: {', '.join(known)})")
            out.append(lookup[name.lower()])
        if not out:
            raise UserError("no areas given")
        return list(dict.fromkeys(out))

    def units(self, areas=None, filters: UnitFilters | dict | None = DEFAULT_UNIT_FILTERS) -> UnitTable:
        """Units in `areas` (all if None) that pass `filters` (None: no filtering)."""
        table = self._unit_table()
        chosen = self.resolve_areas(areas) if areas is not None else self.areas()
        in_area = np.isin(table.areas, chosen)
        selected = table.select(in_area)
        if filters is not None:
            if isinstance(filters, dict):
                filters = UnitFilters(**filters)
            selected = selected.select(filters.mask(selected))
        if len(selected) == 0:
            raise UserError(f"no units left in {', '.join(chosen)} after the unit filters "
                            f"({int(in_area.sum())} before filtering); relax them with --no-filters")
        return selected

    # ---- spikes -------------------------------------------------------------------------

    def _row(self, unit_id: int) -> int:
        if self._row_of_id is None:
            self._row_of_id = {int(u): i for i, u in enumerate(self._unit_table().ids)}
        try:
            return self._row_of_id[int(unit_id)]
        except KeyError:
            raise UserError(f"unit {unit_id} is not in {self.path.name}") from None

    def spike_times(self, unit_id: int) -> np.ndarray:
        """Sorted spike times (s, float64) of one unit, read from disk on demand."""
        row = self._row(unit_id)
        if self._spike_index is None:
            if "spike_times" not in self.nwb.units.colnames:
                raise UserError(f"{self.path.name}: the units table has no spike_times")
            ragged = self.nwb.units["spike_times"]  # the VectorIndex of the ragged column
            self._spike_index = np.asarray(ragged.data[:], dtype=np.int64)
            self._spike_values = ragged.target.data  # stays on disk; sliced per unit
        start = int(self._spike_index[row - 1]) if row > 0 else 0
        stop = int(self._spike_index[row])
        times = np.asarray(self._spike_values[start:stop], dtype=np.float64)
        if len(times) > 1 and np.any(np.diff(times) < 0):
            times = np.sort(times)
        return times

    def spike_trains(self, unit_ids) -> list[np.ndarray]:
        """Spike times of several units (one read per unit; see `spike_times`)."""
        return [self.spike_times(u) for u in unit_ids]

    # ---- stimuli ------------------------------------------------------------------------

    def movies(self) -> list[str]:
        """Movies with a presentations table (e.g. natural_movie_one, natural_movie_three)."""
        names = []
        for key, table in self.nwb.intervals.items():
            if key.endswith("_presentations") and "movie" in key and "frame" in table.colnames:
                names.append(key[: -len("_presentations")])
        return sorted(names)

    def invalid_times(self) -> np.ndarray:
        """[N, 2] start/stop of intervals whose data must not be used."""
        table = self.nwb.invalid_times
        if table is None or len(table) == 0:
            return np.zeros((0, 2))
        return np.stack([np.asarray(table["start_time"].data[:], dtype=np.float64),
                         np.asarray(table["stop_time"].data[:], dtype=np.float64)], axis=1)

    def _table(self, movie: str):
        key = f"{movie}_presentations"
        if key not in self.nwb.intervals:
            have = ", ".join(self.movies()) or "none"
            raise UserError(f"{self.path.name} has no presentations of '{movie}' (movies: {have})")
        return self.nwb.intervals[key]

    def presentations(self, movie: str) -> Presentations:
        """Frame-by-frame presentations of `movie`, with repeats derived and validity marked."""
        table = self._table(movie)
        start = np.asarray(table["start_time"].data[:], dtype=np.float64)
        stop = np.asarray(table["stop_time"].data[:], dtype=np.float64)
        frame = np.asarray(table["frame"].data[:], dtype=np.float64)
        if "stimulus_block" in table.colnames:
            block = np.asarray(table["stimulus_block"].data[:], dtype=np.float64)
        else:  # no block column: a pause longer than a second starts a new block
            gaps = np.r_[False, start[1:] - stop[:-1] > 1.0]
            block = np.cumsum(gaps).astype(np.float64)
        keep = np.isfinite(frame) & (frame >= 0) & np.isfinite(start)
        order = np.argsort(start[keep], kind="stable")
        start, stop = start[keep][order], stop[keep][order]
        frame = frame[keep][order].astype(np.int64)
        block = np.nan_to_num(block[keep][order], nan=-1).astype(np.int64)
        if len(start) == 0:
            raise UserError(f"{self.path.name}: the '{movie}' table has no presentations")
        repeats = derive_repeats(frame, block)
        valid = np.ones(len(start), dtype=bool)
        for a, b in self.invalid_times():
            valid &= ~((start < b) & (stop > a))
        return Presentations(movie, start, stop, frame, repeats, block, valid,
                             n_frames=int(frame.max()) + 1, n_repeats=int(repeats.max()) + 1)

    def _external_frames_path(self, movie: str) -> Path | None:
        """`<movie>.npy` or Allen's `natural_movie_N.npy` beside the file, or allensdk's cache
        layout (`<cache>/natural_movie_templates/natural_movie_N.h5`, a .npy despite its name)."""
        names = [f"{movie}.npy"]
        words = movie.rsplit("_", 1)
        if len(words) == 2 and words[1] in MOVIE_NUMBERS:
            allen = f"{words[0]}_{MOVIE_NUMBERS[words[1]]}"
            names += [f"{allen}.npy", f"{allen}.h5"]
        folders = (self.path.parent, self.path.parent / "natural_movie_templates",
                   self.path.parent.parent / "natural_movie_templates")
        for folder in folders:
            for name in names:
                if (folder / name).is_file():
                    return folder / name
        return None

    def has_frames(self, movie: str) -> bool:
        """Whether `frames(movie)` can work: a template in the file or a `.npy` beside it."""
        return movie in self.nwb.stimulus_template or self._external_frames_path(movie) is not None

    def frames(self, movie: str) -> np.ndarray:
        """The movie as uint8 [F, H, W]: from the file's stimulus template or an external `.npy`."""
        if movie in self.nwb.stimulus_template:
            data = np.asarray(self.nwb.stimulus_template[movie].data[:])
            source = f"stimulus_template/{movie}"
        else:
            path = self._external_frames_path(movie)
            if path is None:
                raise UserError(f"no frames for '{movie}': {self.path.name} has no stimulus template and "
                                f"there is no {movie}.npy next to it (see `spikevaediff fetch`)")
            data = _load_external(path)
            source = str(path)
        return _as_gray_uint8(data, source)

    def summary(self, filters: UnitFilters | None = DEFAULT_UNIT_FILTERS) -> dict:
        """Units per area (all / passing filters) and movies (frames x repeats, frames available)."""
        table = self._unit_table()
        passing = filters.mask(table) if filters is not None else np.ones(len(table), dtype=bool)
        areas = {a: {"units": int(np.sum(table.areas == a)),
                     "passing_filters": int(np.sum(passing & (table.areas == a)))} for a in self.areas()}
        movies = {}
        for m in self.movies():
            p = self.presentations(m)
            movies[m] = {"frames": p.n_frames, "repeats": p.n_repeats, "presentations": len(p),
                         "invalid_presentations": int(np.sum(~p.valid)),
                         "frames_available": self.has_frames(m)}
        return {"path": str(self.path), "session_id": self.nwb.session_id,
                "units": len(table), "units_passing_filters": int(passing.sum()),
                "areas": areas, "movies": movies,
                "invalid_intervals": int(len(self.invalid_times()))}


def _load_external(path: Path) -> np.ndarray:
    """A movie template file: .npy (whatever its extension) or an HDF5 file with one dataset."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError):
        pass
    import h5py

    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            for key in ("data", *f.keys()):
                if key in f and isinstance(f[key], h5py.Dataset):
                    return f[key][()]
    raise UserError(f"cannot read movie frames from {path} (neither .npy nor HDF5 with a dataset)")


def _as_gray_uint8(data: np.ndarray, source: str) -> np.ndarray:
    if data.ndim == 4 and data.shape[-1] in (3, 4):
        data = data[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if data.ndim != 3:
        raise UserError(f"movie frames in {source} have shape {data.shape}; expected [frames, height, width]")
    if data.dtype != np.uint8:
        data = data.astype(np.float32)
        if data.max(initial=0) <= 1.0:
            data = data * 255.0
        data = np.clip(np.round(data), 0, 255).astype(np.uint8)
    return data


def open_session(path: str | os.PathLike) -> Session:
    """Open an Allen-layout NWB session (UserError if missing, not NWB, or without units)."""
    return Session(path)
