"""The replay, decoder and refiner services as real processes on real loopback sockets.

Each test starts services with `python -m spikevaediff.services.<name>_service --config FILE`,
listens to their STATUS reports on a control socket (as the launcher does), and plays the other
parts itself where that makes the fault precise (a test publisher sends malformed counts; a test
dispatcher hands the refiner chosen requests).
"""
from __future__ import annotations

import signal
import time

import msgpack
import numpy as np
import pytest

from service_harness import ServiceRun, make_config
from spikevaediff.core.wire import Kind, Message, encode
from spikevaediff.services.lanes import LATEST, LOSSLESS, Publisher, Receiver, WorkDispatcher
from spikevaediff.services.transport import Endpoint

FRAME_S = 1 / 30


@pytest.fixture
def run_factory(tmp_path):
    runs = []

    def make(config):
        run = ServiceRun(tmp_path, config)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()


def _collect(receivers: dict, into: dict) -> None:
    """Take everything waiting on each receiver (non-blocking)."""
    for name, rx in receivers.items():
        while (msg := rx.recv(timeout_ms=0)) is not None:
            into.setdefault(name, []).append(msg)


def _kind(messages, kind):
    return [m for m in messages if m.kind is kind]


def test_replay_decoder_two_refiners_deliver_every_bin_in_real_time(trained_bundle, run_factory):
    """Happy path, speed 1: every count reaches the decoder and a late-listening recorder, every
    bin gets a preview, two refiners share the refinement, and stamps travel end to end."""
    cfg = make_config(trained_bundle, duration=3.0, n_refiners=2,
                      refiner={"steps": 4, "strength": 0.5})
    run = run_factory(cfg)
    run.start("decoder")
    run.start("refiner", 0)
    run.start("refiner", 1)
    net = run.net
    rx = {"counts": Receiver(net, Endpoint(cfg.endpoints.counts), topics=[Kind.COUNTS, Kind.END_OF_STREAM],
                             lane=LOSSLESS, name="recorder"),
          "preview": Receiver(net, Endpoint(cfg.endpoints.preview), lane=LATEST, conflate=False,
                              topics=[Kind.PREVIEW, Kind.END_OF_STREAM]),
          "refined": Receiver(net, [Endpoint(cfg.refined_address(k)) for k in range(2)], lane=LATEST,
                              conflate=False, topics=[Kind.REFINED])}
    got: dict = {}
    run.wait_ready("decoder")
    run.wait_ready("refiner", "refiner", instance=0)
    run.wait_ready("refiner", "refiner1", instance=1)
    run.start("replay")
    codes = run.wait_exit(timeout_s=90, pump=lambda: _collect(rx, got))
    _collect(rx, got)
    assert codes == {"decoder": 0, "refiner": 0, "refiner1": 0, "replay": 0}, run.tail()

    replay, decoder = run.final("replay"), run.final("decoder")
    n = replay["bins_sent"]
    assert n == pytest.approx(3.0 * 30, abs=2) and replay["end"] == "end"
    # Lossless lane: nothing lost for either subscriber.
    counts = _kind(got["counts"], Kind.COUNTS)
    assert [m.seq for m in counts] == list(range(n))
    assert rx["counts"].stats.gaps == 0 and len(_kind(got["counts"], Kind.END_OF_STREAM)) == 1
    assert decoder["bins_decoded"] == n and decoder["gaps"] == 0 and decoder["joined_at_seq"] == 0
    assert decoder["counts"]["bad_total"] == 0 and decoder["wrong_length"] == 0
    # Real time: the stream took as long as the neural time it covers, and sends were on time.
    sends = np.array([m.stamps["replay_send"] for m in counts]) / 1e9
    neural = counts[-1].t_start - counts[0].t_start
    assert sends[-1] - sends[0] == pytest.approx(neural, rel=0.05, abs=0.03)
    assert replay["pacing_error_ms"]["p50"] < 5 and replay["pacing_error_ms"]["p99"] < 50
    # A preview per bin, carrying the path's stamps.
    previews = _kind(got["preview"], Kind.PREVIEW)
    assert len(previews) >= 0.95 * n and _kind(got["preview"], Kind.END_OF_STREAM)
    first = previews[0]
    assert first.arrays["image"].shape == (64, 64, 3) and first.arrays["image"].dtype == np.uint8
    assert {"replay_send", "decoder_recv", "decoder_preview_send"} <= set(first.stamps)
    assert [m.bin_index for m in previews] == sorted(m.bin_index for m in previews)
    latency = decoder["latency_ms"]
    print(f"decoder latency p50 {latency['p50']} ms, p99 {latency['p99']} ms (2 refiners busy on 2 cores)")
    assert latency["n"] == n and latency["p99"] < 250
    # Both refiners took work; every request is accounted for (taken or replaced, never queued).
    refined = got["refined"]
    assert {m.meta["refiner"] for m in refined} == {0, 1}
    img = refined[0].arrays["image"]
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    assert {"replay_send", "decoder_preview_send", "decoder_request_send", "refiner_recv",
            "refiner_send"} <= set(refined[0].stamps)
    assert refined[0].meta["frame"] == counts[refined[0].bin_index].meta["frame"]
    ref = decoder["refine"]
    refined_total = sum(run.final("refiner", k)["refined"] for k in ("refiner", "refiner1"))
    assert ref["requests"] == ref["handed_out"] and ref["requests"] - 2 <= refined_total <= ref["requests"]
    assert ref["requests"] + ref["superseded"] in (n - 1, n)  # the last candidate may be left over
    assert ref["superseded"] > 0


