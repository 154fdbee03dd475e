"""Frame-aligned binning against a naive reference, windows, sessions, npz round trip."""
from __future__ import annotations

import numpy as np
import pytest

from spikevaediff.core.errors import UserError
from spikevaediff.replay.bench_binning import naive_bin
from spikevaediff.replay.binning import (BinnedCounts, SpikeBinner, bin_session, bin_spikes,
                                         check_window, default_window)
from spikevaediff.replay.nwb import open_session


def _random_trains(rng, n_units=7, duration=20.0):
    trains = [np.sort(rng.uniform(0, duration, rng.integers(0, 400))) for _ in range(n_units)]
    trains[1] = np.zeros(0)  # a silent unit
    return trains


def _naive_subbins(trains, onsets, window, n_subbins):
    a, b = window
    edges = a + (b - a) * np.arange(n_subbins + 1) / n_subbins
    out = np.zeros((len(onsets), len(trains), n_subbins), dtype=np.float32)
    for u, train in enumerate(trains):
        for p, t in enumerate(onsets):
            for s in range(n_subbins):
                out[p, u, s] = np.count_nonzero((train >= t + edges[s]) & (train < t + edges[s + 1]))
    return out


def test_bin_spikes_matches_the_naive_reference():
    rng = np.random.default_rng(1)
    trains = _random_trains(rng)
    onsets = np.sort(rng.uniform(0, 19, 300))
    for window in ((0.05, 0.1), (0.0, 0.033), (0.02, 0.5)):
        counts = bin_spikes(trains, onsets, window)
        assert counts.shape == (300, 7) and counts.dtype == np.float32
        assert np.array_equal(counts, naive_bin(trains, onsets, window))
    sub = bin_spikes(trains, onsets, (0.04, 0.1), n_subbins=3)
    assert sub.shape == (300, 7, 3)
    assert np.array_equal(sub, _naive_subbins(trains, onsets, (0.04, 0.1), 3))
    assert np.allclose(sub.sum(axis=2), bin_spikes(trains, onsets, (0.04, 0.1)))


def test_window_is_closed_left_open_right():
    train = [np.array([1.05, 1.10, 1.2])]
    # Spike exactly at onset + start counts; spike exactly at onset + stop does not.
    assert bin_spikes(train, np.array([1.0]), (0.05, 0.1))[0, 0] == 1
    assert bin_spikes(train, np.array([1.0]), (0.05, 0.2))[0, 0] == 2


def test_chunks_equal_the_whole_and_binner_equals_bin_spikes():
    rng = np.random.default_rng(2)
    trains = _random_trains(rng)
    onsets = np.sort(rng.uniform(0, 19, 240))
    whole = bin_spikes(trains, onsets, (0.05, 0.1))
    chunks = np.concatenate([bin_spikes(trains, c, (0.05, 0.1)) for c in np.array_split(onsets, 17)])
    assert np.array_equal(whole, chunks)  # the live replay bins a few onsets at a time
    binner = SpikeBinner(trains)
    assert np.array_equal(binner.bin(onsets, (0.05, 0.1)), whole)
    assert np.array_equal(binner.bin(onsets[:1], (0.05, 0.1)), whole[:1])
    assert np.array_equal(binner.bin(onsets, (0.05, 0.1), 4), bin_spikes(trains, onsets, (0.05, 0.1), 4))


def test_default_window_follows_area_latencies():
    a, b = default_window(["VISp"])
    assert 0.04 < a < 0.061 < b < 0.11
    all_areas = default_window(None)
    assert all_areas == default_window(["VISp", "VISl", "VISrl", "VISal", "VISpm", "VISam"])
    assert all_areas[0] == a and all_areas[1] > b  # VISam/VISpm respond later
    assert default_window(["VISam"])[0] > a


@pytest.mark.parametrize("window,subbins", [((0.1, 0.05), 1), ((-0.1, 0.05), 1), ((0.0, 2.0), 1),
                                            ((0.0, float("nan")), 1), ((0.05,), 1), ((0.0, 0.1), 0)])
def test_windows_that_do_not_fit(window, subbins):
    with pytest.raises(UserError):
        check_window(window, subbins)
    with pytest.raises(UserError):
        bin_spikes([np.array([1.0])], np.array([0.9]), window, subbins)


def test_bin_session_on_the_small_session(small_session, tmp_path):
    with open_session(small_session) as s:
        b = bin_session(s, "natural_movie_one", areas=["VISl", "VISp"])
        units = s.units(areas=["VISl", "VISp"])
        pres = s.presentations("natural_movie_one")
        trains = s.spike_trains(units.ids[:3])
    assert b.counts.shape == (len(pres), len(units))
    assert np.array_equal(b.unit_ids, units.ids) and set(b.unit_areas) == {"VISl", "VISp"}
    assert np.array_equal(b.frames, pres.frames) and np.array_equal(b.repeats, pres.repeats)
    assert np.array_equal(b.valid, pres.valid)
    assert b.window == default_window(["VISp", "VISl"])
    assert np.array_equal(b.counts[:, :3], naive_bin(trains, pres.start_times, b.window))
    assert b.counts.sum() > 0

    path = b.save_npz(tmp_path / "counts.npz")
    back = BinnedCounts.load_npz(path)
    for name in ("counts", "frames", "repeats", "valid", "unit_ids", "unit_areas", "onsets", "blocks"):
        assert np.array_equal(getattr(back, name), getattr(b, name)), name
    assert back.window == b.window and back.movie == "natural_movie_one"


def test_bin_session_accepts_a_path_subbins_and_no_filters(small_session):
    b = bin_session(small_session, "natural_movie_three", window=(0.05, 0.1), n_subbins=2, filters=None)
    with open_session(small_session) as s:
        n_all = len(s.units(filters=None))
    assert b.counts.shape == (300, n_all, 2)


def test_load_npz_of_something_else(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    with pytest.raises(UserError, match="not a binned-counts file"):
        BinnedCounts.load_npz(other)
    with pytest.raises(UserError, match="no such file"):
        BinnedCounts.load_npz(tmp_path / "absent.npz")
