"""The train -> bundle -> evaluate pipeline on a real (small, simulated) session."""
import json

import numpy as np
import pytest

from spikevaediff.core.bundle import load_bundle
from spikevaediff.core.errors import UserError
from spikevaediff.services.cli import main


def test_bundle_records_the_layout_and_every_ridge(trained_bundle, small_session):
    bundle = load_bundle(trained_bundle)
    m = bundle.manifest
    assert set(bundle.ridges) == {"vdvae", "clip_vision", "clip_text"}
    assert m.movie == "natural_movie_one" and set(m.areas) == {"VISp", "VISl"}
    assert set(m.unit_areas) == {"VISp", "VISl"} and len(m.units) == len(m.unit_areas)
    assert m.split["name"] == "repeats" and m.split["n_test"] > 0
    assert m.target_shapes["clip_vision"] == [257, 64] and m.target_shapes["clip_text"] == [77, 64]
    assert m.target_shapes["vdvae"] == [bundle.ridges["vdvae"].mean_y_.shape[-1]]
    for name, ridge in bundle.ridges.items():
        assert m.alphas[name] == pytest.approx(float(ridge.alpha_))


def test_second_training_reuses_the_cached_targets(trained_bundle, small_session, tiny_weights, tmp_path, caplog):
    from spikevaediff.core.config import ModelProfile
    from spikevaediff.training.fit import TrainConfig, train

    caplog.set_level("INFO")
    train(TrainConfig(sessions=[small_session], movie="natural_movie_one", out=tmp_path / "again",
                      areas=["VISp"], profile=ModelProfile("tiny", tiny_weights),
                      cache_dir=trained_bundle.parent / "targets-cache", targets=("vdvae", "clip_vision")))
    cached = [r.getMessage() for r in caplog.records if "from cache" in r.getMessage()]
    assert any("vdvae" in m for m in cached) and any("clip_vision" in m for m in cached)


def test_evaluate_writes_report_and_beats_shuffled_spikes(trained_bundle, small_session, tmp_path):
    out = tmp_path / "report"
    assert main(["evaluate", str(trained_bundle), str(small_session), "--out", str(out), "--refine", "3",
                 "--refine-steps", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "report.md").read_text().count("|") > 10
    assert (out / "gallery.png").stat().st_size > 1000
    model, shuffled = metrics["model"], metrics["shuffled"]
    # The latents are decoded from real spikes: identification must beat the shuffled control.
    assert model["two_way_vdvae"] > shuffled["two_way_vdvae"] + 0.1
    assert model["frame_id_1s"] > metrics["chance"]["frame_id_1s"] + 0.1
    assert abs(shuffled["two_way_vdvae"] - 0.5) < 0.1
    assert metrics["refined"] == {"n": 3, "steps": 1}


def test_evaluate_rejects_a_session_with_other_units(trained_bundle, tmp_path, capsys):
    from spikevaediff.replay.simulate import MovieSpec, SimulationConfig, simulate_session

    other = tmp_path / "other.nwb"
    simulate_session(other, SimulationConfig(movies=(MovieSpec("natural_movie_one", 60, 2),),
                                             units_scale=0.2, grey_s=1.0, seed=99))
    code = main(["evaluate", str(trained_bundle), str(other), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]


def test_pooled_sessions_concatenate_units_aligned_by_frame(small_session, tmp_path):
    import shutil

    from spikevaediff.training.population import load_population

    copy = tmp_path / "copy.nwb"
    shutil.copy(small_session, copy)
    with pytest.raises(UserError, match="twice"):  # same session id twice is refused
        load_population([small_session, copy], "natural_movie_one", areas=["VISp"])
    single = load_population([small_session], "natural_movie_one", areas=["VISp"])
    assert single.counts.shape[0] == len(single.frames)
    assert np.all(np.diff(single.frames[single.repeats == 0]) == 1)


def test_two_sessions_pool_into_one_pseudo_population(small_session, tiny_weights, tmp_path):
    """`train S1 S2`: units of both sessions side by side, aligned by (frame, repeat)."""
    from spikevaediff.replay.simulate import simulate_session
    from spikevaediff.training.population import load_population
    from tests.conftest import small_session_config
    from dataclasses import replace

    other = tmp_path / "other.nwb"
    simulate_session(other, replace(small_session_config(), seed=8))  # other mouse, same movie
    one = load_population([small_session], "natural_movie_one", areas=["VISp"])
    two = load_population([other], "natural_movie_one", areas=["VISp"])
    pooled = load_population([small_session, other], "natural_movie_one", areas=["VISp"])
    assert pooled.n_units == one.n_units + two.n_units
    assert {s for s, _ in pooled.unit_keys} == {one.unit_keys[0][0], two.unit_keys[0][0]}
    # each pooled row holds session 1's and session 2's counts for the same frame and repeat
    row = np.flatnonzero((pooled.frames == 17) & (pooled.repeats == 1))[0]
    r1 = np.flatnonzero((one.frames == 17) & (one.repeats == 1))[0]
    r2 = np.flatnonzero((two.frames == 17) & (two.repeats == 1))[0]
    assert np.array_equal(pooled.counts[row], np.concatenate([one.counts[r1], two.counts[r2]]))

    out = tmp_path / "pooled-bundle"
    assert main(["train", str(small_session), str(other), "--movie", "natural_movie_one", "--areas", "VISp",
                 "--weights", str(tiny_weights), "--targets", "vdvae", "--out", str(out)]) == 0
    manifest = load_bundle(out).manifest
    assert len(manifest.sessions) == 2 and len(manifest.units) == pooled.n_units


@pytest.mark.slow
def test_ablate_writes_table_and_figure_per_area(small_session, tiny_weights, tmp_path):
    out = tmp_path / "ablate"
    assert main(["ablate", str(small_session), "--movie", "natural_movie_one", "--areas", "VISp", "VISl",
                 "--weights", str(tiny_weights), "--out", str(out), "--test-repeats", "1"]) == 0
    rows = json.loads((out / "results.json").read_text())
    conditions = [r["condition"] for r in rows]
    assert conditions[:3] == ["VISp", "VISl", "all"] and len(rows) == 5  # + two equal-unit rows
    equal = [r for r in rows if "units)" in r["condition"]]
    assert len({r["n_units"] for r in equal}) == 1
    assert rows[2]["n_units"] == rows[0]["n_units"] + rows[1]["n_units"]
    assert (out / "ablation.png").stat().st_size > 1000 and "| all |" in (out / "table.md").read_text()


@pytest.mark.slow
def test_ablate_compares_plain_vae_and_vdvae_previews(small_session, tiny_weights, tmp_path):
    out = tmp_path / "stage1"
    assert main(["ablate", str(small_session), "--movie", "natural_movie_one", "--areas", "VISl",
                 "--stage1", "vdvae", "vae", "--no-equal-units", "--weights", str(tiny_weights),
                 "--out", str(out), "--test-repeats", "1"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {(r["stage1"], r["condition"]) for r in rows} == {
        ("vdvae", "VISl"), ("vdvae", "all"), ("vae", "VISl"), ("vae", "all")}
    assert (out / "stage1_previews.png").stat().st_size > 1000
