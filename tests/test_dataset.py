import numpy as np
import pytest

from spikevaediff.core.errors import UserError
from spikevaediff.training import dataset


def _layout(n_frames=300, n_repeats=5):
    frames = np.tile(np.arange(n_frames), n_repeats)
    repeats = np.repeat(np.arange(n_repeats), n_frames)
    valid = np.ones(len(frames), bool)
    return frames, repeats, valid


def test_repeats_split_holds_out_whole_repeats():
    frames, repeats, valid = _layout()
    valid[5] = False
    s = dataset.split_repeats(repeats, valid, n_test_repeats=2, seed=1)
    assert not (s.train & s.test).any()
    assert len(np.unique(repeats[s.test])) == 2
    assert set(np.unique(repeats[s.train])).isdisjoint(np.unique(repeats[s.test]))
    assert not s.train[5] and not s.test[5]
    assert s.train.sum() + s.test.sum() == valid.sum()


@pytest.mark.parametrize("seed", range(5))
def test_segments_split_never_trains_on_test_frames_or_their_neighbours(seed):
    frames, repeats, valid = _layout(n_frames=600)
    gap = 20
    s = dataset.split_segments(frames, valid, 600, test_fraction=0.2, n_segments=4, gap=gap, seed=seed)
    test_frames = np.unique(frames[s.test])
    train_frames = np.unique(frames[s.train])
    nearest = np.min(np.abs(train_frames[:, None] - test_frames[None, :]), axis=1)
    assert nearest.min() > gap
    assert 0.15 < len(test_frames) / 600 < 0.25
    # every repeat of a test frame is in the test set
    assert s.test.sum() == len(test_frames) * 5


def test_split_errors_are_user_errors():
    frames, repeats, valid = _layout(n_repeats=1)
    with pytest.raises(UserError):
        dataset.split_repeats(repeats, valid)
    with pytest.raises(UserError):
        dataset.make_split("random", frames, repeats, valid, 300)
    with pytest.raises(UserError):
        dataset.split_segments(frames, valid, 300, test_fraction=0.9, n_segments=4)


def test_average_by_frame_matches_loop():
    rng = np.random.default_rng(0)
    frames, repeats, valid = _layout(n_frames=20, n_repeats=4)
    counts = rng.poisson(3, size=(len(frames), 7)).astype(np.float32)
    mask = repeats != 2
    ids, avg = dataset.average_by_frame(counts, frames, mask)
    assert np.array_equal(ids, np.arange(20))
    for f in (0, 7, 19):
        assert np.allclose(avg[f], counts[mask & (frames == f)].mean(0))


def test_square_frames_crops_the_centre():
    frames = np.zeros((2, 40, 80), np.uint8)
    frames[:, :, 20:60] = 200  # the centre square is bright, the sides dark
    out = dataset.square_frames(frames, 16)
    assert out.shape == (2, 16, 16) and out.dtype == np.uint8
    assert out.min() >= 190
