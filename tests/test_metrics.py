import numpy as np
import pytest

from spikevaediff.core import metrics


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32), dtype=np.uint8)


def test_pixcorr_is_one_for_identical_and_near_zero_for_independent():
    a, b = _images(8, 0), _images(8, 1)
    assert np.allclose(metrics.pixcorr(a, a), 1.0)
    assert abs(metrics.pixcorr(a, b).mean()) < 0.1


def test_pixcorr_ignores_brightness_and_contrast():
    a = _images(4).astype(np.float64)
    assert np.allclose(metrics.pixcorr(0.5 * a + 20, a), 1.0)


def test_ssim_orders_degradations():
    rng = np.random.default_rng(0)
    a = _images(4)
    slightly = np.clip(a + rng.normal(0, 5, a.shape), 0, 255)
    heavily = np.clip(a + rng.normal(0, 60, a.shape), 0, 255)
    s_same, s_slight, s_heavy = (metrics.ssim(x, a).mean() for x in (a, slightly, heavily))
    assert s_same == pytest.approx(1.0)
    assert s_same > s_slight > s_heavy


def test_rgb_is_compared_in_grey():
    a = _images(3)
    rgb = np.repeat(a[..., None], 3, axis=-1)
    assert np.allclose(metrics.pixcorr(rgb, a), 1.0)


def test_two_way_identification_perfect_chance_and_inverted():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(40, 16))
    assert metrics.two_way_identification(true, true) == 1.0
    noise = rng.normal(size=(40, 16))
    assert abs(metrics.two_way_identification(noise, true) - 0.5) < 0.1
    assert metrics.two_way_identification(-true, true) < 0.05


def test_frame_identification_and_its_chance():
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(300, 8))
    frames = np.arange(300)
    test_frames = np.array([10, 150, 299])
    pred = candidates[test_frames] + 0.01 * rng.normal(size=(3, 8))
    acc, chance, chosen = metrics.frame_identification(pred, test_frames, candidates, frames, tolerance=30)
    assert acc == 1.0 and np.array_equal(chosen, test_frames)
    # chance: frames within +-30 of each true frame, divided by 300 candidates
    expected = np.mean([41 / 300, 61 / 300, 31 / 300])
    assert chance == pytest.approx(expected)
    far = candidates[(test_frames + 150) % 300]
    acc_far, _, _ = metrics.frame_identification(far, test_frames, candidates, frames, tolerance=30)
    assert acc_far == 0.0


def test_two_way_identification_skips_pairs_of_the_same_frame():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(10, 16))
    true = np.concatenate([base, base])  # two repeats of the same 10 frames
    groups = np.concatenate([np.arange(10), np.arange(10)])
    pred = true + 0.1 * rng.normal(size=true.shape)
    assert metrics.two_way_identification(pred, true, groups=groups) == 1.0
    # without groups, the identical twin truths make half of those pairs coin flips
    assert metrics.two_way_identification(pred, true) < 1.0
