"""Shared fixtures. `small_session`: a small synthetic Allen-layout session, simulated once per
test run (a few seconds) and reused by every test that needs real NWB data."""
from __future__ import annotations

import pytest

SMALL_SESSION_CONFIG = dict(
    # natural_movie_one 300 frames x 4 repeats, natural_movie_three 150 x 2, ~170 units, 64x128
    # frames, template inside the file; short grey gaps keep the recording ~60 s.
    movies=(("natural_movie_three", 150, 2), ("natural_movie_one", 300, 4)),
    units_scale=0.4, grey_s=2.0, seed=7,
)


def small_session_config():
    """The SimulationConfig behind `small_session` (for tests that need the same parameters)."""
    from spikevaediff.replay.simulate import MovieSpec, SimulationConfig

    cfg = dict(SMALL_SESSION_CONFIG)
    cfg["movies"] = tuple(MovieSpec(*m) for m in cfg["movies"])
    return SimulationConfig(**cfg)


@pytest.fixture(scope="session")
def small_session(tmp_path_factory):
    """Path of a small simulated session (NWB, movie template inside). Treat it as read-only."""
    from spikevaediff.replay.simulate import simulate_session

    path = tmp_path_factory.mktemp("small_session") / "small_session.nwb"
    simulate_session(path, small_session_config())
    return path


def write_minimal_nwb(path, units=True, movies=("natural_movie_one",), n_frames=20, n_repeats=3,
                      template=False, quality="good", metrics=True, block_column=True):
    """A small hand-made NWB file in the Allen layout, with pieces left out on request.

    Two probes (VISp, VISl) of 4 channels, 3 units per area (ids 101.., peak channels 5001..),
    `movies` presented n_frames x n_repeats in one block each, optional stimulus template.
    Returns the frames written (or that would have been) for each movie.
    """
    from datetime import datetime, timezone

    import numpy as np
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.image import ImageSeries

    rng = np.random.default_rng(0)
    nwb = NWBFile(session_description="minimal test file", identifier="minimal",
                  session_start_time=datetime(2020, 1, 1, tzinfo=timezone.utc))
    channel_ids = {}
    nwb.add_electrode_column("probe_id", "probe id")
    for p, area in enumerate(("VISp", "VISl")):
        dev = nwb.create_device(name=f"probe{'AB'[p]}", description="test probe")
        group = nwb.create_electrode_group(name=f"probe{'AB'[p]}", description="test",
                                           location="See electrode locations", device=dev)
        for c in range(4):
            cid = 5000 + p * 10 + c
            loc = area if c >= 2 else "CA1"
            nwb.add_electrode(id=cid, location=loc, group=group, probe_id=p)
            channel_ids.setdefault(area, []).append(cid) if loc == area else None
    t_end = 1.0 + len(movies) * (n_frames * n_repeats / 30 + 2.0)
    if units:
        nwb.add_unit_column("peak_channel_id", "peak channel")
        nwb.add_unit_column("quality", "label")
        if metrics:
            for col in ("isi_violations", "amplitude_cutoff", "presence_ratio", "snr", "firing_rate"):
                nwb.add_unit_column(col, col)
        uid = 100
        for area in ("VISp", "VISl"):
            for k in range(3):
                uid += 1
                extra = dict(isi_violations=0.1, amplitude_cutoff=0.05, presence_ratio=0.99, snr=3.0,
                             firing_rate=5.0) if metrics else {}
                nwb.add_unit(id=uid, spike_times=np.sort(rng.uniform(0, t_end, 200)),
                             peak_channel_id=channel_ids[area][k % 2], quality=quality, **extra)
    t = 1.0
    frames = {}
    for b, movie in enumerate(movies):
        table_cols = ["frame", "stimulus_name"] + (["stimulus_block"] if block_column else [])
        from pynwb.epoch import TimeIntervals

        table = TimeIntervals(name=f"{movie}_presentations", description=movie)
        for col in table_cols:
            table.add_column(col, col)
        for r in range(n_repeats):
            for f in range(n_frames):
                row = dict(start_time=t, stop_time=t + 1 / 30, frame=float(f), stimulus_name=movie)
                if block_column:
                    row["stimulus_block"] = float(b * 2 + 1)
                table.add_row(**row)
                t += 1 / 30
        t += 2.0
        nwb.add_time_intervals(table)
        frames[movie] = rng.integers(0, 256, (n_frames, 16, 32), dtype=np.uint8)
        if template:
            nwb.add_stimulus_template(ImageSeries(name=movie, data=frames[movie], unit="n.a.",
                                                  format="raw", rate=30.0, starting_time=0.0))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return frames


@pytest.fixture
def minimal_nwb(tmp_path):
    """Factory: `minimal_nwb(name, **options)` writes `write_minimal_nwb` into tmp_path."""
    def make(name="minimal.nwb", **options):
        path = tmp_path / name
        frames = write_minimal_nwb(path, **options)
        return path, frames
    return make


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, small_session):
    """A tiny-profile weights folder: offline CLIP, BLIP-2, Versatile Diffusion, and a VDVAE and a
    plain VAE trained for a few steps on the small session's natural_movie_three (fast, not good)."""
    from spikevaediff.core.config import ModelProfile
    from spikevaediff.core.tiny import ensure_tiny_weights
    from spikevaediff.training.train_vdvae import TrainVDVAEConfig, load_frames, train_vdvae

    weights = tmp_path_factory.mktemp("weights")
    profile = ModelProfile("tiny", weights)
    ensure_tiny_weights(profile, keys=("clip", "blip2", "versatile_diffusion"))
    frames = load_frames(small_session, "natural_movie_three")
    train_vdvae(TrainVDVAEConfig(out=profile.path("vdvae").parent, max_steps=20, minutes=1.0,
                                 batch_size=8, progress=False, max_eval=16), frames)
    train_vdvae(TrainVDVAEConfig(out=profile.path("vae").parent, arch="vae", max_steps=20, minutes=1.0,
                                 batch_size=8, progress=False, max_eval=16), frames)
    return weights


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, small_session, tiny_weights):
    """A bundle (all three ridges) trained on the small session's natural_movie_one, VISp + VISl."""
    from spikevaediff.core.config import ModelProfile
    from spikevaediff.training.fit import TrainConfig, train

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    train(TrainConfig(sessions=[small_session], movie="natural_movie_one", out=out, areas=["VISp", "VISl"],
                      profile=ModelProfile("tiny", tiny_weights), split="repeats",
                      split_params={"n_test_repeats": 1}))
    return out