def test_replay_paces_at_speed_4_and_sends_the_bundles_units(trained_bundle, small_session, run_factory):
    """Speed 4: sends come 4x as often as the recording's frames; counts equal offline binning of
    the bundle's units, in the bundle's order, from the start frame on."""
    from spikevaediff.core.bundle import load_bundle
    from spikevaediff.training.evaluate import bundle_population

    cfg = make_config(trained_bundle, duration=4.0, speed=4.0, start_frame=100, subscribers=["decoder"])
    run = run_factory(cfg)
    rx = Receiver(run.net, Endpoint(cfg.endpoints.counts), topics=[Kind.COUNTS, Kind.END_OF_STREAM],
                  name="decoder")
    got: dict = {}
    run.start("replay")
    codes = run.wait_exit(timeout_s=60, pump=lambda: _collect({"counts": rx}, got))
    _collect({"counts": rx}, got)
    assert codes == {"replay": 0}, run.tail()
    counts = _kind(got["counts"], Kind.COUNTS)
    stats = run.final("replay")
    assert len(counts) == stats["bins_sent"] == pytest.approx(4.0 * 30, abs=2)
    assert counts[0].meta["frame"] == 100 and counts[0].meta["repeat"] == 0
    sends = np.array([m.stamps["replay_send"] for m in counts]) / 1e9
    neural = np.array([m.t_start for m in counts])
    # wall time between sends = neural time between their bins / 4
    assert sends[-1] - sends[0] == pytest.approx((neural[-1] - neural[0]) / 4, rel=0.05, abs=0.02)
    steps = np.diff(sends)
    assert np.median(steps) == pytest.approx(FRAME_S / 4, rel=0.25)
    assert stats["pacing_error_ms"]["p50"] < 5 and stats["pacing_error_ms"]["p99"] < 50
    print(f"speed 4: pacing error p50 {stats['pacing_error_ms']['p50']} ms, "
          f"p99 {stats['pacing_error_ms']['p99']} ms over {len(counts)} bins")

    bundle = load_bundle(trained_bundle)
    pop = bundle_population(bundle, [small_session])
    row = {(int(f), int(r)): i for i, (f, r) in enumerate(zip(pop.frames, pop.repeats))}
    for msg in counts[::17]:
        expected = pop.counts[row[(msg.meta["frame"], msg.meta["repeat"])]]
        np.testing.assert_array_equal(msg.arrays["counts"], expected)


