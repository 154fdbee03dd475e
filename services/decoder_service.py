"""The decoder service: spike counts in, a 64x64 VDVAE preview out for every bin.

Per COUNTS message (lossless lane, receiver name "decoder"): check its length against the
bundle, project it to VDVAE latents with the bundle's `vdvae` ridge, decode one seeded preview and
publish it (PREVIEW, latest lane: never blocks). Stamps `decoder_recv` and `decoder_preview_send`
are added to the ones the counts carried; their difference is the decoder latency, reported as
p50/p99/max.

Refinement without ever waiting: the newest (preview, counts) is kept as the refine candidate. Only
when a refiner has asked for work (`WorkDispatcher.waiting_workers`) are the CLIP projections
computed (they are wide with the paper's models: project only for the bins a refiner takes) and
the request handed out. A candidate replaced before any refiner was free is counted as
`superseded`.

Bad input never stops it: invalid messages are dropped and counted by the receiver; a counts
vector of the wrong length is counted, logged and answered with a STATUS error on the preview
lane (and in the next report to the launcher). Sequence gaps on the counts lane are counted; a
decoder (re)started mid-stream reports where it joined (`joined_at_seq`, the bins it missed).
On END_OF_STREAM it forwards one on the preview lane (the recorder and refiners stop on it) and
exits.

Run alone: `spikevaediff serve decoder --config FILE` or `python -m spikevaediff.services.decoder_service`.
"""
from __future__ import annotations

import resource
import sys
import time

import numpy as np

from spikevaediff.core.errors import UserError
from spikevaediff.core.wire import Kind, Message

from .settings import ServiceConfig

_LOG_EVERY = 100


PREVIEW_SEND_QUEUE = 64  # 64 x 12 KB previews


