"""Transport overhead: our encode/send/recv/decode against a bare pyzmq echo of the same bytes.

Two real processes on loopback. The echo process serves both paths at once:
- ours: `lanes.Publisher` -> `lanes.Receiver` (validating decode) -> stamp -> re-encode -> back;
- bare: plain PUB/SUB sockets forwarding the very frames our encoder produced, no parsing.
Blocks of round trips alternate between the two, so machine noise hits both alike; the
result is a ratio (ours / bare, in time: below 1 would be faster) per payload, at p50 and p99.
A round trip is two hops, so the round-trip ratio is also the per-hop ratio.
"""
from __future__ import annotations

import multiprocessing
import platform
import tempfile
import time

import numpy as np
import zmq

from spikevaediff.core.errors import UserError
from spikevaediff.core.wire import DECODE_PATH, Kind, Message, decode, encode

from .lanes import LOSSLESS, Publisher, Receiver
from .transport import Endpoint, Network, free_tcp_port, ipc_endpoint, tcp_endpoint


def representative_payloads(seed: int = 0) -> dict[str, Message]:
    """A counts vector of 500 units, a 64x64 RGB preview, a 257x768 CLIP-Vision embedding."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return {
        "counts": Message(Kind.COUNTS, "bench", arrays={
            "counts": rng.poisson(2.0, 500).astype(np.float32)}),
        "preview": Message(Kind.PREVIEW, "bench", arrays={"image": image}),
        "embedding": Message(Kind.REFINE_REQUEST, "bench", arrays={
            "image": image, "clip_vision": rng.standard_normal((257, 768)).astype(np.float32)}),
    }


def _endpoints(transport: str) -> dict[str, str]:
    names = ("ours_req", "ours_rep", "bare_req", "bare_rep")
    if transport == "tcp":
        return {name: tcp_endpoint(free_tcp_port()) for name in names}
    if transport == "ipc":
        folder = tempfile.mkdtemp(prefix="svd-bench-")
        return {name: ipc_endpoint(name, folder) for name in names}
    raise UserError(f"unknown transport '{transport}' (choose tcp or ipc)")


def _echo_main(addresses: dict[str, str]) -> None:
    """The echo process: answer every message on both paths until told to stop."""
    with Network() as net:
        ours_in = Receiver(net, Endpoint(addresses["ours_req"]), name="echo")
        ours_out = Publisher(net, Endpoint(addresses["ours_rep"], bind=True))
        bare_in = net.context.socket(zmq.SUB)
        bare_in.connect(addresses["bare_req"])
        bare_in.setsockopt(zmq.SUBSCRIBE, b"")
        bare_out = net.context.socket(zmq.PUB)
        bare_out.bind(addresses["bare_rep"])
        ours_out.wait_for_subscribers(["client"], timeout_s=30)
        poller = zmq.Poller()
        poller.register(ours_in.socket, zmq.POLLIN)
        poller.register(bare_in, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(30_000))
            if not ready:
                return  # the client is gone
            if bare_in in ready:
                frames = bare_in.recv_multipart()
                bare_out.send_multipart(frames)
            if ours_in.socket in ready:
                msg = ours_in.recv(0)
                if msg is None:
                    continue
                if msg.kind is Kind.END_OF_STREAM:
                    return
                msg.stamp("echo")
                ours_out.send(msg)


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    us = np.asarray(samples_ns, dtype=np.float64) / 1000
    return float(np.percentile(us, 50)), float(np.percentile(us, 99))


def _in_process_costs(msg: Message, repeats: int = 200) -> tuple[float, float]:
    """Median encode and decode times (us) of `msg`, no sockets."""
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        frames = encode(msg)
        t1 = time.perf_counter_ns()
        decode(frames)
        t2 = time.perf_counter_ns()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    return float(np.median(enc)) / 1000, float(np.median(dec)) / 1000


def bench_transport(transport: str = "tcp", iterations: int = 1000, warmup: int = 100,
                    block: int = 50, timeout_s: float = 10.0) -> dict:
    """Round-trip latency of ours vs bare pyzmq per payload; keys `*_ratio` are ours / bare."""
    addresses = _endpoints(transport)
    payloads = representative_payloads()
    net = Network()
    ours_out = Publisher(net, Endpoint(addresses["ours_req"], bind=True), lane=LOSSLESS)
    ours_in = Receiver(net, Endpoint(addresses["ours_rep"]), name="client")
    bare_out = net.context.socket(zmq.PUB)
    bare_out.bind(addresses["bare_req"])
    bare_in = net.context.socket(zmq.SUB)
    bare_in.connect(addresses["bare_rep"])
    bare_in.setsockopt(zmq.SUBSCRIBE, b"")
    bare_in.rcvtimeo = int(timeout_s * 1000)

    echo = multiprocessing.get_context("spawn").Process(target=_echo_main, args=(addresses,), daemon=True)
    echo.start()
    try:
        ours_out.wait_for_subscribers(["echo"], timeout_s=30)
        _wait_bare_path(bare_out, bare_in, timeout_s=30)
        seq = 0

        def ours_round_trip(msg: Message) -> int:
            nonlocal seq
            t0 = time.perf_counter_ns()
            out = Message(msg.kind, msg.stream, seq=seq, arrays=msg.arrays)
            out.stamp("send")
            ours_out.send(out)
            reply = ours_in.recv(int(timeout_s * 1000))
            t1 = time.perf_counter_ns()
            if reply is None or reply.seq != seq:
                raise UserError("the echo process stopped answering")
            seq += 1
            return t1 - t0

        def bare_round_trip(frames: list) -> int:
            t0 = time.perf_counter_ns()
            bare_out.send_multipart(frames)
            bare_in.recv_multipart()
            return time.perf_counter_ns() - t0

        # Both processes load the wire module alike (SPIKEVAEDIFF_PURE_PYTHON_WIRE=1 forces Python).
        result = {"transport": transport, "iterations": iterations, "warmup": warmup, "wire_path": DECODE_PATH,
                  "python": platform.python_version(), "pyzmq": zmq.__version__,
                  "libzmq": zmq.zmq_version(), "payloads": {}}
        for name, msg in payloads.items():
            frames = [bytes(f) for f in encode(msg)]
            for _ in range(warmup):
                ours_round_trip(msg)
                bare_round_trip(frames)
            ours, bare = [], []
            while len(ours) < iterations:
                n = min(block, iterations - len(ours))
                ours.extend(ours_round_trip(msg) for _ in range(n))
                bare.extend(bare_round_trip(frames) for _ in range(n))
            ours_p50, ours_p99 = _percentiles(ours)
            bare_p50, bare_p99 = _percentiles(bare)
            encode_us, decode_us = _in_process_costs(msg)
            row = {"bytes": sum(len(f) for f in frames), "ours_p50_us": ours_p50, "ours_p99_us": ours_p99,
                   "bare_p50_us": bare_p50, "bare_p99_us": bare_p99, "encode_us": encode_us,
                   "decode_us": decode_us, "p50_ratio": ours_p50 / bare_p50, "p99_ratio": ours_p99 / bare_p99}
            result["payloads"][name] = row
            result[f"{name}_p50_ratio"] = row["p50_ratio"]
            result[f"{name}_p99_ratio"] = row["p99_ratio"]
        result["worst_p50_ratio"] = max(r["p50_ratio"] for r in result["payloads"].values())
        result["worst_p99_ratio"] = max(r["p99_ratio"] for r in result["payloads"].values())
        ours_out.send(Message(Kind.END_OF_STREAM, "bench", seq=seq))
        echo.join(timeout=10)
        return result
    finally:
        if echo.is_alive():
            echo.terminate()
            echo.join(timeout=5)
        net.close(linger_ms=0)


def _wait_bare_path(out: zmq.Socket, inbound: zmq.Socket, timeout_s: float) -> None:
    """Ping the bare path until the echo answers (PUB/SUB loses messages until both ends are joined)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out.send(b"ping")
        if inbound.poll(100, zmq.POLLIN):
            while inbound.poll(50, zmq.POLLIN):  # drain late answers to earlier pings
                inbound.recv_multipart()
            return
    raise UserError("the bare echo path never answered")


