"""`spikevaediff models check / init-tiny` and `spikevaediff caption` through the real CLI."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded

import numpy as np
import pytest

from spikevaediff.core.config import WEIGHTS
from spikevaediff.services.cli import main


@pytest.fixture(autouse=True)
def no_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so a machine's real cache cannot satisfy `check`."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny weights folder with CLIP and BLIP-2 (no Versatile Diffusion, no VDVAE)."""
    folder = tmp_path_factory.mktemp("tiny")
    assert main(["models", "init-tiny", "--weights", str(folder), "--only", "clip", "blip2"]) == 0
    return folder


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "spikevaediff" in line and "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_check_on_an_empty_folder_exits_2_naming_every_missing_file(tmp_path, capsys):
    assert main(["models", "check", "--profile", "paper", "--weights", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    line = _one_error_line(err)
    for spec in WEIGHTS["paper"]:
        row = next(r for r in out.splitlines() if r.strip().startswith(spec.key + " "))
        if spec.optional:  # listed, but its absence is no error
            assert "absent" in row and str(tmp_path / spec.relpath) not in line
            continue
        assert spec.key in line and str(tmp_path / spec.relpath) in line and spec.source in line
        assert "MISSING" in row and spec.source in row
    assert "present" not in out.replace("present or missing", "")


def test_check_on_a_folder_with_every_piece_exits_0(tmp_path, capsys):
    # `check` looks for the files each loader opens first: the checkpoint and each folder's marker.
    for spec in WEIGHTS["paper"]:
        target = tmp_path / spec.relpath / spec.marker if spec.marker else tmp_path / spec.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("{}")
    assert main(["models", "check", "--profile", "paper", "--weights", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [w["weight"] for w in report["weights"]] == [s.key for s in WEIGHTS["paper"]]
    assert all(w["present"] for w in report["weights"])


def test_check_tiny_after_init_names_only_what_is_still_missing(tiny_dir, capsys):
    assert main(["models", "check", "--profile", "tiny", "--weights", str(tiny_dir)]) == 2
    out, err = capsys.readouterr()
    line = _one_error_line(err)
    assert "vdvae" in line and "versatile_diffusion" in line and "train-vdvae" in line
    assert "clip-tiny" not in line and "blip2-tiny" not in line
    assert sum("present" in row for row in out.splitlines()) == 2


def test_init_tiny_keeps_existing_folders_unless_forced(tiny_dir, capsys):
    weights = tiny_dir / "clip-tiny" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["models", "init-tiny", "--weights", str(tiny_dir), "--only", "clip"]) == 0
    assert "already present" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == before


def test_init_tiny_writes_versatile_diffusion_too(tmp_path, capsys):
    assert main(["models", "init-tiny", "--weights", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert sum("written" in row for row in out.splitlines()) == 3
    assert (tmp_path / "versatile-diffusion-tiny" / "model_index.json").is_file()
    assert main(["models", "check", "--profile", "tiny", "--weights", str(tmp_path)]) == 2
    assert "1 weight file(s): vdvae" in capsys.readouterr().err  # only the trained VDVAE is left


def test_caption_npy_writes_json_then_reuses_it(tiny_dir, tmp_path, capsys):
    frames = np.random.default_rng(0).integers(0, 256, (5, 20, 30), dtype=np.uint8)
    np.save(tmp_path / "frames.npy", frames)
    out_json = tmp_path / "captions.json"
    argv = ["caption", "--frames", str(tmp_path / "frames.npy"), "--out", str(out_json),
            "--profile", "tiny", "--weights", str(tiny_dir), "--max-new-tokens", "4", "--limit", "4"]
    assert main(argv) == 0
    assert "4 generated" in capsys.readouterr().out
    captions = json.loads(out_json.read_text())
    assert sorted(captions) == ["0", "1", "2", "3"] and all(isinstance(v, str) for v in captions.values())
    assert main(argv) == 0
    assert "0 generated, 4 reused" in capsys.readouterr().out


@pytest.mark.parametrize("content, expected", [
    (np.zeros((3, 8, 8), np.float32), "uint8"),
    (np.zeros((3, 8, 8, 2), np.uint8), "uint8 frames"),
])
def test_caption_bad_frames_give_one_line_exit_2(tiny_dir, tmp_path, capsys, content, expected):
    np.save(tmp_path / "bad.npy", content)
    argv = ["caption", "--frames", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "c.json"),
            "--weights", str(tiny_dir)]
    assert main(argv) == 2
    assert expected in _one_error_line(capsys.readouterr().err)


def test_caption_needs_a_movie_for_a_session_and_an_existing_file(tiny_dir, tmp_path, capsys):
    session = tmp_path / "s.nwb"
    session.write_bytes(b"not read")
    assert main(["caption", "--frames", str(session), "--out", str(tmp_path / "c.json")]) == 2
    assert "--movie" in _one_error_line(capsys.readouterr().err)
    assert main(["caption", "--frames", str(tmp_path / "none.npy"), "--out", str(tmp_path / "c.json")]) == 2
    assert "not found" in _one_error_line(capsys.readouterr().err)


def test_caption_frames_of_a_session_movie(small_session, tiny_dir, tmp_path, capsys):
    from spikevaediff.replay.nwb import open_session

    with open_session(small_session) as session:
        movie = session.movies()[0]
        n_frames = len(session.frames(movie))
    out_json = tmp_path / "captions.json"
    assert main(["caption", "--frames", str(small_session), "--movie", movie, "--out", str(out_json),
                 "--weights", str(tiny_dir), "--max-new-tokens", "3", "--limit", "3"]) == 0
    assert len(json.loads(out_json.read_text())) == min(3, n_frames)