class Decoder:
    """The decoder's models, sockets and counters; `step()` handles what arrived."""

    def __init__(self, runtime, config: ServiceConfig):
        from spikevaediff.core.bundle import load_bundle
        import torch

        from spikevaediff.core.config import ModelProfile
        from spikevaediff.core.preview import PreviewDecoder
        from spikevaediff.training.fit import load_stage1

        from .lanes import LATEST, LOSSLESS, Publisher, Receiver, WorkDispatcher
        from .service_stats import RecentSamples
        from .transport import Endpoint

        self.runtime = runtime
        self.config = config
        self.log = runtime.log
        if not config.bundle:
            raise UserError("the config names no bundle to decode with")
        if config.decoder_device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"the decoder is set to run on {config.decoder_device}, "
                            "but torch sees no CUDA device here")
        bundle = load_bundle(config.bundle, device=config.decoder_device)
        m = bundle.manifest
        self.vdvae = bundle.ridge("vdvae")
        self.clip_vision = bundle.ridges.get("clip_vision")
        self.clip_text = bundle.ridges.get("clip_text")
        self.shapes = {k: tuple(int(n) for n in v) for k, v in m.target_shapes.items()}
        self.n_values = self.vdvae.n_features_in_
        profile = ModelProfile(m.profile, config.weights_dir or m.weights_dir, device=config.decoder_device)
        self.stage1, _ = load_stage1(profile, m.models.get("stage1", {}).get("arch", "vdvae"))
        # Same image as stage1.decode_latents(..., seed=preview_seed), its seeded draws recorded
        # once; on a GPU the whole decode is one CUDA graph (launches dominate at batch 1).
        self.preview_decoder = PreviewDecoder(self.stage1, seed=config.preview_seed)
        self.log.info("preview: %s", self.preview_decoder.describe())
        self._preview(np.zeros(self.n_values, np.float32))  # warm-up: first real bin is not slower

        peer = "replay" if config.curve_dir else None
        net = runtime.net
        self.counts = Receiver(net, Endpoint(config.endpoints.counts, peer=peer),
                               topics=[Kind.COUNTS, Kind.END_OF_STREAM], lane=LOSSLESS, name="decoder")
        # A send queue deep enough that a recorder keeping up gets every preview; a conflating
        # monitor still sees only the newest (latest-wins is on its side).
        self.previews = Publisher(net, Endpoint(config.endpoints.preview, bind=True), lane=LATEST,
                                  hwm=PREVIEW_SEND_QUEUE)
        self.work = WorkDispatcher(net, Endpoint(config.endpoints.work, bind=True))
        self.latency_ms = RecentSamples()
        self.preview_seq = 0
        self.status_seq = 0
        self.decoded = 0
        self.wrong_length = 0
        self.last_error = ""
        self.candidate: tuple[Message, np.ndarray] | None = None
        self.refine = {"requests": 0, "superseded": 0}
        self.end_of_stream: Message | None = None
        self.stale_skipped = 0  # bins not decoded because a newer one was already waiting

    # -- per bin ----------------------------------------------------------------------------
    def _preview(self, counts) -> np.ndarray:
        return self.preview_decoder(self.vdvae.project(counts))

    def _reject_length(self, msg: Message, n: int) -> None:
        self.wrong_length += 1
        self.last_error = (f"counts seq {msg.seq} on {msg.stream} has {n} values; the bundle expects "
                           f"{self.n_values} (units x sub-bins): wrong unit layout, dropped")
        if self.wrong_length == 1 or self.wrong_length % _LOG_EVERY == 0:
            self.log.warning("%s (%d so far)", self.last_error, self.wrong_length)
            status = Message(Kind.STATUS, "decoder", seq=self.status_seq, bin_index=msg.bin_index,
                             meta={"state": "error", "message": self.last_error,
                                   "count": self.wrong_length})
            self.status_seq += 1
            self.previews.send(status)
            self.runtime.report("running", self.stats(), error=self.last_error)

    def handle_counts(self, msg: Message) -> None:
        msg.stamp("decoder_recv")
        counts = msg.arrays["counts"]
        if counts.shape[0] != self.n_values:
            self._reject_length(msg, counts.shape[0])
            return
        counts = np.array(counts, dtype=np.float32)  # a writable copy (the received one is a read-only view)
        image = self._preview(counts)
        preview = Message(Kind.PREVIEW, msg.stream, seq=self.preview_seq, bin_index=msg.bin_index,
                          t_start=msg.t_start, t_stop=msg.t_stop, stamps=dict(msg.stamps),
                          meta={**msg.meta, "counts_seq": msg.seq}, arrays={"image": image})
        self.preview_seq += 1
        sent = preview.stamp("decoder_preview_send")
        self.previews.send(preview)
        self.latency_ms.add((sent - msg.stamps["decoder_recv"]) / 1e6)
        self.decoded += 1
        if self.candidate is not None:
            self.refine["superseded"] += 1
        self.candidate = (preview, counts)

    # -- refine requests --------------------------------------------------------------------
    def _project(self, ridge, name: str, counts) -> np.ndarray:
        return ridge.project(counts).cpu().numpy().reshape(self.shapes[name])

    def offer_refine(self) -> None:
        """Hand the newest candidate to a free refiner, projecting to CLIP only now."""
        self.work.pump()
        if self.candidate is None or not self.work.waiting_workers or self.clip_vision is None:
            return
        preview, counts = self.candidate
        self.candidate = None
        arrays = {"image": preview.arrays["image"],
                  "clip_vision": self._project(self.clip_vision, "clip_vision", counts)}
        if self.clip_text is not None:
            arrays["clip_text"] = self._project(self.clip_text, "clip_text", counts)
        request = Message(Kind.REFINE_REQUEST, preview.stream, seq=self.refine["requests"],
                          bin_index=preview.bin_index, t_start=preview.t_start, t_stop=preview.t_stop,
                          stamps=dict(preview.stamps), meta={**preview.meta, "preview_seq": preview.seq},
                          arrays=arrays)
        self.refine["requests"] += 1
        request.stamp("decoder_request_send")
        self.work.offer(request)

    # -- loop -------------------------------------------------------------------------------
    def step(self, timeout_ms: int = 50) -> None:
        msg = self.counts.recv(timeout_ms=timeout_ms)
        newest = None
        while msg is not None:
            if msg.kind is Kind.END_OF_STREAM:
                self.end_of_stream = msg
                break
            if msg.kind is Kind.COUNTS:
                if msg.arrays["counts"].shape[0] != self.n_values:
                    self._reject_length(msg, msg.arrays["counts"].shape[0])
                else:
                    if newest is not None:
                        self.stale_skipped += 1
                    newest = msg
            # Catch up: when bins queued up while we decoded (a busy CPU), decode only the newest.
            # Previews are latest-wins, so a backlog must never turn into growing latency; every
            # bin still arrives and is recorded on the lossless lane, and the skips are counted.
            msg = self.counts.recv(timeout_ms=0) if self.config.decoder_catch_up else None
        if newest is not None:
            self.handle_counts(newest)
        self.offer_refine()

    def forward_end_of_stream(self) -> None:
        source = self.end_of_stream
        eos = Message(Kind.END_OF_STREAM, source.stream if source else "decoder", seq=0,
                      stamps=dict(source.stamps) if source else {},
                      meta={**(source.meta if source else {}), "previews": self.preview_seq})
        eos.stamp("decoder_preview_send")
        self.previews.send(eos)

    def stats(self) -> dict:
        counts = self.counts.stats.as_dict()
        first = next((seq for key, seq in counts["first_seq"].items() if key.startswith("counts/")), None)
        return {
            "bins_decoded": self.decoded, "values_expected": self.n_values,
            "wrong_length": self.wrong_length, "last_error": self.last_error,
            "latency_ms": self.latency_ms.summary(),
            "counts": counts,
            # a decoder (re)started mid-stream: the bins before its hello went to no decoder
            "joined_at_seq": first, "missed_before_join": first or 0,
            "gaps": counts["gaps"] + (1 if first else 0), "missing": counts["missing"] + (first or 0),
            "previews_sent": self.preview_seq, "stale_skipped": self.stale_skipped,
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "refine": {**self.refine, "handed_out": self.work.stats.sent,
                       "dispatcher_superseded": self.work.stats.superseded,
                       "waiting_refiners": self.work.waiting_workers},
            "end_of_stream": self.end_of_stream is not None,
        }


def serve(runtime, decoder: Decoder) -> None:
    log = runtime.log
    log.info("decoding %d values per bin", decoder.n_values)
    while runtime.running and decoder.end_of_stream is None:
        decoder.step()
        runtime.heartbeat(decoder.stats)
    runtime.report("stopping", decoder.stats())
    decoder.forward_end_of_stream()
    stats = decoder.stats()
    log.info("decoded %d bins; latency p50 %s ms, p99 %s ms; gaps %d", decoder.decoded,
             stats["latency_ms"].get("p50"), stats["latency_ms"].get("p99"), stats["gaps"])
    time.sleep(0.1)  # let the end of stream leave before the sockets close


def main(config: ServiceConfig, instance: int = 0) -> int:
    """Decode until END_OF_STREAM or a stop signal; exit code 0, or 2 on a setup problem."""
    from .runtime import run_service

    return run_service("decoder", config, instance, lambda runtime: Decoder(runtime, config), serve)


if __name__ == "__main__":
    from .service_main import cli

    sys.exit(cli("decoder", main))
