"""RidgeRegression: parity with scikit-learn, planted maps and alphas, both weight forms, I/O."""
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from spikevaediff.core.errors import UserError
from spikevaediff.core.ridge import RidgeRegression, transductive_renormalise
from spikevaediff.core.ridge_solver import make_folds


def _counts(rng, n, p):
    return rng.poisson(rng.uniform(0.5, 5.0, size=p), size=(n, p)).astype(np.float64)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("n,p", [(120, 30), (30, 80)])  # n >= p (primal Gram) and n < p (kernel)
@pytest.mark.parametrize("low_rank", [False, True])
def test_matches_sklearn_ridge_on_standardised_inputs(n, p, low_rank):
    rng = np.random.default_rng(1)
    x, x_test = _counts(rng, n, p), _counts(rng, 40, p)
    y = rng.normal(size=(n, 7)) + x[:, :3] @ rng.normal(size=(3, 7))
    ours = RidgeRegression(alpha=12.5, low_rank=low_rank).fit(x, y)
    scaler = StandardScaler().fit(x)
    ref = Ridge(alpha=12.5).fit(scaler.transform(x), y)
    assert ours.is_low_rank == low_rank
    assert _rel(ours.predict(x_test), ref.predict(scaler.transform(x_test))) < 1e-6
    folded_ref = (ref.coef_ / scaler.scale_).T  # sklearn's weights on raw counts, [p, q]
    assert _rel(ours.dense_coef().numpy(), folded_ref) < 1e-6
    assert ours.alpha_ == 12.5 and ours.cv_scores_ is None
    np.testing.assert_allclose(ours.mean_x_.numpy(), scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.scale_x_.numpy(), scaler.scale_, rtol=1e-12)


def test_silent_unit_is_handled_like_standard_scaler():
    rng = np.random.default_rng(2)
    x = _counts(rng, 60, 10)
    x[:, 4] = 0.0  # a unit that never fired in training
    y = rng.normal(size=(60, 3))
    ours = RidgeRegression(alpha=3.0).fit(x, y)
    scaler = StandardScaler().fit(x)
    ref = Ridge(alpha=3.0).fit(scaler.transform(x), y)
    assert ours.scale_x_[4] == 1.0
    x_test = _counts(rng, 5, 10)
    assert _rel(ours.predict(x_test), ref.predict(scaler.transform(x_test))) < 1e-6


def test_recovers_planted_linear_map():
    rng = np.random.default_rng(3)
    n, p, q = 2000, 20, 6
    x = _counts(rng, n, p)
    w = rng.normal(size=(p, q))
    b = rng.normal(size=q)
    y = x @ w + b + 0.05 * rng.normal(size=(n, q))
    ours = RidgeRegression(alpha=1e-3).fit(x, y)
    np.testing.assert_allclose(ours.dense_coef().numpy(), w, atol=0.01)
    np.testing.assert_allclose(ours.intercept_.numpy(), b, atol=0.1)


def test_cv_picks_the_planted_alphas_neighbourhood():
    # Gaussian prior on the weights with variance tau^2 on z-scored inputs and noise sigma^2:
    # the best alpha in expectation is sigma^2 / tau^2 = 100.
    rng = np.random.default_rng(4)
    n, p, q = 600, 60, 150
    x = rng.normal(size=(n, p))
    w = rng.normal(scale=0.1, size=(p, q))
    y = x @ w + rng.normal(size=(n, q))
    grid = 10.0 ** np.arange(-1.0, 5.01, 0.5)
    for mode in ("contiguous", "shuffled"):
        ours = RidgeRegression(alphas=grid, cv=5, cv_mode=mode).fit(x, y)
        assert 10 ** 1.5 - 1e-9 <= ours.alpha_ <= 10 ** 2.5 + 1e-9, (mode, ours.alpha_)
        assert ours.cv_scores_.shape == (len(grid), 1)
        # The planted alpha scores clearly better than both ends of the grid.
        best = ours.cv_scores_.max()
        assert best > ours.cv_scores_[0, 0] + 0.01 and best > ours.cv_scores_[-1, 0] + 0.01