def format_table(result: dict) -> str:
    """The result as a small text table (times in microseconds, round trip)."""
    path = {"c": "C accelerator", "python": "pure Python"}.get(result.get("wire_path"), "?")
    lines = [f"transport {result['transport']}, {result['iterations']} round trips per payload "
             f"(pyzmq {result['pyzmq']}, libzmq {result['libzmq']}); wire decode: {path}",
             f"{'payload':<10} {'bytes':>8} {'ours p50':>9} {'bare p50':>9} {'ratio':>6} "
             f"{'ours p99':>9} {'bare p99':>9} {'ratio':>6} {'enc':>6} {'dec':>6}"]
    for name, r in result["payloads"].items():
        lines.append(f"{name:<10} {r['bytes']:>8} {r['ours_p50_us']:>9.1f} {r['bare_p50_us']:>9.1f} "
                     f"{r['p50_ratio']:>6.2f} {r['ours_p99_us']:>9.1f} {r['bare_p99_us']:>9.1f} "
                     f"{r['p99_ratio']:>6.2f} {r['encode_us']:>6.1f} {r['decode_us']:>6.1f}")
    lines.append(f"worst ratio: p50 {result['worst_p50_ratio']:.2f}, p99 {result['worst_p99_ratio']:.2f} "
                 "(ours / bare pyzmq echo; enc/dec: in-process us)")
    return "\n".join(lines)
