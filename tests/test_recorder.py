"""The recorder with real processes and sockets: a small publisher process stands in for the
replay, decoder and refiner (same lanes, same protocol); the recorder runs as
`spikevaediff serve recorder`, its status read on a real control PULL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from spikevaediff.core.wire import decode
from spikevaediff.services.recording import HOPS, hop_latencies_ms, read_recording
from spikevaediff.services.settings import ServiceConfig
from spikevaediff.services.transport import free_tcp_port, tcp_endpoint

# Publishes N bins the way the live services do: counts (lossless), previews (latest), a refined
# image every 3rd bin, one malformed preview frame, then the two end-of-stream messages.
PUBLISHER = r"""
import sys, time
import numpy as np
from spikevaediff.core.wire import Kind, Message
from spikevaediff.services.lanes import LATEST, Publisher
from spikevaediff.services.transport import Endpoint, Network

counts_addr, preview_addr, refined_addr, n, interval, eos = sys.argv[1:7]
n, interval, eos = int(n), float(interval), eos == "1"
with Network() as net:
    counts = Publisher(net, Endpoint(counts_addr, bind=True))
    preview = Publisher(net, Endpoint(preview_addr, bind=True), lane=LATEST, hwm=1000)
    refined = Publisher(net, Endpoint(refined_addr, bind=True), lane=LATEST, hwm=1000)
    for pub in (counts, preview, refined):
        pub.wait_for_subscribers(["recorder"], timeout_s=60)
    print("subscribed", flush=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        meta = {"frame": i % 300, "repeat": 0, "movie": "m"}
        c = Message(Kind.COUNTS, "sess", seq=i, bin_index=i, t_start=i / 30, t_stop=(i + 1) / 30,
                    meta=meta, arrays={"counts": rng.poisson(1, 20).astype(np.float32)})
        sent = c.stamp("replay_send")
        counts.send(c)
        p = Message(Kind.PREVIEW, "decoder", seq=i, bin_index=i, t_start=c.t_start, t_stop=c.t_stop,
                    meta=meta, arrays={"image": np.full((64, 64, 3), i % 256, np.uint8)})
        p.stamps = {"replay_send": sent, "decoder_recv": sent + 1_000_000,
                    "decoder_preview_send": sent + 3_000_000}
        preview.send(p)
        if i == 5:
            preview.socket.send(b"preview/decoder\x00not an envelope")
        if i % 3 == 0:
            r = Message(Kind.REFINED, "refiner-0", seq=i // 3, bin_index=i, t_start=c.t_start,
                        t_stop=c.t_stop, meta=meta, arrays={"image": np.full((96, 96, 3), i % 256, np.uint8)})
            r.stamps = dict(p.stamps, decoder_request_send=sent + 4_000_000,
                            refiner_recv=sent + 5_000_000, refiner_send=sent + 50_000_000)
            refined.send(r)
        print("sent", i, flush=True)
        time.sleep(interval)
    if eos:
        counts.send(Message(Kind.END_OF_STREAM, "sess", seq=n))
        preview.send(Message(Kind.END_OF_STREAM, "decoder", seq=n))
    time.sleep(0.5)
"""


def _config(tmp_path: Path) -> tuple[ServiceConfig, Path]:
    cfg = ServiceConfig(out=str(tmp_path / "run"), n_refiners=1, heartbeat_s=0.1)
    for name in ("counts", "sync", "preview", "work", "control", "refined"):
        setattr(cfg.endpoints, name, tcp_endpoint(free_tcp_port()))
    path = tmp_path / "config.json"
    cfg.validate().save(path)
    return cfg, path


def _start(cfg_path: Path, tmp_path: Path, n: int, interval: float, eos: bool, cfg: ServiceConfig):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    recorder = subprocess.Popen([sys.executable, "-m", "spikevaediff.services.cli", "serve", "recorder",
                                 "--config", str(cfg_path)], env=env,
                                stdout=open(tmp_path / "recorder.log", "wb"), stderr=subprocess.STDOUT)
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, cfg.endpoints.counts, cfg.endpoints.preview,
                                  cfg.endpoints.refined, str(n), str(interval), "1" if eos else "0"],
                                 env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "pub.log", "wb"))
    return recorder, publisher


def _control(cfg: ServiceConfig):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(cfg.endpoints.control)
    return ctx, pull


def _statuses(pull, timeout_ms: int = 0) -> list[dict]:
    out = []
    while pull.poll(timeout_ms):
        timeout_ms = 0
        out.append(decode(pull.recv_multipart()).meta)
    return out


def _cleanup(*procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_hop_latencies_from_stamps():
    stamps = {"replay_send": 1_000_000, "decoder_recv": 3_000_000, "decoder_preview_send": 10_000_000}
    hops = hop_latencies_ms(stamps)
    assert hops["transport"] == pytest.approx(2.0)
    assert hops["decode"] == pytest.approx(7.0)
    assert hops["preview_end_to_end"] == pytest.approx(9.0)
    assert "refine" not in hops and set(hops) <= set(HOPS)


@pytest.mark.timeout(120)
def test_recorder_writes_every_message_and_stops_on_end_of_stream(tmp_path):
    cfg, cfg_path = _config(tmp_path)
    ctx, pull = _control(cfg)
    n = 30
    recorder, publisher = _start(cfg_path, tmp_path, n, 0.01, True, cfg)
    try:
        assert recorder.wait(timeout=90) == 0, (tmp_path / "recorder.log").read_text()
        publisher.wait(timeout=30)
        states = _statuses(pull, 500)
    finally:
        _cleanup(recorder, publisher)
        pull.close(0)
        ctx.term()
    rec = read_recording(Path(cfg.out) / "recording.h5")
    assert rec["counts"]["n"] == n and rec["preview"]["n"] == n
    assert rec["refined"]["n"] == len(range(0, n, 3))
    np.testing.assert_array_equal(rec["counts"]["seq"], np.arange(n))
    np.testing.assert_array_equal(rec["preview"]["bin"], np.arange(n))
    np.testing.assert_array_equal(rec["preview"]["frame"], np.arange(n) % 300)
    assert rec["preview"]["image"].shape == (n, 64, 64, 3)
    assert (rec["preview"]["image"][:, 0, 0, 0] == np.arange(n)).all()
    assert rec["refined"]["image"].shape[1:] == (96, 96, 3)
    np.testing.assert_allclose(rec["preview"]["hops"]["decode"], 2.0)
    np.testing.assert_allclose(rec["refined"]["hops"]["refine"], 45.0)
    assert (rec["preview"]["stamps"]["recorder_recv"] > rec["preview"]["stamps"]["replay_send"]).all()
    assert np.isnan(rec["counts"]["hops"]["decode"]).all()
    # the malformed frame was counted, not fatal; final stats reached the launcher side
    final = [s for s in states if s["state"] == "stopped"]
    assert final, states
    stats = final[-1]["stats"]
    assert stats["preview_lane"]["bad"] == {"envelope": 1}
    assert stats["written"] == {"counts": n, "preview": n, "refined": rec["refined"]["n"]}
    assert stats["counts_lane"]["gaps"] == 0
    assert stats["eos_replay"] and stats["eos_decoder"]
    assert '"written"' in rec["attrs"]["stats"]


@pytest.mark.timeout(120)
def test_recording_survives_sigkill_mid_stream(tmp_path):
    cfg, cfg_path = _config(tmp_path)
    ctx, pull = _control(cfg)
    recorder, publisher = _start(cfg_path, tmp_path, 100000, 0.02, False, cfg)
    last_written = 0
    try:
        deadline = time.monotonic() + 90
        while last_written < 20 and time.monotonic() < deadline:  # wait until it is well under way
            for status in _statuses(pull, 200):
                if status["state"] == "running":
                    last_written = status["stats"]["written"]["preview"]
        assert last_written >= 20, (tmp_path / "recorder.log").read_text()
        os.kill(recorder.pid, signal.SIGKILL)
        recorder.wait(timeout=10)
        for status in _statuses(pull, 100):  # heartbeats sent before the kill
            if status["state"] == "running":
                last_written = max(last_written, status["stats"]["written"]["preview"])
    finally:
        _cleanup(recorder, publisher)
        pull.close(0)
        ctx.term()
    path = Path(cfg.out) / "recording.h5"
    with h5py.File(path, "r") as f:  # opens with plain h5py after the kill
        assert f["preview/image"].shape[0] >= last_written
    rec = read_recording(path)
    n = rec["preview"]["n"]
    # every message the recorder reported as written is in the file, in order, nothing skipped
    assert n >= last_written
    np.testing.assert_array_equal(rec["preview"]["seq"], np.arange(n))
    assert (rec["preview"]["image"][:, 0, 0, 0] == np.arange(n) % 256).all()
    np.testing.assert_array_equal(rec["counts"]["seq"], np.arange(rec["counts"]["n"]))