def test_cv_alpha_per_target_group():
    # Group 0 is pure signal (wants little shrinkage), group 1 pure noise (wants the most).
    rng = np.random.default_rng(5)
    n, p = 400, 15
    x = rng.normal(size=(n, p))
    signal = x @ rng.normal(size=(p, 4)) + 0.01 * rng.normal(size=(n, 4))
    noise = rng.normal(size=(n, 4))
    grid = (0.01, 1.0, 100.0, 1e4, 1e6)
    ours = RidgeRegression(alphas=grid, target_groups=2).fit(x, np.hstack([signal, noise]))
    assert ours.alpha_.shape == (2,)
    assert ours.alpha_[0] <= 1.0 and ours.alpha_[1] >= 1e4
    only_signal = RidgeRegression(alpha=float(ours.alpha_[0])).fit(x, signal)
    np.testing.assert_allclose(ours.predict(x)[:, :4], only_signal.predict(x), rtol=1e-9, atol=1e-9)


def test_contiguous_folds_hold_out_runs_with_a_gap_and_respect_groups():
    folds = make_folds(50, 5, "contiguous", gap=2)
    val = [set(v.tolist()) for _, v in folds]
    assert sorted(set().union(*val)) == list(range(50))
    for (train, held) in folds:
        lo, hi = held.min(), held.max()
        assert held.tolist() == list(range(lo, hi + 1))  # one consecutive run
        assert not (set(train.tolist()) & set(range(lo - 2, hi + 3)))  # nor its neighbours
    # Three repeats of 20 frames: a frame is never split between training and validation.
    frames = np.tile(np.arange(20), 3)
    for train, held in make_folds(60, 4, "contiguous", groups=frames):
        assert not set(frames[train]) & set(frames[held])
    shuffled = make_folds(50, 5, "shuffled", seed=0)
    assert any(np.any(np.diff(v) > 1) for _, v in shuffled)
    with pytest.raises(UserError):
        make_folds(3, 5, "contiguous")


@pytest.mark.parametrize("n,p,q,expect_low_rank", [(40, 400, 600, True), (300, 20, 50, False)])
def test_auto_form_and_dense_low_rank_agree(n, p, q, expect_low_rank):
    rng = np.random.default_rng(6)
    x, y = _counts(rng, n, p), rng.normal(size=(n, q))
    auto = RidgeRegression(alpha=50.0).fit(x, y)
    assert auto.is_low_rank == expect_low_rank
    if expect_low_rank:
        assert auto.factors_[0].shape == (p, auto.rank_) and auto.rank_ <= n - 1
    dense = RidgeRegression(alpha=50.0, low_rank=False).fit(x, y)
    low = RidgeRegression(alpha=50.0, low_rank=True).fit(x, y)
    x_test = _counts(rng, 9, p)
    assert _rel(low.predict(x_test), dense.predict(x_test)) < 1e-9
    # The float32 single-bin fast path agrees with the float64 batch prediction.
    for model in (dense, low):
        one = model.project(x_test[0])
        assert one.dtype == torch.float32 and one.shape == (q,)
        assert _rel(one.numpy(), model.predict(x_test[:1])[0]) < 1e-4
        assert model.project(torch.as_tensor(x_test[:3])).shape == (3, q)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    x, y = _counts(rng, 50, 70), rng.normal(size=(50, 30)).astype(np.float32)
    for low_rank in (False, True):
        ours = RidgeRegression(alphas=(1.0, 10.0, 100.0), cv=3, low_rank=low_rank).fit(x, y)
        path = ours.save(tmp_path / f"r{int(low_rank)}")
        assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
        back = RidgeRegression.load(path)
        assert back.is_low_rank == low_rank and back.alpha_ == ours.alpha_
        np.testing.assert_allclose(back.cv_scores_, ours.cv_scores_)
        x_test = _counts(rng, 4, 70)
        np.testing.assert_allclose(back.predict(x_test), ours.predict(x_test), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.project(x_test[0]), ours.project(x_test[0]))


def test_load_rejects_missing_and_corrupt_files(tmp_path):
    rng = np.random.default_rng(8)
    ours = RidgeRegression(alpha=1.0).fit(_counts(rng, 20, 5), rng.normal(size=(20, 3)))
    path = ours.save(tmp_path / "ridge.safetensors")
    with pytest.raises(UserError, match="missing"):
        RidgeRegression.load(tmp_path / "absent.safetensors")
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(UserError, match="corrupt"):
        RidgeRegression.load(path)
    ours.save(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["n_targets"] = 99
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="corrupt"):
        RidgeRegression.load(path)


