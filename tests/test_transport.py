"""Transport and lanes with real ZeroMQ sockets; receivers run as real separate processes."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter

import msgpack
import numpy as np
import pytest
import zmq

from spikevaediff.core.errors import UserError
from spikevaediff.core.wire import Kind, Message, encode
from spikevaediff.services.lanes import LATEST, Publisher, Receiver, WorkDispatcher, WorkFetcher
from spikevaediff.services.transport import (CurveConfig, Endpoint, Network, free_tcp_port,
                                             generate_keypair, ipc_endpoint, is_loopback,
                                             tcp_endpoint)

# A receiver process: connects, prints READY, receives until end of stream (or `stop_at`),
# optionally working `work_s` per message, then prints its sequence numbers, counters, the
# median age of what it took and its peak memory growth as JSON.
PROBE = textwrap.dedent("""
    import json, sys, time
    cfg = json.loads(sys.argv[1])
    time.sleep(cfg.get("delay", 0))
    from spikevaediff.core.wire import Kind
    from spikevaediff.services.lanes import Receiver
    from spikevaediff.services.transport import Endpoint, Network

    def memory_kb(field):
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith(field))

    with Network() as net:
        rx = Receiver(net, Endpoint(cfg["address"]), topics=cfg.get("topics", [""]),
                      lane=cfg.get("lane", "lossless"), name=cfg.get("name"), hwm=cfg.get("hwm"))
        base = memory_kb("VmRSS:")
        print("READY", flush=True)
        seqs, ages_ms, deadline = [], [], time.monotonic() + cfg.get("timeout", 30)
        while time.monotonic() < deadline:
            msg = rx.recv_latest(200) if cfg.get("latest") else rx.recv(200)
            if msg is None:
                continue
            if msg.kind is Kind.END_OF_STREAM:
                break
            seqs.append(msg.seq)
            ages_ms.append((time.time_ns() - msg.wall_ns) / 1e6)  # same host: wall clocks agree
            if cfg.get("stop_at") is not None and msg.seq >= cfg["stop_at"]:
                break
            time.sleep(cfg.get("work_s", 0))
        ages_ms.sort()
        print(json.dumps({"seqs": seqs, "stats": rx.stats.as_dict(),
                          "median_age_ms": ages_ms[len(ages_ms) // 2],
                          "growth_mb": (memory_kb("VmHWM:") - base) / 1024}))
""")


def _start_probe(**cfg) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROBE, json.dumps(cfg)],
                            stdout=subprocess.PIPE, text=True)


def _wait_ready(probe: subprocess.Popen) -> None:
    assert probe.stdout.readline().strip() == "READY"


def _finish(probe: subprocess.Popen, timeout: float = 40) -> dict:
    out, _ = probe.communicate(timeout=timeout)
    assert probe.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def _counts(seq: int, stream: str = "s1", values=None) -> Message:
    values = np.ones(100, dtype=np.float32) if values is None else values
    return Message(Kind.COUNTS, stream, seq=seq, bin_index=seq, arrays={"counts": values})


@pytest.fixture
def net():
    with Network() as network:
        yield network


def _address() -> str:
    return tcp_endpoint(free_tcp_port())


def _bad_messages() -> list[tuple[str, list[bytes]]]:
    good = [bytes(f) for f in encode(_counts(0))]
    header = msgpack.unpackb(good[1], raw=False)

    def with_header(**changes):
        return [good[0], msgpack.packb({**header, **changes}), *good[2:]]

    nan = np.ones(100, dtype=np.float32)
    nan[7] = np.nan
    return [
        ("malformed", [good[0], b"\xc1 not msgpack"]),
        ("malformed", [good[0], b"\x80\x04\x95 pickle-looking"]),
        ("version", with_header(v=99)),
        ("kind", with_header(kind="launch_missiles")),
        ("header_size", with_header(meta={"pad": "x" * 20_000})),
        ("payload_size", [*with_header(arrays=[{"name": "counts", "dtype": "|u1",
                                                "shape": [9_000_000]}])[:2], bytes(9_000_000)]),
        ("nonfinite", [bytes(f) for f in encode(_counts(0, values=nan))]),
        ("dtype", with_header(arrays=[{"name": "counts", "dtype": "|O", "shape": [50]}])),
        ("shape", with_header(arrays=[{"name": "counts", "dtype": "<f4", "shape": [99]}])),
        ("missing_field", [good[0], msgpack.packb({k: v for k, v in header.items() if k != "seq"}),
                           good[2]]),
        ("frames", [b"x"]),
    ]


def test_receiver_process_survives_and_counts_every_bad_message(net):
    """Bad messages between good ones: all dropped and counted by reason; all good ones arrive."""
    address = _address()
    publisher = Publisher(net, Endpoint(address, bind=True))
    probe = _start_probe(address=address, name="probe")
    publisher.wait_for_subscribers(["probe"], timeout_s=30)
    bad = _bad_messages()
    for seq, (_, frames) in enumerate(bad):
        assert publisher.send(_counts(seq))
        publisher.socket.send_multipart(frames)  # raw, as a broken or hostile sender would
    assert publisher.send(_counts(len(bad)))
    publisher.send(Message(Kind.END_OF_STREAM, "s1"))
    report = _finish(probe)
    assert report["seqs"] == list(range(len(bad) + 1))
    assert report["stats"]["bad"] == dict(Counter(reason for reason, _ in bad))
    assert report["stats"]["gaps"] == 0


def test_late_joiner_loses_nothing_after_the_handshake(net):
    address = _address()
    publisher = Publisher(net, Endpoint(address, bind=True))
    for seq in range(100):  # before anyone listens: these are gone, and that is expected
        publisher.send(_counts(seq))
    probe = _start_probe(address=address, name="late", topics=["counts/", "end_of_stream/"], delay=0.5)
    assert publisher.wait_for_subscribers(["late"], timeout_s=30) == {"late"}
    for seq in range(100, 2100):
        assert publisher.send(_counts(seq))
    publisher.send(Message(Kind.END_OF_STREAM, "s1"))
    report = _finish(probe)
    assert report["seqs"] == list(range(100, 2100))
    assert report["stats"]["first_seq"]["counts/s1"] == 100
    assert report["stats"]["gaps"] == 0 and report["stats"]["bad_total"] == 0


def test_wait_for_subscribers_times_out_with_a_clear_message(net):
    publisher = Publisher(net, Endpoint(_address(), bind=True))
    with pytest.raises(UserError, match="decoder"):
        publisher.wait_for_subscribers(["decoder"], timeout_s=0.3)


def test_slow_consumer_on_the_lossless_lane_loses_nothing(net):
    """Tiny queues both sides: the sender is held back instead of dropping."""
    address = _address()
    publisher = Publisher(net, Endpoint(address, bind=True), hwm=5, send_timeout_ms=10_000)
    probe = _start_probe(address=address, name="slow", hwm=5, work_s=0.002)
    publisher.wait_for_subscribers(["slow"], timeout_s=30)
    payload = np.ones(20_000, dtype=np.float32)  # 80 KB: kernel buffers cannot hide the backlog
    for seq in range(300):
        assert publisher.send(_counts(seq, values=payload))
    publisher.send(Message(Kind.END_OF_STREAM, "s1"))
    report = _finish(probe)
    assert report["seqs"] == list(range(300))
    assert publisher.stats.send_timeouts == 0


def test_stalled_consumer_makes_lossless_sends_time_out_and_the_gap_is_counted(net):
    address = "inproc://stalled"
    publisher = Publisher(net, Endpoint(address, bind=True), hwm=4, send_timeout_ms=50)
    receiver = Receiver(net, Endpoint(address), name="stalled", hwm=4)
    publisher.wait_for_subscribers(["stalled"], timeout_s=5)
    results = [publisher.send(_counts(seq)) for seq in range(20)]  # nobody reads meanwhile
    assert not all(results) and publisher.stats.send_timeouts == results.count(False)
    while receiver.recv(100) is not None:
        pass
    assert publisher.send(_counts(20))
    assert receiver.recv(1000).seq == 20
    assert receiver.stats.missing == publisher.stats.send_timeouts
    assert receiver.stats.gaps == 1


def test_gaps_restarts_and_duplicates_are_detected(net):
    address = "inproc://gaps"
    publisher = Publisher(net, Endpoint(address, bind=True))
    receiver = Receiver(net, Endpoint(address), name="rx")
    publisher.wait_for_subscribers(["rx"], timeout_s=5)
    for seq in (0, 1, 2, 5, 6, 6, 0, 1):
        publisher.send(_counts(seq))
    seqs = [receiver.recv(1000).seq for _ in range(8)]
    assert seqs == [0, 1, 2, 5, 6, 6, 0, 1]
    stats = receiver.stats
    assert (stats.gaps, stats.missing, stats.duplicates, stats.restarts) == (1, 2, 1, 1)


def test_latest_lane_under_a_slow_consumer_stays_bounded_and_counts_drops(net):
    address = _address()
    publisher = Publisher(net, Endpoint(address, bind=True), lane=LATEST)
    probe = _start_probe(address=address, lane=LATEST, topics=["preview/"], latest=True,
                         work_s=0.05, stop_at=300)
    _wait_ready(probe)
    time.sleep(0.3)  # a conflating receiver says no hello; let its subscription land
    image = np.zeros((512, 512, 3), dtype=np.uint8)  # 786 KB: 300 of them would be 236 MB
    for seq in range(300):
        image[0, 0, 0] = seq % 256
        assert publisher.send(Message(Kind.PREVIEW, "s1", seq=seq, arrays={"image": image}))
        time.sleep(0.003)
    time.sleep(0.5)
    publisher.send(Message(Kind.PREVIEW, "s1", seq=300, arrays={"image": image}))  # after a pause
    report = _finish(probe)
    stats, seqs = report["stats"], report["seqs"]
    assert seqs[-1] == 300  # the newest message always ends up with the consumer
    assert seqs == sorted(seqs)
    first = stats["first_seq"]["preview/s1"]
    assert len(seqs) + stats["missing"] + stats["superseded"] == 300 - first + 1  # every drop counted
    assert stats["missing"] > 100  # it was far slower than the stream
    assert report["growth_mb"] < 60  # a queue of them would be hundreds of MB
    # Latest, not merely bounded: what it takes was sent moments ago (a queue would hand it
    # messages from before its last 50 ms of work).
    assert report["median_age_ms"] < 25


def test_recorder_style_receiver_gets_every_latest_lane_message_in_order(net):
    address = "inproc://latest-all"
    publisher = Publisher(net, Endpoint(address, bind=True), lane=LATEST, hwm=100)
    recorder = Receiver(net, Endpoint(address), topics=[Kind.REFINED], lane=LATEST,
                        conflate=False, name="recorder", hwm=100)
    publisher.wait_for_subscribers(["recorder"], timeout_s=5)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    for seq in range(50):
        publisher.send(Message(Kind.REFINED, "s1", seq=seq, arrays={"image": image}))
    assert [recorder.recv(1000).seq for _ in range(50)] == list(range(50))


def test_conflating_receiver_refuses_several_topics_or_a_name(net):
    with pytest.raises(UserError):
        Receiver(net, Endpoint("inproc://x"), topics=[Kind.PREVIEW, Kind.REFINED], lane=LATEST)
    with pytest.raises(UserError):
        Receiver(net, Endpoint("inproc://x"), topics=[Kind.PREVIEW], lane=LATEST, name="mon")


def test_work_dispatcher_hands_the_newest_request_to_whoever_asks(net):
    address = "inproc://work"
    dispatcher = WorkDispatcher(net, Endpoint(address, bind=True))
    first, second = WorkFetcher(net, Endpoint(address)), WorkFetcher(net, Endpoint(address))
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    clip = np.ones((257, 4), dtype=np.float32)

    def request(seq):
        return Message(Kind.REFINE_REQUEST, "s1", seq=seq, arrays={"image": image, "clip_vision": clip})

    for seq in range(10):  # nobody is asking: each replaces the last
        dispatcher.offer(request(seq))
    assert dispatcher.stats.superseded == 9
    assert first.fetch(0) is None  # asks
    time.sleep(0.05)
    dispatcher.pump()
    assert first.fetch(1000).seq == 9
    assert first.fetch(0) is None and second.fetch(0) is None
    time.sleep(0.05)
    dispatcher.offer(request(10))
    dispatcher.offer(request(11))
    got = {first.fetch(1000).seq, second.fetch(1000).seq}
    assert got == {10, 11} and dispatcher.stats.superseded == 9


def test_curve_admits_known_clients_and_shuts_out_strangers(tmp_path):
    keys, strangers = tmp_path / "keys", tmp_path / "strangers"
    for identity in ("replay", "decoder"):
        generate_keypair(keys, identity)
    generate_keypair(strangers, "intruder")
    (strangers / "replay.key").write_bytes((keys / "replay.key").read_bytes())
    address = tcp_endpoint(free_tcp_port())
    server = Network(curve=CurveConfig(keys, "replay"))
    client = Network(curve=CurveConfig(keys, "decoder"))
    intruder = Network(curve=CurveConfig(strangers, "intruder"))
    plain = Network()
    try:
        publisher = Publisher(server, Endpoint(address, bind=True))
        receiver = Receiver(client, Endpoint(address, peer="replay"), name="decoder")
        Receiver(intruder, Endpoint(address, peer="replay"), name="intruder")
        Receiver(plain, Endpoint(address), name="plain")
        publisher.wait_for_subscribers(["decoder"], timeout_s=10)
        publisher.send(_counts(0))
        assert receiver.recv(2000).seq == 0
        with pytest.raises(UserError):
            publisher.wait_for_subscribers(["intruder"], timeout_s=1.0)
        assert publisher.subscribers == {"decoder"}
    finally:
        for network in (server, client, intruder, plain):
            network.close(linger_ms=0)


def test_curve_client_needs_to_know_its_peer(tmp_path):
    generate_keypair(tmp_path, "decoder")
    with Network(curve=CurveConfig(tmp_path, "decoder")) as network:
        with pytest.raises(UserError, match="peer"):
            network.socket(zmq.SUB, Endpoint(tcp_endpoint(free_tcp_port())))
        with pytest.raises(UserError, match="not found"):
            network.socket(zmq.SUB, Endpoint(tcp_endpoint(free_tcp_port()), peer="replay"))


def test_plain_traffic_beyond_this_host_is_refused_unless_allowed():
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("ipc:///tmp/x.sock")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://*:5555")
    assert not is_loopback("tcp://10.1.2.3:5555")
    with Network() as network:
        with pytest.raises(UserError, match="CURVE"):
            network.socket(zmq.PUB, Endpoint("tcp://0.0.0.0:5555", bind=True))
    with Network(allow_insecure=True) as network:
        network.socket(zmq.PUB, Endpoint(tcp_endpoint(free_tcp_port(), "0.0.0.0"), bind=True))


def test_endpoint_helpers_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="too long"):
        ipc_endpoint("decoder", tmp_path / ("x" * 120))
    assert ipc_endpoint("decoder", tmp_path).endswith("/decoder.sock")
    assert Endpoint.from_config({"address": "tcp://127.0.0.1:1", "bind": True}).bind
    assert Endpoint.from_config("tcp://127.0.0.1:1") == Endpoint("tcp://127.0.0.1:1")
    with pytest.raises(UserError, match="unknown"):
        Endpoint.from_config({"address": "tcp://127.0.0.1:1", "bnid": True})
    with Network() as network:
        busy = network.socket(zmq.PUB, Endpoint("tcp://127.0.0.1:0", bind=True))
        port = busy.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        with pytest.raises(UserError, match="cannot bind"):
            network.socket(zmq.PUB, Endpoint(f"tcp://127.0.0.1:{port}", bind=True))


def test_bench_transport_command_measures_both_paths(tmp_path):
    from spikevaediff.services.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench-transport", "--iterations", "40", "--warmup", "5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["payloads"]) == {"counts", "preview", "embedding"}
    for name, row in result["payloads"].items():
        assert row["ours_p50_us"] > 0 and row["bare_p50_us"] > 0
        assert row["p50_ratio"] == pytest.approx(row["ours_p50_us"] / row["bare_p50_us"])
        assert result[f"{name}_p99_ratio"] == row["p99_ratio"]
    assert result["payloads"]["embedding"]["bytes"] > 257 * 768 * 4
    assert result["worst_p50_ratio"] == max(r["p50_ratio"] for r in result["payloads"].values())
