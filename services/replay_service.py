"""The replay service: a recorded session streamed as spike counts, paced in real time.

It reads the config's sessions (or the bundle's), selects the bundle's units in order
(`stream_source.StreamSource`), waits until every expected subscriber (`config.subscribers`,
e.g. decoder and recorder) has said hello on the counts lane, then publishes one COUNTS message
(float32 [units x sub-bins]) per presentation of the bundle's movie, from `start_frame` for
`duration` seconds (optionally looping).

Pacing: bin i is due when its counting window has closed, `origin + due_s(i) / speed` on the
monotonic clock, where `origin` is the moment the stream starts. The counts are binned just
before the wait (binning a recorded session is cheap and must not delay the send), then the
message leaves at its due time; `actual - due` is the pacing error, reported as p50/p99/max in
every heartbeat and in the final STATUS. The lane is lossless: a subscriber that falls behind
holds the replay back (seen as pacing error), never loses bins. At the end (or on a stop
signal) it sends END_OF_STREAM.

Run alone: `spikevaediff serve replay --config FILE` or `python -m spikevaediff.services.replay_service`.
"""
from __future__ import annotations

import sys
import time

from spikevaediff.core.errors import UserError
from spikevaediff.core.wire import Kind, Message

from .settings import ServiceConfig

_SLEEP_SLICE_S = 0.05  # longest single sleep: stop signals and heartbeats stay responsive


class Replay:
    """The replay's source, publisher and pacing statistics."""

    def __init__(self, runtime, config: ServiceConfig):
        from spikevaediff.core.bundle import load_bundle

        from .lanes import LOSSLESS, Publisher
        from .service_stats import RecentSamples
        from .transport import Endpoint
        from .stream_source import StreamSource

        self.runtime = runtime
        self.config = config
        if not config.bundle:
            raise UserError("the config names no bundle (its units and movie define the stream)")
        manifest = load_bundle(config.bundle).manifest
        self.source = StreamSource(config.sessions, manifest)
        self.publisher = Publisher(runtime.net, Endpoint(config.endpoints.counts, bind=True), lane=LOSSLESS)
        self.pacing_ms = RecentSamples()
        self.sent = 0
        self.end_reason = "stopped"
        self.started_at: float | None = None
        self.last_due_s = 0.0

    def stats(self) -> dict:
        elapsed = time.monotonic() - self.started_at if self.started_at else 0.0
        return {
            "stream": self.source.stream, "units": self.source.n_units, "values": self.source.n_values,
            "movie": self.source.movie, "speed": self.config.speed,
            "bins_sent": self.sent, "send_timeouts": self.publisher.stats.send_timeouts,
            "pacing_error_ms": self.pacing_ms.summary(),
            "subscribers": sorted(self.publisher.subscribers),
            "elapsed_s": round(elapsed, 3), "stream_s": round(self.last_due_s, 3),
            "end": self.end_reason,
        }

    def wait_for_subscribers(self) -> bool:
        """Wait for every expected subscriber's hello; False if a stop signal came first."""
        names = set(self.config.subscribers)
        if not names:
            return True
        self.runtime.log.info("waiting for subscribers %s", ", ".join(sorted(names)))
        timeout = self.config.subscriber_timeout_s
        deadline = time.monotonic() + timeout
        while not names <= self.publisher.subscribers:
            if not self.runtime.running:
                return False
            if time.monotonic() >= deadline:
                raise UserError(f"waited {timeout:g} s for subscribers {sorted(names)} on "
                                f"{self.config.endpoints.counts}; only {sorted(self.publisher.subscribers)} "
                                "said hello")
            self.publisher.poll_subscriptions(timeout_ms=100)
            self.runtime.heartbeat(self.stats)
        return True

    def _sleep_until(self, deadline: float) -> bool:
        """Sleep until `deadline` (monotonic s); False if a stop signal came first."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if not self.runtime.running:
                return False
            self.runtime.heartbeat(self.stats)
            time.sleep(min(left, _SLEEP_SLICE_S))

    def stream(self) -> None:
        cfg, src = self.config, self.source
        self.started_at = origin = time.monotonic()
        self.end_reason = "stopped"
        for item in src.schedule(cfg.start_frame, cfg.duration, cfg.loop):
            counts = src.counts(item)
            due = origin + item.due_s / cfg.speed
            if not self._sleep_until(due):
                break
            t0, t1 = src.window_times(item)
            msg = Message(Kind.COUNTS, src.stream, seq=item.index, bin_index=item.index,
                          t_start=t0, t_stop=t1, arrays={"counts": counts},
                          meta={"frame": item.frame, "repeat": item.repeat, "movie": src.movie,
                                "loop": item.loop, "valid": item.valid, "units": src.n_units})
            sent_ns = msg.stamp("replay_send")
            self.publisher.send(msg)  # a timeout is counted by the publisher, seen downstream as a gap
            self.pacing_ms.add((sent_ns / 1e9 - due) * 1e3)
            self.sent += 1
            self.last_due_s = item.due_s
            self.runtime.heartbeat(self.stats)
        else:
            self.end_reason = "end"

    def finish(self) -> None:
        eos = Message(Kind.END_OF_STREAM, self.source.stream, seq=0, bin_index=-1,
                      meta={"bins": self.sent, "reason": self.end_reason})
        eos.stamp("replay_send")
        self.publisher.send(eos)


def serve(runtime, replay: Replay) -> None:
    if replay.wait_for_subscribers():
        runtime.log.info("streaming %s (%d units) at speed %g", replay.source.stream,
                         replay.source.n_units, replay.config.speed)
        replay.stream()
    runtime.report("stopping", replay.stats())
    replay.finish()
    pacing = replay.pacing_ms.summary()
    runtime.log.info("sent %d bins; pacing error p50 %s ms, p99 %s ms, max %s ms", replay.sent,
                     pacing.get("p50"), pacing.get("p99"), pacing.get("max"))


def main(config: ServiceConfig, instance: int = 0) -> int:
    """Run the replay until the stream ends or a stop signal; exit code 0, or 2 on a setup problem."""
    from .runtime import run_service

    return run_service("replay", config, instance, lambda runtime: Replay(runtime, config), serve)


if __name__ == "__main__":
    from .service_main import cli

    sys.exit(cli("replay", main))
