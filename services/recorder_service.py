"""The recorder service: every preview and refined image of a run, with its stamps, into one HDF5 file.

It listens to three lanes:
- counts (lossless, name "recorder"): the replay's bins, for throughput, counts-lane gaps and the
  transport hop; the replay waits for this receiver's hello before its first bin;
- preview (latest lane, conflate off so it gets every message): the decoder's previews and its
  end-of-stream;
- refined (latest lane, conflate off): every refiner instance's refined images.

Each message gets a `recorder_recv` stamp and is appended to `RUN_DIR/recording.h5`
(`recording.RecordingWriter`, flushed per message). It stops on the decoder's end-of-stream after
a short drain for late refined images, on a stop signal, or when the replay's end-of-stream is
followed by a long silence on the preview lane (the decoder died). Bad messages are counted by
the receivers, never fatal. The final STATUS carries its stats.

Run alone: `spikevaediff serve recorder --config FILE` (or `python -m` this module).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import zmq

from spikevaediff.core.wire import Kind, Message

from .settings import ServiceConfig, instance_address

RECORDING_NAME = "recording.h5"
REFINED_DRAIN_S = 2.0      # after the decoder's end-of-stream: wait this long for late refined images
ORPHAN_EOS_SILENCE_S = 5.0  # after the replay's end-of-stream: give up on the decoder after this silence
_BURST = 64                # messages taken from one socket before looking at the others


def refined_addresses(config: ServiceConfig) -> list[str]:
    """Where each refiner instance publishes its refined images."""
    return [instance_address(config.endpoints.refined, k) for k in range(config.n_refiners)]


class Recorder:
    """The recorder's sockets, file and stop logic (one `step` per poll)."""

    def __init__(self, runtime, config: ServiceConfig, path: Path | None = None):
        from .lanes import LATEST, LOSSLESS, Receiver
        from .recording import RecordingWriter
        from .transport import Endpoint

        self.runtime = runtime
        self.log = runtime.log
        self.path = Path(path) if path else Path(config.out) / RECORDING_NAME
        self.writer = RecordingWriter(self.path, json.dumps(asdict(config), sort_keys=True))
        peer = {"replay": "replay", "decoder": "decoder", "refiner": "refiner"} if config.curve_dir else {}
        net = runtime.net
        self.counts = Receiver(net, Endpoint(config.endpoints.counts, peer=peer.get("replay")),
                               topics=[Kind.COUNTS, Kind.END_OF_STREAM], lane=LOSSLESS, name="recorder")
        self.preview = Receiver(net, Endpoint(config.endpoints.preview, peer=peer.get("decoder")),
                                topics=[Kind.PREVIEW, Kind.END_OF_STREAM], lane=LATEST,
                                conflate=False, name="recorder")
        self.receivers = {"counts": self.counts, "preview": self.preview}
        refined = refined_addresses(config)
        if refined:
            self.refined = Receiver(net, [Endpoint(a, peer=peer.get("refiner")) for a in refined],
                                    topics=[Kind.REFINED], lane=LATEST, conflate=False,
                                    name="recorder")
            self.receivers["refined"] = self.refined
        self.poller = zmq.Poller()
        for rx in self.receivers.values():
            self.poller.register(rx.socket, zmq.POLLIN)
        self.written = {"counts": 0, "preview": 0, "refined": 0}
        self.write_errors = 0
        self.counts_eos_at: float | None = None
        self.decoder_eos_at: float | None = None
        self.last_preview_at = time.monotonic()
        self.started = time.monotonic()

    # -- messages ---------------------------------------------------------------------------
    def handle(self, lane: str, msg: Message) -> None:
        msg.stamp("recorder_recv")
        if msg.kind is Kind.END_OF_STREAM:
            now = time.monotonic()
            if lane == "counts" and self.counts_eos_at is None:
                self.counts_eos_at = now
                self.log.info("replay's end of stream (seq %d)", msg.seq)
            elif lane == "preview" and self.decoder_eos_at is None:
                self.decoder_eos_at = now
                self.log.info("decoder's end of stream: draining refined images for %.1f s", REFINED_DRAIN_S)
            return
        if lane == "preview":
            self.last_preview_at = time.monotonic()
        try:
            if self.writer.write(msg):
                self.written[lane] += 1
        except (OSError, ValueError, RuntimeError) as exc:  # disk full, h5py trouble: count, go on
            self.write_errors += 1
            if self.write_errors == 1 or self.write_errors % 100 == 0:
                self.log.error("could not write a %s message (%d so far): %s", lane, self.write_errors, exc)

    def step(self, timeout_ms: int = 100) -> None:
        """Wait up to `timeout_ms` for traffic, then take what arrived on every lane."""
        events = dict(self.poller.poll(timeout_ms))
        for lane, rx in self.receivers.items():
            if rx.socket not in events:
                continue
            for _ in range(_BURST):
                msg = rx.recv(timeout_ms=0)
                if msg is None:
                    break
                self.handle(lane, msg)

    def finished(self) -> bool:
        now = time.monotonic()
        if self.decoder_eos_at is not None:
            return now - self.decoder_eos_at >= REFINED_DRAIN_S
        if self.counts_eos_at is not None:
            quiet_since = max(self.counts_eos_at, self.last_preview_at)
            if now - quiet_since >= ORPHAN_EOS_SILENCE_S:
                self.log.warning("no end of stream from the decoder %.0f s after the replay's; stopping",
                                 ORPHAN_EOS_SILENCE_S)
                return True
        return False

    # -- stats ------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "recording": str(self.path),
            "written": dict(self.written),
            "write_errors": self.write_errors,
            # flat: STATUS meta allows 4 levels of nesting (core.wire.Limits.max_meta_depth)
            **{f"{lane}_lane": rx.stats.as_dict() for lane, rx in self.receivers.items()},
            "eos_replay": self.counts_eos_at is not None,
            "eos_decoder": self.decoder_eos_at is not None,
            "elapsed_s": round(time.monotonic() - self.started, 3),
        }

    def close(self) -> None:
        try:
            self.writer.set_stats(self.stats())
        finally:
            self.writer.close()


def serve(runtime, recorder: Recorder) -> None:
    runtime.log.info("recording to %s", recorder.path)
    while runtime.running and not recorder.finished():
        recorder.step()
        runtime.heartbeat(recorder.stats)
    runtime.report("stopping", recorder.stats())
    recorder.close()


def main(config: ServiceConfig, instance: int = 0) -> int:
    """Run the recorder until end of stream or a stop signal; the exit code (0 ok, 2 bad setup)."""
    from .runtime import run_service

    return run_service("recorder", config, instance, lambda runtime: Recorder(runtime, config), serve)


if __name__ == "__main__":
    from .service_main import cli

    sys.exit(cli("recorder", main))