def _raw_counts(stream: str, seq: int, counts: np.ndarray, **header_changes) -> list:
    """Frames of a counts message whose header was edited after encoding (what encode refuses)."""
    msg = Message(Kind.COUNTS, stream, seq=seq, bin_index=seq, arrays={"counts": counts[:1]})
    topic, header = encode(msg)[:2]
    header = msgpack.unpackb(header)
    header["arrays"][0]["shape"] = [len(counts)]
    header.update(header_changes)
    return [topic, msgpack.packb(header), counts.tobytes()]


def test_decoder_drops_bad_counts_and_keeps_decoding(trained_bundle, run_factory):
    """Malformed msgpack, a wrong schema version, an oversized payload, NaN counts and a
    wrong-length vector are each dropped, counted and logged; good bins around them decode."""
    cfg = make_config(trained_bundle, n_refiners=0)
    cfg.decoder_catch_up = False  # this test bursts messages and checks each good bin is decoded
    run = run_factory(cfg)
    pub = Publisher(run.net, Endpoint(cfg.endpoints.counts, bind=True), lane=LOSSLESS)
    previews = Receiver(run.net, Endpoint(cfg.endpoints.preview), lane=LATEST, conflate=False,
                        topics=[Kind.PREVIEW, Kind.STATUS, Kind.END_OF_STREAM])
    run.start("decoder")
    n_values = run.wait_ready("decoder")["stats"]["values_expected"]
    pub.wait_for_subscribers(["decoder"], timeout_s=30)
    time.sleep(0.5)  # the latest lane has no handshake: let our preview subscription reach the decoder
    rng = np.random.default_rng(0)
    seq = iter(range(100))

    def good():
        s = next(seq)
        counts = rng.poisson(1.0, n_values).astype(np.float32)
        pub.send(Message(Kind.COUNTS, "s1", seq=s, bin_index=s, arrays={"counts": counts}))
        return s

    good_bins = [good()]
    sock = pub.socket
    sock.send_multipart([b"counts/s1", b"\xc1 not msgpack"])
    sock.send_multipart(_raw_counts("s1", 50, np.ones(n_values, np.float32), v=2))
    big = np.zeros(9 * 2 ** 20 // 4, np.float32)  # over the 8 MiB payload limit, under ZeroMQ's ceiling
    sock.send_multipart(_raw_counts("s1", 51, big))
    nan = np.full(n_values, np.nan, np.float32)
    pub.send(Message(Kind.COUNTS, "s1", seq=52, bin_index=52, arrays={"counts": nan}))
    good_bins.append(good())
    wrong = next(seq)
    pub.send(Message(Kind.COUNTS, "s1", seq=wrong, bin_index=wrong,
                     arrays={"counts": np.ones(n_values + 3, np.float32)}))
    good_bins += [good(), good()]
    pub.send(Message(Kind.END_OF_STREAM, "s1"))

    got: dict = {}
    codes = run.wait_exit(timeout_s=60, pump=lambda: _collect({"preview": previews}, got))
    _collect({"preview": previews}, got)
    assert codes == {"decoder": 0}, run.tail()
    stats = run.final("decoder")
    assert stats["counts"]["bad"] == {"malformed": 1, "version": 1, "payload_size": 1, "nonfinite": 1}
    assert stats["wrong_length"] == 1 and f"expects {n_values}" in stats["last_error"]
    assert stats["bins_decoded"] == len(good_bins) and stats["counts"]["gaps"] == 0
    assert [m.bin_index for m in _kind(got["preview"], Kind.PREVIEW)] == good_bins
    status = _kind(got["preview"], Kind.STATUS)
    assert len(status) == 1 and status[0].meta["state"] == "error" and status[0].bin_index == wrong
    log = run.logs["decoder"].read_text()
    for reason in ("malformed", "version", "payload_size", "nonfinite"):
        assert f"dropped a bad message ({reason}" in log
    assert "wrong unit layout" in log


def test_decoder_catches_up_on_a_burst_by_decoding_the_newest_bin(trained_bundle, run_factory):
    """Bins that queued up while the decoder was busy are received (lossless lane) but only the
    newest is decoded; the skipped ones are counted, so latency cannot grow with a backlog."""
    cfg = make_config(trained_bundle, n_refiners=0)
    run = run_factory(cfg)
    pub = Publisher(run.net, Endpoint(cfg.endpoints.counts, bind=True), lane=LOSSLESS)
    previews = Receiver(run.net, Endpoint(cfg.endpoints.preview), lane=LATEST, conflate=False,
                        topics=[Kind.PREVIEW, Kind.END_OF_STREAM])
    run.start("decoder")
    n_values = run.wait_ready("decoder")["stats"]["values_expected"]
    pub.wait_for_subscribers(["decoder"], timeout_s=30)
    time.sleep(0.5)
    counts = np.ones(n_values, np.float32)
    for s in range(40):  # far faster than one decode per bin
        pub.send(Message(Kind.COUNTS, "s1", seq=s, bin_index=s, arrays={"counts": counts}))
    pub.send(Message(Kind.END_OF_STREAM, "s1"))
    got: dict = {}
    codes = run.wait_exit(timeout_s=60, pump=lambda: _collect({"preview": previews}, got))
    _collect({"preview": previews}, got)
    assert codes == {"decoder": 0}, run.tail()
    stats = run.final("decoder")
    assert stats["counts"]["received"] >= 40 and stats["counts"]["gaps"] == 0
    assert stats["stale_skipped"] > 0
    assert stats["bins_decoded"] + stats["stale_skipped"] == 40
    decoded = [m.bin_index for m in _kind(got["preview"], Kind.PREVIEW)]
    assert decoded[-1] == 39 and decoded == sorted(decoded)


def test_decoder_killed_and_restarted_mid_stream_resumes_and_reports_the_gap(trained_bundle, run_factory):
    cfg = make_config(trained_bundle, duration=60.0, n_refiners=0, subscribers=["decoder"])
    run = run_factory(cfg)
    first = run.start("decoder", key="decoder_a")
    run.wait_ready("decoder", "decoder_a")
    run.start("replay")
    run.wait_for(lambda: (run.find("decoder", "running", first.pid) or {"stats": {}})["stats"]
                 .get("bins_decoded", 0) >= 15, 60, "the first decoder to decode")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    del run.procs["decoder_a"]  # killed on purpose
    second = run.start("decoder", key="decoder_b")

    def resumed():
        meta = run.find("decoder", "running", second.pid)
        return meta and meta["stats"]["bins_decoded"] >= 15 and meta

    run.wait_for(resumed, 90, "the restarted decoder to decode")
    run.procs["replay"].send_signal(signal.SIGINT)  # stops the stream: end of stream follows
    codes = run.wait_exit(timeout_s=60)
    assert codes == {"replay": 0, "decoder_b": 0}, run.tail()
    replay, decoder = run.final("replay"), run.final("decoder", "decoder_b")
    assert replay["end"] == "stopped" and decoder["end_of_stream"]
    joined = decoder["joined_at_seq"]
    assert joined > 15 and decoder["missed_before_join"] == joined and decoder["gaps"] == 1
    # from its hello on it lost nothing: every later bin decoded
    assert decoder["bins_decoded"] == replay["bins_sent"] - joined
    assert decoder["counts"]["gaps"] == 0


def test_slow_refiner_never_holds_the_decoder_back(trained_bundle, run_factory):
    """A refiner ~50x slower than the bin rate: the decoder still decodes every bin on time,
    at most one request waits, every replaced request is counted."""
    cfg = make_config(trained_bundle, duration=3.0, subscribers=["decoder"],
                      refiner={"steps": 30, "strength": 1.0})
    run = run_factory(cfg)
    run.start("decoder")
    run.start("refiner")
    run.wait_ready("decoder")
    run.wait_ready("refiner")
    run.start("replay")
    codes = run.wait_exit(timeout_s=90)
    assert codes == {"decoder": 0, "refiner": 0, "replay": 0}, run.tail()
    replay, decoder, refiner = run.final("replay"), run.final("decoder"), run.final("refiner")
    n = replay["bins_sent"]
    assert decoder["bins_decoded"] == n and decoder["gaps"] == 0
    assert replay["pacing_error_ms"]["p99"] < 50  # the lossless lane was never held up
    assert refiner["refine_ms"]["p50"] > 10 * 1000 * FRAME_S
    ref = decoder["refine"]
    # the refiner may stop at end of stream with one handed-out request still unread
    assert 1 <= ref["requests"] <= 6 and refiner["requests"] in (ref["requests"], ref["requests"] - 1)
    assert ref["superseded"] >= n - 7 and ref["requests"] + ref["superseded"] in (n - 1, n)
    print(f"slow refiner: {refiner['refine_ms']['p50']:.0f} ms per image; decoder latency p99 "
          f"{decoder['latency_ms']['p99']} ms; {ref['superseded']} of {n} candidates dropped; "
          f"decoder max RSS {decoder['max_rss_mb']} MB")


def test_refiner_skips_unchanged_embeddings_falls_back_to_torch_and_stops_on_end_of_stream(
        trained_bundle, run_factory):
    """Instance 1 publishes on its own endpoint; a repeated request is skipped; an unavailable
    backend falls back to torch with a log line; the decoder's end of stream stops it."""
    cfg = make_config(trained_bundle, n_refiners=2,
                      refiner={"steps": 4, "strength": 0.5, "skip_similarity": 0.99, "backend": "tensorrt"})
    run = run_factory(cfg)
    work = WorkDispatcher(run.net, Endpoint(cfg.endpoints.work, bind=True))
    preview_lane = Publisher(run.net, Endpoint(cfg.endpoints.preview, bind=True), lane=LATEST)
    refined = Receiver(run.net, Endpoint(cfg.refined_address(1)), lane=LATEST, conflate=False,
                       topics=[Kind.REFINED])
    run.start("refiner", 1)
    ready = run.wait_ready("refiner", "refiner1")
    assert ready["stats"]["backend"] == "torch (eager)"
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)

    def request(seq, vision, text):
        msg = Message(Kind.REFINE_REQUEST, "s1", seq=seq, bin_index=10 + seq, t_start=1.0, t_stop=1.05,
                      stamps={"replay_send": 1, "decoder_request_send": 2}, meta={"frame": seq},
                      arrays={"image": image, "clip_vision": vision, "clip_text": text})
        run.wait_for(lambda: work.waiting_workers, 60, "the refiner to ask for work", pump=work.pump)
        work.offer(msg)

    a = (rng.standard_normal((257, 64)).astype(np.float32), rng.standard_normal((77, 64)).astype(np.float32))
    b = (rng.standard_normal((257, 64)).astype(np.float32), rng.standard_normal((77, 64)).astype(np.float32))
    got: dict = {}
    request(0, *a)
    request(1, a[0] * 1.01, a[1])  # same direction: cosine ~1 -> skipped
    request(2, *b)
    run.wait_for(lambda: len(got.get("r", [])) >= 2, 60, "two refined images",
                 pump=lambda: _collect({"r": refined}, got))
    out = got["r"]
    preview_lane.send(Message(Kind.END_OF_STREAM, "s1"))
    codes = run.wait_exit(timeout_s=30)
    assert codes == {"refiner1": 0}, run.tail()
    stats = run.final("refiner", "refiner1")
    assert stats["requests"] == 3 and stats["skipped"] == 1 and stats["refined"] == 2
    assert stats["endpoint"] == cfg.refined_address(1) != cfg.refined_address(0)
    assert [m.bin_index for m in out] == [10, 12] and [m.meta["refiner"] for m in out] == [1, 1]
    assert out[0].stamps["replay_send"] == 1 and out[0].stamps["refiner_send"] >= out[0].stamps["refiner_recv"]
    assert out[0].arrays["image"].shape == (512, 512, 3)
    assert "falling back to the torch backend" in run.logs["refiner1"].read_text()


def test_replay_without_its_subscribers_fails_with_one_line(trained_bundle, run_factory):
    cfg = make_config(trained_bundle, subscriber_timeout_s=1.0)
    run = run_factory(cfg)
    run.start("replay")
    codes = run.wait_exit(timeout_s=60)
    assert codes == {"replay": 2}
    error = run.find("replay", "error")
    assert error is not None and "said hello" in error["error"] and "\n" not in error["error"]
    assert "Traceback" not in run.logs["replay"].read_text()
