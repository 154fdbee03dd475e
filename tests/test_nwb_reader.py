"""The Allen-layout reader, on our simulated file and on files missing pieces."""
from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

from spikevaediff.core.errors import UserError
from spikevaediff.replay.movie import make_movie
from spikevaediff.replay.nwb import (DEFAULT_UNIT_FILTERS, UnitFilters, derive_repeats,
                                     open_session)
from spikevaediff.replay.simulate import movie_seed

from conftest import small_session_config


def _text(values):
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])


# ---- our simulated session ------------------------------------------------------------------------

def test_areas_movies_and_units(small_session):
    with open_session(small_session) as s:
        assert s.areas() == ["VISp", "VISl", "VISrl", "VISal", "VISpm", "VISam"]
        assert s.movies() == ["natural_movie_one", "natural_movie_three"]
        every = s.units(filters=None)
        passing = s.units()
        assert 0 < len(passing) < len(every)
        assert every.ids.dtype == np.int64 and len(np.unique(every.ids)) == len(every)
        visl = s.units(areas=["VISl"], filters=None)
        assert set(visl.areas) == {"VISl"} and 0 < len(visl) < len(every)
        # The paper's "VISI" is VISl; area names are case-insensitive.
        assert np.array_equal(s.units(areas="VISI", filters=None).ids, visl.ids)
        assert np.array_equal(s.units(areas=["visl"], filters=None).ids, visl.ids)
        # Filters passed as a dict, and a relaxed filter keeps more units.
        relaxed = s.units(filters={"max_amplitude_cutoff": 0.5})
        assert len(passing) < len(relaxed) <= len(every)
        assert (passing.quality == "good").all()
        assert (passing.isi_violations <= 0.5).all() and (passing.amplitude_cutoff <= 0.1).all()
        assert (passing.presence_ratio >= 0.95).all()


def test_area_comes_from_the_peak_channel(small_session):
    with open_session(small_session) as s:
        units = s.units(filters=None)
    with h5py.File(small_session, "r") as f:
        channel_ids = f["general/extracellular_ephys/electrodes/id"][:]
        locations = _text(f["general/extracellular_ephys/electrodes/location"][:])
        ids = f["units/id"][:]
        peaks = f["units/peak_channel_id"][:]
    by_channel = dict(zip(channel_ids.tolist(), locations.tolist()))
    expected = [by_channel[int(p)] for p in peaks]
    assert np.array_equal(ids, units.ids)
    assert units.areas.tolist() == expected


def test_presentations_repeats_and_invalid_times(small_session):
    with open_session(small_session) as s:
        p = s.presentations("natural_movie_one")
        invalid = s.invalid_times()
    assert (p.n_frames, p.n_repeats) == (300, 4)
    assert len(p) == 1200
    assert p.frames.dtype == np.int64 and p.repeats.dtype == np.int64
    assert np.array_equal(p.frames, np.tile(np.arange(300), 4))
    assert np.array_equal(p.repeats, np.repeat(np.arange(4), 300))
    assert np.all(np.diff(p.start_times) > 0)
    assert len(np.unique(p.blocks)) == 2
    assert invalid.shape == (1, 2)
    a, b = invalid[0]
    overlaps = (p.start_times < b) & (p.stop_times > a)
    assert overlaps.any() and np.array_equal(~p.valid, overlaps)


def test_spike_times_are_lazy_sorted_and_exact(small_session):
    with open_session(small_session) as s:
        units = s.units(filters=None)
        trains = s.spike_trains(units.ids[:5])
        one = s.spike_times(int(units.ids[3]))
        with pytest.raises(UserError, match="not in"):
            s.spike_times(123)
    with h5py.File(small_session, "r") as f:
        index = f["units/spike_times_index"][:]
        data = f["units/spike_times"][:]
    assert np.array_equal(one, data[index[2]:index[3]])
    for train in trains:
        assert train.dtype == np.float64 and np.all(np.diff(train) >= 0)


def test_frames_from_the_template(small_session):
    cfg = small_session_config()
    with open_session(small_session) as s:
        assert s.has_frames("natural_movie_one")
        frames = s.frames("natural_movie_one")
    expected = make_movie(300, cfg.frame_height, cfg.frame_width, movie_seed(cfg, "natural_movie_one"))
    assert frames.dtype == np.uint8 and np.array_equal(frames, expected)


