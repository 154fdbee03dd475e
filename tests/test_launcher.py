"""`spikevaediff run` end to end with real processes and sockets; `serve`/`keys`; deploy/ files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spikevaediff.core.errors import UserError
from spikevaediff.services.settings import ServiceConfig

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "spikevaediff.services.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _cli(*args, timeout=60):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too (not yet reaped by whoever adopted it)
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


# ------------------------------------------------------------------ bad input: one line, exit 2
def test_run_missing_bundle_is_one_line(tmp_path, small_session):
    result = _cli("run", "--session", small_session, "--bundle", tmp_path / "nope", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0]


def test_run_bad_options_are_one_line(tmp_path, small_session, trained_bundle):
    cases = [
        (["--session", tmp_path / "missing.nwb"], "session file not found"),
        (["--session", small_session, "--speed", "0"], "speed must be > 0"),
        (["--session", small_session, "--profile", "paper"], "does not match the bundle"),
        (["--session", small_session, "--refiners", "-1"], "--refiners"),
        (["--session", small_session, "--device", "gpu0"], "must be cpu, cuda or cuda:N"),
    ]
    for extra, expected in cases:
        result = _cli("run", "--bundle", trained_bundle, "--out", tmp_path / "run", *extra)
        assert result.returncode == 2, (extra, result.stderr)
        assert "Traceback" not in result.stderr and expected in result.stderr, (extra, result.stderr)


@pytest.mark.timeout(120)
def test_ready_timeout_stops_everything_with_one_line(tmp_path, small_session, trained_bundle):
    out = tmp_path / "run"
    result = _cli("run", "--session", small_session, "--bundle", trained_bundle, "--out", out,
                  "--refiners", 0, "--ready-timeout", 0.2, timeout=100)
    assert result.returncode == 2, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "did not report ready within 0.2 s" in errors[0]
    assert "Traceback" not in result.stderr
    outcome = json.loads((out / "outcome.json").read_text())
    assert outcome["reason"] == "failed" and "replay" not in outcome["services"]
    assert not [info["pid"] for info in outcome["services"].values() if _pid_alive(info["pid"])]


def test_serve_bad_configs_are_one_line(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"speeed": 1}))
    bad_endpoint = tmp_path / "endpoint.json"
    bad_endpoint.write_text(json.dumps({"endpoints": {"counts": "udp://x"}}))
    for path, expected in ((tmp_path / "missing.json", "not found"), (bad_json, "not valid JSON"),
                           (unknown, "unknown setting"), (bad_endpoint, "endpoint counts")):
        result = _cli("serve", "recorder", "--config", path)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_keys_writes_curve_keypairs(tmp_path):
    result = _cli("keys", "--out", tmp_path / "keys", "--identities", "replay", "decoder")
    assert result.returncode == 0, result.stderr
    for identity in ("replay", "decoder"):
        secret = tmp_path / "keys" / f"{identity}.key_secret"
        assert (tmp_path / "keys" / f"{identity}.key").is_file()
        assert secret.stat().st_mode & 0o777 == 0o600
    again = _cli("keys", "--out", tmp_path / "keys", "--identities", "replay")
    assert again.returncode == 2 and "exists" in again.stderr


# ------------------------------------------------------------------ deploy/
def test_deploy_configs_load_and_compose_is_wired():
    import yaml

    configs = sorted((ROOT / "deploy").glob("*.json"))
    assert configs, "deploy/ holds no example config"
    for path in configs:
        cfg = ServiceConfig.load(path)
        assert cfg.curve_dir, f"{path.name}: a multi-host config must use CURVE"
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"replay", "decoder", "refiner", "recorder"} <= set(services)
    for name in ("replay", "decoder", "refiner", "recorder"):
        command = services[name]["command"]
        command = command if isinstance(command, list) else command.split()
        assert command[:2] == ["serve", name] and "--config" in command
        build = services[name]["build"]
        assert ((ROOT / "deploy" / build["context"]).resolve() / build["dockerfile"]).is_file()
        assert "/config/live.json" in command and "./live.compose.json:/config/live.json:ro" in services[name]["volumes"]
    for name in ("decoder", "refiner"):  # the published VDVAE and VD both need the GPU to keep up
        assert "gpu" in json.dumps(services[name].get("deploy", {}))


# ------------------------------------------------------------------ live runs
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_end_to_end_writes_report(tmp_path, small_session, trained_bundle):
    out = tmp_path / "run"
    result = _cli("run", "--session", small_session, "--bundle", trained_bundle, "--out", out,
                  "--speed", 1, "--duration", 3, "--refiners", 1, "--refiner-steps", 2,
                  "--transport", "ipc", timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["reason"] == "end_of_stream"
    n_bins = report["counts"]["recorded"]
    assert 85 <= n_bins <= 95  # 3 s of a 30 Hz movie
    assert report["counts"]["lane"]["gaps"] == 0 and report["counts"]["file_seq"]["gaps"] == 0
    # every bin is previewed or skipped by the decoder to catch up; every preview sent is
    # recorded or counted as lost on the latest lane
    preview = report["preview"]
    assert preview["sent"] + (preview["decoder_skipped"] or 0) == n_bins
    assert preview["recorded"] >= n_bins // 2
    assert preview["recorded"] + preview["lane"]["missing"] <= n_bins
    for hop in ("transport", "decode", "preview_end_to_end"):
        stats = report["latency_ms"][hop]
        assert stats["n"] == preview["recorded"] and 0 <= stats["p50"] <= stats["p99"] <= stats["max"]
    refined = report["refined"]["recorded"]
    assert refined >= 1 and report["latency_ms"]["refine"]["n"] == refined
    assert report["refined"]["by_stream"] == {"refiner-0": refined}
    assert report["throughput_hz"]["expected"] == pytest.approx(30, rel=0.02)
    assert report["throughput_hz"]["counts"] == pytest.approx(30, rel=0.2)
    assert report["pacing_error_ms"]["n"] > 0
    for label in ("replay", "decoder", "recorder", "refiner-0"):
        assert report["services"][label]["state"] == "stopped", report["services"]
    assert (out / "report.md").read_text().startswith("# Live run report")
    assert (out / "strip.png").stat().st_size > 0 and (out / "latency.png").stat().st_size > 0
    assert "decode p50" in result.stdout
    config = ServiceConfig.load(out / "config.json")
    assert config.endpoints.counts.startswith("ipc://")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_every_process_and_keeps_the_recording(tmp_path, small_session, trained_bundle):
    from spikevaediff.services.recording import read_recording

    out = tmp_path / "run"
    launcher = subprocess.Popen([*CLI, "run", "--session", str(small_session), "--bundle", str(trained_bundle),
                                 "--out", str(out), "--speed", "1", "--duration", "60", "--refiners", "0"],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 200
        recording = out / "recording.h5"
        while time.monotonic() < deadline:  # wait until previews are being recorded
            if recording.is_file() and recording.stat().st_size > 200_000:
                break
            assert launcher.poll() is None, launcher.communicate()
            time.sleep(0.5)
        else:
            pytest.fail("no previews recorded in time")
        launcher.send_signal(signal.SIGINT)
        stdout, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, stderr
    outcome = json.loads((out / "outcome.json").read_text())
    assert outcome["reason"] == "interrupted"
    pids = [info["pid"] for info in outcome["services"].values()]
    assert len(pids) == 3
    assert not [pid for pid in pids if _pid_alive(pid)], "orphaned service processes"
    for label, info in outcome["services"].items():
        assert info["returncode"] is not None, label
    rec = read_recording(recording)
    n = rec["preview"]["n"]
    assert n > 0
    np.testing.assert_array_equal(rec["counts"]["seq"], np.arange(rec["counts"]["n"]))
    assert (rec["preview"]["bin"] == np.sort(rec["preview"]["bin"])).all()
    assert json.loads((out / "report.json").read_text())["reason"] == "interrupted"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_with_curve_encrypts_every_lane_and_loses_nothing(tmp_path, small_session, trained_bundle):
    """The multi-host setup on one machine: every socket CURVE-secured, keys from `keys`."""
    keys = tmp_path / "keys"
    assert _cli("keys", "--out", keys, "--identities", "replay", "decoder", "refiner", "recorder",
                "launcher").returncode == 0
    out = tmp_path / "run"
    result = _cli("run", "--session", small_session, "--bundle", trained_bundle, "--out", out,
                  "--duration", 2, "--refiners", 1, "--refiner-steps", 2, "--curve-dir", keys, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["recorded"] >= 55 and report["counts"]["file_seq"]["gaps"] == 0
    assert report["preview"]["recorded"] > 0 and report["refined"]["recorded"] >= 1
    assert ServiceConfig.load(out / "config.json").curve_dir == str(keys.resolve())


def test_default_pinning_gives_the_decoder_a_core_of_its_own():
    from spikevaediff.services.runtime import default_cpu_pinning

    assert default_cpu_pinning(1) == {}
    pins = default_cpu_pinning(4)
    assert pins["decoder"] == [0]
    for name in ("refiner", "replay", "recorder"):
        assert pins[name] == [1, 2, 3]
    config = ServiceConfig(cpus=pins).validate()
    assert config.cpus["decoder"] == [0]
    with pytest.raises(Exception, match="cpus.decoder"):
        ServiceConfig(cpus={"decoder": []}).validate()
    with pytest.raises(Exception, match="unknown service"):
        ServiceConfig(cpus={"gpu": [0]}).validate()


def test_devices_precision_and_compile_mode_are_validated():
    from spikevaediff.services.settings import RefinerSettings

    config = ServiceConfig(decoder_device="cuda:1",
                           refiner=RefinerSettings(device="cuda", precision="float16",
                                                   compile="reduce-overhead")).validate()
    assert config.decoder_device == "cuda:1"
    for bad, match in ((dict(decoder_device="gpu"), "decoder_device"),
                       (dict(refiner=RefinerSettings(device="cuda0")), "refiner device"),
                       (dict(refiner=RefinerSettings(precision="bfloat8")), "precision"),
                       (dict(refiner=RefinerSettings(compile="fast")), "compile")):
        with pytest.raises(UserError, match=match):
            ServiceConfig(**bad).validate()


def test_run_config_on_a_gpu_puts_decoder_and_refiner_there(tmp_path, small_session, trained_bundle,
                                                            monkeypatch):
    import torch

    from spikevaediff.services.run_config import build_run_config

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            build_run_config([small_session], trained_bundle, tmp_path / "run", device="cuda")
        # the rest is plain configuration: check it as a GPU host would build it
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = build_run_config([small_session], trained_bundle, tmp_path / "run", device="cuda:0")
    assert (config.decoder_device, config.refiner.device) == ("cuda:0", "cuda:0")
    assert (config.refiner.precision, config.refiner.compile) == ("float16", "reduce-overhead")
    config = build_run_config([small_session], trained_bundle, tmp_path / "run", compile="default")
    assert (config.decoder_device, config.refiner.compile, config.refiner.precision) == ("cpu", "default", "float32")
