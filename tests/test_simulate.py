"""The synthetic session: Allen layout, determinism, stimulus-locked but noisy responses."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from spikevaediff.core.errors import UserError
from spikevaediff.replay.movie import make_movie, shot_boundaries
from spikevaediff.replay.population import AREA_PROFILES, AREAS, Population
from spikevaediff.replay.simulate import MovieSpec, SimulationConfig, simulate_session

TINY = SimulationConfig(movies=(MovieSpec("natural_movie_one", 60, 2),), units_scale=0.05,
                        grey_s=1.0, frame_height=32, frame_width=64)


def _text(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


# ---- movie ------------------------------------------------------------------------------------

def test_movie_is_deterministic_sized_and_natural():
    a = make_movie(200, 40, 80, seed=3)
    assert a.shape == (200, 40, 80) and a.dtype == np.uint8
    assert np.array_equal(a, make_movie(200, 40, 80, seed=3))
    assert not np.array_equal(a, make_movie(200, 40, 80, seed=4))
    assert a.std() > 30  # photographs, not a flat field
    diffs = np.abs(np.diff(a.astype(float), axis=0)).mean(axis=(1, 2))
    cuts = shot_boundaries(200, 40, 80, seed=3)[1:]
    assert len(cuts) >= 1
    # Scene cuts are big changes; within a shot the camera moves slowly.
    assert diffs[cuts - 1].min() > 3 * np.median(diffs)
    within = np.delete(diffs, cuts - 1)
    assert np.median(within) < 6 and within.max() > 0  # slow pans/zooms, not a still


# ---- population -------------------------------------------------------------------------------

def test_population_has_realistic_counts_and_latencies_per_area():
    pop = Population.sample(units_scale=1.0, seed=0)
    for area in AREAS:
        assert np.sum(pop.area == area) == AREA_PROFILES[area].n_units
        lat = np.median(pop.latency_s[pop.area == area])
        assert abs(lat - AREA_PROFILES[area].latency_s) < 0.004
    # RFs tile the screen (every quadrant of the 1 x 2 screen is covered by every area).
    for area in AREAS:
        m = pop.area == area
        quadrant = (pop.centre_y[m] > 0.5).astype(int) * 2 + (pop.centre_x[m] > 1.0)
        assert set(quadrant) == {0, 1, 2, 3}
    assert set(np.unique(pop.kind)) == {0, 1, 2}


# ---- the NWB file's layout ----------------------------------------------------------------------

def test_layout_matches_allen(small_session):
    with h5py.File(small_session, "r") as f:
        groups = sorted(f["general/extracellular_ephys"].keys())
        assert [g for g in groups if g.startswith("probe")] == [f"probe{c}" for c in "ABCDEF"]
        el = f["general/extracellular_ephys/electrodes"]
        channel_ids = el["id"][:]
        assert len(np.unique(channel_ids)) == len(channel_ids) == 6 * 384
        locations = set(_text(el["location"][:]))
        assert set(AREAS) <= locations and "CA1" in locations
        for col in ("probe_vertical_position", "probe_horizontal_position", "probe_id", "local_index"):
            assert col in el

        units = f["units"]
        for col in ("spike_times", "peak_channel_id", "quality", "isi_violations", "amplitude_cutoff",
                    "presence_ratio", "snr", "firing_rate"):
            assert col in units, col
        assert "location" not in units and "area" not in units  # area only via peak_channel_id
        peaks = units["peak_channel_id"][:]
        assert np.isin(peaks, channel_ids).all()
        unit_areas = {str(l) for l in np.asarray(_text(el["location"][:]))[np.searchsorted(channel_ids, peaks)]}
        assert unit_areas == set(AREAS)
        assert len(np.unique(units["id"][:])) == len(peaks)

        for movie, n_frames, n_repeats in (("natural_movie_one", 300, 4), ("natural_movie_three", 150, 2)):
            t = f[f"intervals/{movie}_presentations"]
            frame = t["frame"][:]
            assert frame.dtype.kind == "f"
            assert len(frame) == n_frames * n_repeats  # one row per frame shown
            assert set(_text(t["stimulus_name"][:])) == {movie}
            start, stop = t["start_time"][:], t["stop_time"][:]
            assert np.allclose(np.diff(start)[np.diff(t["stimulus_block"][:]) == 0], 1 / 30, atol=1e-3)
            assert np.all(stop > start)
            blocks = np.unique(t["stimulus_block"][:])
            assert len(blocks) == 2
            # A grey gap separates the blocks.
            first = t["stimulus_block"][:] == blocks[0]
            assert start[~first][0] - stop[first][-1] > 1.0
            tmpl = f[f"stimulus/templates/{movie}/data"]
            assert tmpl.shape == (n_frames, 64, 128) and tmpl.dtype == np.uint8
        assert len(f["intervals/invalid_times/start_time"]) == 1
        assert "spontaneous_presentations" in f["intervals"]


def test_some_units_fail_each_default_filter(small_session):
    with h5py.File(small_session, "r") as f:
        u = f["units"]
        quality = np.array(_text(u["quality"][:]))
        fails = {"quality": quality != "good", "isi": u["isi_violations"][:] > 0.5,
                 "amplitude": u["amplitude_cutoff"][:] > 0.1, "presence": u["presence_ratio"][:] < 0.95}
        for name, mask in fails.items():
            assert mask.any(), f"no unit fails the {name} filter"
        passing = ~np.logical_or.reduce(list(fails.values()))
        assert 0.5 < passing.mean() < 0.95
        rates = u["firing_rate"][:]
        assert 2.0 < np.median(rates) < 15.0


def test_external_frames_are_written_beside_the_file(tmp_path):
    from dataclasses import replace

    report = simulate_session(tmp_path / "s.nwb", replace(TINY, external_frames=True))
    npy = tmp_path / "natural_movie_one.npy"
    assert report.frames_files == [npy]
    frames = np.load(npy)
    assert frames.shape == (60, 32, 64) and frames.dtype == np.uint8
    with h5py.File(tmp_path / "s.nwb", "r") as f:
        assert "natural_movie_one" not in f.get("stimulus/templates", {})


def _spikes(path):
    with h5py.File(path, "r") as f:
        return f["units/spike_times"][:], f["units/id"][:], f["intervals/natural_movie_one_presentations/start_time"][:]


def test_deterministic_for_a_seed(tmp_path):
    from dataclasses import replace

    simulate_session(tmp_path / "a.nwb", TINY)
    simulate_session(tmp_path / "b.nwb", TINY)
    simulate_session(tmp_path / "c.nwb", replace(TINY, seed=1))
    a, b, c = _spikes(tmp_path / "a.nwb"), _spikes(tmp_path / "b.nwb"), _spikes(tmp_path / "c.nwb")
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert len(a[0]) != len(c[0]) or not np.array_equal(a[0], c[0])


def test_bad_config_is_a_user_error(tmp_path):
    from dataclasses import replace

    with pytest.raises(UserError, match="unknown movie"):
        simulate_session(tmp_path / "x.nwb", replace(TINY, movies=(MovieSpec("natural_movie_two", 10, 1),)))
    with pytest.raises(UserError, match="too small"):
        simulate_session(tmp_path / "x.nwb", replace(TINY, frame_height=4))
    with pytest.raises(UserError, match="directory"):
        simulate_session(tmp_path, TINY)


# ---- responses ----------------------------------------------------------------------------------

def test_responses_are_stimulus_locked_but_noisy(small_session):
    from spikevaediff.replay.binning import bin_session

    b = bin_session(small_session, "natural_movie_one", filters=None)
    n_rep, n_frames = b.repeats.max() + 1, b.frames.max() + 1
    grid = np.zeros((n_rep, n_frames, b.counts.shape[1]))
    grid[b.repeats, b.frames] = b.counts
    grid -= grid.mean(axis=1, keepdims=True)  # each unit's mean rate per repeat is not the signal
    rng = np.random.default_rng(0)
    real, shuffled = [], []
    for i in range(n_rep):
        for j in range(i + 1, n_rep):
            x, y = grid[i].ravel(), grid[j].ravel()
            real.append(np.corrcoef(x, y)[0, 1])
            shuffled.append(np.corrcoef(x, grid[j][rng.permutation(n_frames)].ravel())[0, 1])
    real, shuffled = np.mean(real), np.mean(shuffled)
    # Repeats agree far more than frame-shuffled repeats...
    assert real > shuffled + 0.1, (real, shuffled)
    # ...but single trials are noisy: nowhere near identical.
    assert real < 0.9
    assert abs(shuffled) < 0.05


def test_nwbinspector_finds_no_critical_issue(small_session):
    from nwbinspector import Importance, inspect_nwbfile

    messages = list(inspect_nwbfile(nwbfile_path=str(small_session)))
    critical = [m for m in messages if m.importance.value >= Importance.CRITICAL.value]  # incl. validation
    assert not critical, [f"{m.check_function_name}: {m.message}" for m in critical]