def test_user_errors_for_bad_input():
    rng = np.random.default_rng(9)
    x, y = _counts(rng, 20, 5), rng.normal(size=(20, 3))
    with pytest.raises(UserError, match="samples"):
        RidgeRegression(alpha=1.0).fit(x, y[:10])
    bad = y.copy()
    bad[3, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        RidgeRegression(alpha=1.0).fit(x, bad)
    with pytest.raises(UserError, match="not both"):
        RidgeRegression(alpha=1.0, alphas=(1.0, 2.0)).fit(x, y)
    with pytest.raises(UserError, match="divide"):
        RidgeRegression(alphas=(1.0,), target_groups=2).fit(x, y)
    fitted = RidgeRegression(alpha=1.0).fit(x, y)
    with pytest.raises(UserError, match="units"):
        fitted.predict(x[:, :4])
    with pytest.raises(UserError, match="not fitted"):
        RidgeRegression().predict(x)


def test_transductive_renormalisation_is_explicit_and_matches_brain_diffuser():
    rng = np.random.default_rng(10)
    x, y = _counts(rng, 80, 6), rng.normal(3.0, 2.0, size=(80, 4))
    ridge = RidgeRegression(alpha=1e4).fit(x, y)  # heavy shrinkage: tiny prediction spread
    pred = ridge.predict(_counts(rng, 30, 6))
    out = transductive_renormalise(pred, ridge.mean_y_, ridge.scale_y_)
    expected = (pred - pred.mean(0)) / pred.std(0) * y.std(0) + y.mean(0)
    np.testing.assert_allclose(out, expected, rtol=1e-10)
    assert pred.std(0).max() < 0.5 * y.std(0).min()  # predict() itself never rescales


def test_torch_inputs_and_grouped_folds():
    rng = np.random.default_rng(11)
    frames = np.tile(np.arange(30), 4)  # 4 repeats of 30 frames
    x = torch.as_tensor(_counts(rng, 120, 12))
    y = torch.as_tensor(rng.normal(size=(120, 5)), dtype=torch.float32)
    ours = RidgeRegression(alphas=(0.1, 10.0, 1e3), cv=3, cv_gap=1).fit(x, y, groups=frames)
    out = ours.predict(x[:7])
    assert isinstance(out, torch.Tensor) and out.shape == (7, 5)
    as_numpy = RidgeRegression(alphas=(0.1, 10.0, 1e3), cv=3, cv_gap=1).fit(
        x.numpy(), y.numpy(), groups=frames)
    np.testing.assert_allclose(as_numpy.cv_scores_, ours.cv_scores_)
    with pytest.raises(UserError, match="groups"):
        RidgeRegression(alphas=(1.0,), cv=3).fit(x, y, groups=frames[:10])


def test_target_blocks_do_not_change_the_result(monkeypatch):
    # Wide targets are consumed in column blocks; tiny blocks (with a ragged last one) must give
    # the same fit, CV scores and statistics as one block.
    from spikevaediff.core import ridge_solver

    rng = np.random.default_rng(12)
    x, y = _counts(rng, 40, 8), rng.normal(size=(40, 23)).astype(np.float32)
    whole = RidgeRegression(alphas=(0.5, 50.0), cv=4, target_groups=23).fit(x, y)
    monkeypatch.setattr(ridge_solver, "CHUNK_ELEMENTS", 40 * 5)  # blocks of 5 columns
    blocked = RidgeRegression(alphas=(0.5, 50.0), cv=4, target_groups=23).fit(x, y)
    np.testing.assert_allclose(blocked.cv_scores_, whole.cv_scores_, rtol=1e-12)
    np.testing.assert_array_equal(blocked.alpha_, whole.alpha_)
    np.testing.assert_allclose(blocked.predict(x), whole.predict(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(blocked.scale_y_.numpy(), y.std(0), rtol=1e-5)


def test_bench_ridge_command_small(tmp_path, capsys):
    from spikevaediff.services.cli import main

    out = tmp_path / "bench.json"
    code = main(["bench-ridge", "--samples", "80", "--units", "20", "--targets", "300",
                 "--test-samples", "10", "--pooled-units", "400", "--repeats", "3",
                 "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["fit_predict"]["max_rel_diff_vs_sklearn"] < 1e-6
    picks = {row["n_units"]: row["auto_picks"] for row in result["projection"]}
    assert picks == {20: "dense", 400: "low_rank"}
    assert "ratio" in capsys.readouterr().out
