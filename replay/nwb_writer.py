"""The pynwb side of `simulate`: lay a simulated session out exactly like an Allen ecephys file."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .population import Population
from .spiking import Schedule

FRAME_RATE = 30.0
PROBE_AREAS = {"probeA": "VISam", "probeB": "VISpm", "probeC": "VISp",
               "probeD": "VISl", "probeE": "VISal", "probeF": "VISrl"}
CHANNELS_PER_PROBE = 384
# Structures a probe crosses from the tip (local index 0) upwards; then cortex, then outside.
DEEP_STRUCTURES = (("LP", 70), ("DG", 40), ("CA1", 50), ("CA3", 30))
CORTEX_CHANNELS = 170
SESSION_ID_BASE = 790_000_000
PROBE_ID_BASE = 800_000_000
CHANNEL_ID_BASE = 850_000_000
UNIT_ID_BASE = 950_000_000


def channel_layout(probe_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(channel ids, locations, cortex mask) for one probe, local index 0 at the tip."""
    area = list(PROBE_AREAS.values())[probe_index]
    locations = []
    for name, n in DEEP_STRUCTURES:
        locations += [name] * n
    locations += [area] * CORTEX_CHANNELS
    locations += ["root"] * (CHANNELS_PER_PROBE - len(locations))  # above the brain surface
    ids = CHANNEL_ID_BASE + probe_index * 10_000 + np.arange(CHANNELS_PER_PROBE)
    locations = np.asarray(locations)
    return ids, locations, locations == area


