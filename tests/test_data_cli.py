"""The data commands through the real CLI entry point: outputs, and every bad input as one line."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.error

import numpy as np
import pytest

from spikevaediff.replay import fetch
from spikevaediff.services.cli import main


def _one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _fails(argv, capsys, expected: str):
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected in line, line


# ---- outputs ------------------------------------------------------------------------------------

def test_simulate_inspect_bin_psth(tmp_path, capsys):
    out = tmp_path / "S.nwb"
    assert main(["simulate", "--out", str(out), "--movies", "natural_movie_one", "--frames", "90",
                 "--repeats", "natural_movie_one=3", "--units-scale", "0.1", "--frame-size", "32x64",
                 "--seed", "3"]) == 0
    assert "natural_movie_one 90 frames x 3 repeats" in capsys.readouterr().out

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "VISp" in text and "passing filters" in text and "natural_movie_one" in text

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["movies"]["natural_movie_one"] == {**info["movies"]["natural_movie_one"], "frames": 90,
                                                   "repeats": 3, "frames_available": True}
    assert set(info["areas"]) == {"VISp", "VISl", "VISrl", "VISal", "VISpm", "VISam"}

    counts = tmp_path / "counts.npz"
    assert main(["bin", str(out), "--movie", "natural_movie_one", "--areas", "VISl,VISp",
                 "--no-filters", "--subbins", "2", "--out", str(counts)]) == 0
    with np.load(counts) as z:
        assert z["counts"].shape[0] == 270 and z["counts"].shape[2] == 2
        assert set(z["unit_areas"]) == {"VISl", "VISp"}
        assert z["frames"].max() == 89 and z["repeats"].max() == 2
        assert len(z["unit_ids"]) == z["counts"].shape[1]

    figure = tmp_path / "psth.png"
    assert main(["psth", str(out), "--movie", "natural_movie_one", "--out", str(figure), "--no-filters"]) == 0
    assert figure.stat().st_size > 20_000 and figure.read_bytes()[:4] == b"\x89PNG"


def test_simulate_external_frames(tmp_path, capsys):
    out = tmp_path / "S.nwb"
    assert main(["simulate", "--out", str(out), "--movies", "natural_movie_three", "--frames", "40",
                 "--repeats", "2", "--units-scale", "0.05", "--frame-size", "32x64", "--external-frames"]) == 0
    assert (tmp_path / "natural_movie_three.npy").is_file()
    assert "natural_movie_three.npy" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["movies"]["natural_movie_three"]["frames_available"] is True


def test_bench_binning_on_a_given_session(small_session, tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench-binning", "--session", str(small_session), "--movie", "natural_movie_one",
                 "--naive-units", "2", "--runs", "2", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "naive loop" in out and "speed-up" in out
    result = json.loads(report.read_text())
    assert result["presentations"] == 1200 and result["speedup_vectorised"] > 1


def test_help_is_cheap():
    code = ("import sys; from spikevaediff.services import commands_data; import argparse; "
            "p = argparse.ArgumentParser(); commands_data.register(p.add_subparsers()); "
            "print(sorted(m for m in ('pynwb', 'h5py', 'matplotlib', 'torch', 'scipy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ---- bad inputs: one line, exit 2 ------------------------------------------------------------------------

def test_missing_file(tmp_path, capsys):
    _fails(["inspect", str(tmp_path / "absent.nwb")], capsys, "no such file")
    _fails(["bin", str(tmp_path / "absent.nwb"), "--movie", "natural_movie_one", "--out",
            str(tmp_path / "c.npz")], capsys, "no such file")


def test_not_hdf5(tmp_path, capsys):
    bad = tmp_path / "bad.nwb"
    bad.write_bytes(b"definitely not hdf5")
    _fails(["inspect", str(bad)], capsys, "not an NWB file")
    _fails(["psth", str(bad), "--movie", "natural_movie_one", "--out", str(tmp_path / "p.png")], capsys,
           "not an NWB file")


def test_no_units(minimal_nwb, capsys):
    path, _ = minimal_nwb(units=False)
    _fails(["inspect", str(path)], capsys, "has no units")


def test_movie_not_in_file(small_session, tmp_path, capsys):
    _fails(["bin", str(small_session), "--movie", "natural_movie_two", "--out", str(tmp_path / "c.npz")],
           capsys, "no presentations of 'natural_movie_two'")


def test_unknown_area(small_session, tmp_path, capsys):
    _fails(["bin", str(small_session), "--movie", "natural_movie_one", "--areas", "VISx",
            "--out", str(tmp_path / "c.npz")], capsys, "unknown area 'VISx'")


def test_empty_selection_after_filters(minimal_nwb, tmp_path, capsys):
    path, _ = minimal_nwb(quality="noise")
    _fails(["bin", str(path), "--movie", "natural_movie_one", "--areas", "VISp",
            "--out", str(tmp_path / "c.npz")], capsys, "no units left")


@pytest.mark.parametrize("window", ["0.1,0.05", "-0.1,0.05", "0,3", "0.05", "a,b"])
def test_window_that_does_not_fit(small_session, tmp_path, capsys, window):
    _fails(["bin", str(small_session), "--movie", "natural_movie_one", f"--window={window}",
            "--out", str(tmp_path / "c.npz")], capsys, "window")


def test_bad_simulate_options(tmp_path, capsys):
    out = str(tmp_path / "S.nwb")
    _fails(["simulate", "--out", out, "--movies", "natural_movie_two"], capsys, "unknown movie")
    _fails(["simulate", "--out", out, "--frame-size", "64by128"], capsys, "--frame-size")
    _fails(["simulate", "--out", out, "--frames", "natural_movie_two=10"], capsys, "not among")
    _fails(["simulate", "--out", out, "--frames", "many"], capsys, "expects N or MOVIE=N")
    _fails(["simulate", "--out", out, "--units-scale", "0"], capsys, "units scale")
    _fails(["simulate", "--out", str(tmp_path)], capsys, "directory")


def test_frames_missing_for_psth_is_fine_but_not_for_frames(minimal_nwb, tmp_path, capsys):
    path, _ = minimal_nwb(template=False)
    # The PSTH does not need frames (it aligns to repeat starts instead of scene cuts).
    assert main(["psth", str(path), "--movie", "natural_movie_one", "--out", str(tmp_path / "p.png")]) == 0
    assert main(["inspect", str(path)]) == 0
    assert "no (no template" in capsys.readouterr().out


# ---- fetch, with the network replaced at its one boundary --------------------------------------------------

def _fake_network(small_session, frames):
    npy = io.BytesIO()
    np.save(npy, frames)
    served = []

    def open_url(url, timeout=60.0):
        served.append(url)
        if url.startswith(fetch.DANDI_API) and "/assets/?" in url:
            body = json.dumps({"next": None, "results": [
                {"asset_id": "abc", "path": "sub-1/sub-1_ses-715093703_probe-7_ecephys.nwb"},
                {"asset_id": "xyz", "path": "sub-1/sub-1_ses-715093703.nwb"}]}).encode()
            return io.BytesIO(body)
        if url == fetch.allen_session_url(715093703) or url == f"{fetch.DANDI_API}/assets/xyz/download/":
            return io.BytesIO(small_session.read_bytes())
        if url.startswith(f"{fetch.ALLEN_S3}/natural_movie_templates/"):
            return io.BytesIO(npy.getvalue())
        raise urllib.error.URLError(f"unexpected url {url}")

    return open_url, served


@pytest.mark.parametrize("source", ["allen-s3", "dandi"])
def test_fetch_lays_files_out_for_the_reader(small_session, tmp_path, capsys, monkeypatch, source):
    frames = np.random.default_rng(0).integers(0, 255, (30, 8, 16), dtype=np.uint8)
    fake, served = _fake_network(small_session, frames)
    monkeypatch.setattr(fetch, "open_url", fake)
    assert main(["fetch", "--session-id", "715093703", "--out", str(tmp_path), "--source", source,
                 "--movies", "natural_movie_one"]) == 0
    folder = tmp_path / "session_715093703"
    assert (folder / "session_715093703.nwb").is_file()
    assert np.array_equal(np.load(folder / "natural_movie_one.npy"), frames)
    assert any(u.endswith("natural_movie_1.h5") for u in served)
    capsys.readouterr()
    # A second fetch finds the files there and downloads nothing.
    served.clear()
    assert main(["fetch", "--session-id", "715093703", "--out", str(tmp_path), "--source", source,
                 "--movies", "natural_movie_one"]) == 0
    assert served == []


def test_fetch_network_failure_is_one_line(tmp_path, capsys, monkeypatch):
    def offline(url, timeout=60.0):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fetch, "open_url", offline)
    _fails(["fetch", "--session-id", "1", "--out", str(tmp_path)], capsys, "could not download")
    assert not list(tmp_path.rglob("*.part"))


def test_fetch_with_allensdk_needs_an_environment_with_allensdk(tmp_path, capsys):
    _fails(["fetch", "--session-id", "1", "--out", str(tmp_path), "--source", "allensdk"], capsys,
           "--allensdk-python")
    _fails(["fetch", "--session-id", "1", "--out", str(tmp_path), "--source", "allensdk",
            "--allensdk-python", str(tmp_path / "no-python")], capsys, "cannot run")
    # Our own interpreter runs the script for real; it has no allensdk, which is reported.
    _fails(["fetch", "--session-id", "1", "--out", str(tmp_path), "--source", "allensdk",
            "--allensdk-python", sys.executable], capsys, "allensdk is not importable")