def test_unknown_area_and_empty_selection(small_session):
    with open_session(small_session) as s:
        with pytest.raises(UserError, match="unknown area 'VISx'"):
            s.units(areas=["VISx"])
        with pytest.raises(UserError, match="no units left"):
            s.units(areas=["VISp"], filters=UnitFilters(quality="excellent"))
        with pytest.raises(UserError, match="no presentations of 'natural_movie_two'"):
            s.presentations("natural_movie_two")


def test_summary_counts_units_and_movies(small_session):
    with open_session(small_session) as s:
        info = s.summary()
        n_all, n_pass = len(s.units(filters=None)), len(s.units())
    assert info["units"] == n_all and info["units_passing_filters"] == n_pass
    assert sum(a["units"] for a in info["areas"].values()) == n_all
    assert info["movies"]["natural_movie_three"]["frames"] == 150
    assert info["movies"]["natural_movie_three"]["repeats"] == 2
    assert info["movies"]["natural_movie_one"]["frames_available"] is True


def test_derive_repeats_from_frame_wrapping():
    frames = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    blocks = np.array([1] * 6 + [3] * 6)
    assert derive_repeats(frames, blocks).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # A block that starts mid-movie still starts a new repeat.
    assert derive_repeats(np.array([0, 1, 2, 1, 2]), np.array([0, 0, 0, 1, 1])).tolist() == [0, 0, 0, 1, 1]


# ---- files missing pieces ------------------------------------------------------------------------------

def test_file_without_units_is_refused(minimal_nwb):
    path, _ = minimal_nwb(units=False)
    with pytest.raises(UserError, match="has no units"):
        open_session(path)


def test_missing_file_and_not_nwb(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        open_session(tmp_path / "absent.nwb")
    text = tmp_path / "notes.nwb"
    text.write_text("not an HDF5 file")
    with pytest.raises(UserError, match="not HDF5"):
        open_session(text)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(UserError, match="not a readable NWB file"):
        open_session(plain)


def test_movie_not_in_the_file(minimal_nwb):
    path, _ = minimal_nwb(movies=("natural_movie_three",))
    with open_session(path) as s:
        assert s.movies() == ["natural_movie_three"]
        with pytest.raises(UserError, match="no presentations of 'natural_movie_one'"):
            s.presentations("natural_movie_one")


def test_no_template_and_no_npy(minimal_nwb):
    path, _ = minimal_nwb(template=False)
    with open_session(path) as s:
        assert not s.has_frames("natural_movie_one")
        with pytest.raises(UserError, match="no frames for 'natural_movie_one'"):
            s.frames("natural_movie_one")


@pytest.mark.parametrize("name", ["natural_movie_one.npy", "natural_movie_1.npy",
                                  "natural_movie_templates/natural_movie_1.h5"])
def test_external_frames_beside_the_file(minimal_nwb, name):
    path, frames = minimal_nwb(template=False)
    target = path.parent / name
    target.parent.mkdir(exist_ok=True)
    with open(target, "wb") as f:  # Allen's .h5 templates are .npy files despite the name
        np.save(f, frames["natural_movie_one"])
    with open_session(path) as s:
        assert s.has_frames("natural_movie_one")
        assert np.array_equal(s.frames("natural_movie_one"), frames["natural_movie_one"])


def test_frames_in_a_template_of_a_minimal_file(minimal_nwb):
    path, frames = minimal_nwb(template=True)
    with open_session(path) as s:
        assert np.array_equal(s.frames("natural_movie_one"), frames["natural_movie_one"])


def test_allen_layout_without_metrics_or_block_column(minimal_nwb, caplog):
    path, _ = minimal_nwb(metrics=False, block_column=False, movies=("natural_movie_one", "natural_movie_three"))
    with open_session(path) as s:
        with caplog.at_level(logging.WARNING):
            units = s.units()  # the metric filters cannot apply: skipped, with a warning
        assert len(units) == 6 and "skipped" in caplog.text
        assert np.isnan(units.snr).all()
        p = s.presentations("natural_movie_three")
        assert (p.n_frames, p.n_repeats) == (20, 3)


def test_units_all_failing_filters(minimal_nwb):
    path, _ = minimal_nwb(quality="noise")
    with open_session(path) as s:
        assert len(s.units(filters=None)) == 6
        with pytest.raises(UserError, match="no units left in VISp"):
            s.units(areas=["VISp"])


def test_default_filters_are_allensdk_defaults():
    assert DEFAULT_UNIT_FILTERS == UnitFilters("good", 0.5, 0.1, 0.95)