def place_units(population: Population, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """File order of units (by probe, then depth), their peak channel ids and unit ids."""
    rng = np.random.default_rng(seed)
    order, peaks = [], []
    for p, area in enumerate(PROBE_AREAS.values()):
        ids, _, cortex = channel_layout(p)
        members = np.flatnonzero(population.area == area)
        peak = rng.choice(ids[cortex], size=len(members))
        by_depth = np.argsort(peak, kind="stable")
        order.append(members[by_depth])
        peaks.append(peak[by_depth])
    order, peaks = np.concatenate(order), np.concatenate(peaks)
    unit_ids = UNIT_ID_BASE + np.cumsum(rng.integers(1, 40, len(order)))  # ids with gaps
    return order, peaks, unit_ids


def write_allen_nwb(out: Path, config, schedule: Schedule, population: Population,
                    trains: list[np.ndarray], metrics: dict[str, np.ndarray],
                    templates: dict[str, np.ndarray] | None, notes: str) -> None:
    """Write the NWB file atomically (a temporary file renamed into place)."""
    from pynwb import NWBHDF5IO, NWBFile, H5DataIO
    from pynwb.file import Subject

    session_id = SESSION_ID_BASE + config.seed
    nwb = NWBFile(
        session_description="Synthetic Allen Visual Coding - Neuropixels session "
                            "(brain_observatory_1.1 layout) simulated by spikevaediff",
        identifier=f"spikevaediff-sim-{session_id}",
        session_id=str(session_id),
        session_start_time=datetime(2019, 1, 1, 9, 0, tzinfo=timezone.utc),
        file_create_date=datetime(2019, 1, 1, 9, 0, tzinfo=timezone.utc),
        institution="spikevaediff (synthetic data)",
        experiment_description="Mouse visual cortex (six areas, Neuropixels) watching natural movies; "
                               "spikes from a linear-nonlinear-Poisson unit model",
        stimulus_notes="brain_observatory_1.1",
        keywords=["synthetic", "Neuropixels", "visual cortex", "natural movies"],
        notes=notes,
        subject=Subject(subject_id=str(700_000_000 + config.seed), species="Mus musculus",
                        age="P110D", sex="M", genotype="wt/wt",
                        description="simulated mouse"),
    )
    _add_probes(nwb)
    _add_units(nwb, population, trains, metrics, config.seed + 5)
    _add_stimulus_tables(nwb, schedule)
    if schedule.invalid_interval is not None:
        nwb.add_invalid_times_column("tags", "what the interval concerns", index=True)
        a, b = schedule.invalid_interval
        nwb.add_invalid_time_interval(start_time=a, stop_time=b, tags=["all_probes"])
    if templates:
        from pynwb.image import ImageSeries

        for name, frames in templates.items():
            chunks = (min(len(frames), 64),) + frames.shape[1:]
            nwb.add_stimulus_template(ImageSeries(
                name=name, data=H5DataIO(frames, compression="gzip", chunks=chunks),
                unit="n.a.", format="raw", starting_time=0.0, rate=FRAME_RATE,
                description=f"{name}: frames [frame, height, width], uint8 grayscale"))

    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    try:
        with NWBHDF5IO(str(tmp), "w") as io:
            io.write(nwb)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _column(name: str, description: str, data):
    from hdmf.common import VectorData

    return VectorData(name=name, description=description, data=data)


def _add_probes(nwb) -> None:
    """Devices, electrode groups and the electrodes table (ids = channel ids), built column-wise."""
    from pynwb.ecephys import ElectrodesTable

    ids, cols = [], {k: [] for k in ("location", "group", "group_name", "probe_vertical_position",
                                     "probe_horizontal_position", "probe_id", "local_index")}
    model = None
    if hasattr(nwb, "create_device_model"):  # pynwb >= 3.1 describes the hardware once
        model = nwb.create_device_model(name="Neuropixels 1.0", manufacturer="imec",
                                        description="Neuropixels 1.0 probe, 384 channels")
    for p, (probe, area) in enumerate(PROBE_AREAS.items()):
        extra = {"model": model} if model is not None else {"manufacturer": "imec"}
        device = nwb.create_device(name=probe, description="Neuropixels 1.0 probe", **extra)
        group = nwb.create_electrode_group(name=probe, description=f"{probe} (targets {area})",
                                           location="See electrode locations", device=device)
        channel_ids, locations, _ = channel_layout(p)
        local = np.arange(CHANNELS_PER_PROBE)
        ids.append(channel_ids)
        cols["location"] += [str(x) for x in locations]
        cols["group"] += [group] * CHANNELS_PER_PROBE
        cols["group_name"] += [probe] * CHANNELS_PER_PROBE
        cols["probe_vertical_position"].append(20 * (local // 2) + 20)
        cols["probe_horizontal_position"].append(np.array([43, 11, 59, 27])[local % 4])
        cols["probe_id"].append(np.full(CHANNELS_PER_PROBE, PROBE_ID_BASE + p))
        cols["local_index"].append(local)
    n = len(cols["location"])
    descriptions = {
        "location": "brain structure (CCF acronym) of the channel",
        "group": "the probe's electrode group", "group_name": "name of the probe",
        "probe_vertical_position": "distance from the probe tip (um)",
        "probe_horizontal_position": "position across the shank (um)",
        "probe_id": "id of the probe", "local_index": "channel index on its probe"}
    columns = []
    for key, values in cols.items():
        data = values if key in ("location", "group", "group_name") else np.concatenate(values)
        columns.append(_column(key, descriptions[key], data))
    columns.append(_column("filtering", "hardware filtering",
                           ["AP band: 500 Hz high-pass; LFP band: 1000 Hz low-pass"] * n))
    columns.append(_column("valid_data", "whether the channel's data are usable", np.ones(n, bool)))
    nwb.electrodes = ElectrodesTable(id=np.concatenate(ids), columns=columns)


def _add_units(nwb, population: Population, trains, metrics, seed: int) -> None:
    """The units table (ids = unit ids), column-wise: ragged spike_times plus metrics."""
    from hdmf.common import VectorIndex
    from pynwb.misc import Units

    order, peaks, unit_ids = place_units(population, seed)
    probe = (peaks - CHANNEL_ID_BASE) // 10_000
    local_index = np.zeros(len(order), dtype=np.int64)
    for p in np.unique(probe):
        local_index[probe == p] = np.arange(np.count_nonzero(probe == p))
    ordered = [trains[u] for u in order]
    spike_times = _column("spike_times", "spike times (s)", np.concatenate(ordered))
    index = VectorIndex(name="spike_times_index", target=spike_times,
                        data=np.cumsum([len(t) for t in ordered]).astype(np.int64))
    columns = [spike_times, index,
               _column("peak_channel_id", "id of the channel with the largest waveform", peaks),
               _column("cluster_id", "spike-sorter cluster id", np.arange(len(order))),
               _column("local_index", "index of the unit on its probe", local_index),
               _column("quality", "curation label ('good' or 'noise')",
                       [str(q) for q in metrics["quality"][order]])]
    for key, desc in (("isi_violations", "contamination estimate from refractory violations"),
                      ("amplitude_cutoff", "estimated fraction of spikes below threshold"),
                      ("presence_ratio", "fraction of the session with spikes"),
                      ("snr", "waveform signal-to-noise ratio"),
                      ("firing_rate", "mean firing rate over the session (Hz)"),
                      ("amplitude", "waveform amplitude (uV)")):
        columns.append(_column(key, desc, np.asarray(metrics[key], dtype=np.float64)[order]))
    nwb.units = Units(name="units", id=unit_ids, columns=columns, resolution=1 / 30000.0,
                      description="sorted units (Kilosort2 in Allen's pipeline; simulated here)")


def _add_stimulus_tables(nwb, schedule: Schedule) -> None:
    from hdmf.common import VectorData
    from pynwb.epoch import TimeIntervals

    def table(name, start, stop, columns):
        cols = [VectorData(name="start_time", description="onset (s)", data=np.asarray(start)),
                VectorData(name="stop_time", description="offset (s)", data=np.asarray(stop))]
        cols += [VectorData(name=k, description=d, data=v) for k, (d, v) in columns.items()]
        nwb.add_time_intervals(TimeIntervals(name=name, description=f"{name.split('_presentations')[0]} "
                                             "stimulus presentations", columns=cols))

    grey = np.asarray(schedule.grey_intervals)
    table("spontaneous_presentations", grey[:, 0], grey[:, 1], {
        "stimulus_name": ("stimulus name", np.full(len(grey), "spontaneous").astype(object)),
        "stimulus_block": ("stimulus block", grey[:, 2].astype(np.float64))})
    for mi, name in enumerate(schedule.movie_names):
        rows = schedule.movie == mi
        n = int(rows.sum())
        table(f"{name}_presentations", schedule.start_times[rows], schedule.stop_times[rows], {
            "stimulus_name": ("stimulus name", np.full(n, name).astype(object)),
            "stimulus_block": ("stimulus block", schedule.block[rows].astype(np.float64)),
            "frame": ("movie frame shown", schedule.frame[rows].astype(np.float64)),
            "contrast": ("stimulus contrast", np.ones(n)),
        })
