"""The refiner service: the newest refine request in, a 512x512 Versatile Diffusion image out.

Each instance asks the decoder's `WorkDispatcher` for work (`WorkFetcher`: one request in flight,
always the newest), refines the preview image-to-image with the reduced-step settings of
`config.refiner` (steps, strength, scheduler, guidance, text share, backend), and publishes
REFINED on its own latest-lane endpoint (`config.refined_address(instance)`), carrying the
request's stamps plus `refiner_recv` and `refiner_send`. Several instances share the work: the
decoder hands each request to whichever is free.

Optional skip: with `refiner.skip_similarity` > 0, a request whose predicted embeddings
(CLIP-Vision and CLIP-Text together) have cosine similarity >= that to the last refined one is
not refined again (counted as skipped): the picture would barely change.

Backends: `onnx` / `tensorrt` (with `backend_path`) when asked; if that engine cannot run here
(UserError), the refiner says so in one log line and falls back to `torch`.

It stops on the decoder's END_OF_STREAM (watched on the preview lane) or a stop signal.

Run alone: `spikevaediff serve refiner --config FILE [--instance K]` or
`python -m spikevaediff.services.refiner_service`.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from spikevaediff.core.errors import MissingWeightsError, UserError
from spikevaediff.core.wire import Kind, Message

from .settings import ServiceConfig


def embedding_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened embedding sets (0 when either is all zeros)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        return 0.0
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else 0.0


def build_refiner(profile, settings, log):
    """A core.refiner.Refiner from the config's refiner settings; falls back to torch (with a log
    line) when the requested backend cannot run here."""
    from spikevaediff.core.refiner import Refiner
    from spikevaediff.core.vd_loader import load_versatile_diffusion

    import torch

    profile.require("versatile_diffusion")
    on_cuda = settings.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise UserError(f"the refiner is set to run on {settings.device}, but torch sees no CUDA device here")
    dtype = torch.float16 if on_cuda and settings.precision == "float16" else torch.float32
    components = load_versatile_diffusion(profile.path("versatile_diffusion"), device=settings.device, dtype=dtype)
    common = dict(scheduler=settings.scheduler, steps=settings.steps, strength=settings.strength,
                  guidance_scale=settings.guidance_scale, text_share=settings.text_share,
                  device=settings.device)
    options = {"path": settings.backend_path} if settings.backend_path else {}
    if settings.backend == "torch" and settings.compile:
        options = {"compile": settings.compile}
    try:
        return Refiner.from_components(components, backend=settings.backend, backend_options=options, **common)
    except MissingWeightsError:
        raise
    except UserError as exc:
        if settings.backend == "torch":
            raise
        log.warning("the %s backend cannot run here (%s); falling back to the torch backend",
                    settings.backend, exc)
        return Refiner.from_components(components, backend="torch", **common)


class RefinerWorker:
    """One refiner instance: its model, sockets and counters; `step()` does one unit of work."""

    def __init__(self, runtime, config: ServiceConfig, instance: int = 0):
        from spikevaediff.core.bundle import load_bundle
        from spikevaediff.core.config import ModelProfile
        from spikevaediff.training.fit import ensure_offline_models

        from .lanes import LATEST, Publisher, Receiver, WorkFetcher
        from .service_stats import RecentSamples
        from .transport import Endpoint

        self.runtime = runtime
        self.config = config
        self.instance = instance
        self.settings = config.refiner
        if not config.bundle:
            raise UserError("the config names no bundle (its profile and weights pick the refiner's models)")
        m = load_bundle(config.bundle).manifest
        profile = ModelProfile(m.profile, config.weights_dir or m.weights_dir, device=self.settings.device)
        ensure_offline_models(profile, ("versatile_diffusion",))
        self.refiner = build_refiner(profile, self.settings, runtime.log)
        uncond_vision, self.uncond_text = self.refiner.unconditional()  # text: for bundles without a text ridge
        # Warm-up before saying ready: one whole refine, so torch.compile / CUDA-graph capture and
        # first allocations happen now (40 s on a GPU with compile), not on the first request.
        start = time.perf_counter()
        self.refiner.refine(np.full((64, 64, 3), 128, np.uint8), uncond_vision, self.uncond_text,
                            seed=self.settings.seed)
        runtime.log.info("warm-up refine took %.1f s", time.perf_counter() - start)

        peer = "decoder" if config.curve_dir else None
        net = runtime.net
        self.work = WorkFetcher(net, Endpoint(config.endpoints.work, peer=peer))
        self.stop_watch = Receiver(net, Endpoint(config.endpoints.preview, peer=peer),
                                   topics=[Kind.END_OF_STREAM], lane=LATEST, conflate=False)
        self.address = config.refined_address(instance)
        self.publisher = Publisher(net, Endpoint(self.address, bind=True), lane=LATEST, hwm=8)  # 8 x 786 KB
        self.stream = f"refiner-{instance}"
        self.refine_ms = RecentSamples()
        self.counters = {"requests": 0, "refined": 0, "skipped": 0, "unexpected": 0}
        self.last_embedding: np.ndarray | None = None
        self.finished = False

    def _embedding(self, request: Message) -> np.ndarray:
        parts = [request.arrays["clip_vision"].ravel()]
        if "clip_text" in request.arrays:
            parts.append(request.arrays["clip_text"].ravel())
        return np.concatenate(parts)

    def handle(self, request: Message) -> None:
        recv_ns = request.stamp("refiner_recv")
        self.counters["requests"] += 1
        embedding = self._embedding(request)
        threshold = self.settings.skip_similarity
        if (threshold > 0 and self.last_embedding is not None
                and embedding_similarity(embedding, self.last_embedding) >= threshold):
            self.counters["skipped"] += 1
            return
        text = request.arrays.get("clip_text", self.uncond_text)
        image = self.refiner.refine(request.arrays["image"], request.arrays["clip_vision"], text,
                                    seed=self.settings.seed)
        self.last_embedding = embedding
        out = Message(Kind.REFINED, self.stream, seq=self.counters["refined"], bin_index=request.bin_index,
                      t_start=request.t_start, t_stop=request.t_stop, stamps=dict(request.stamps),
                      meta={**request.meta, "refiner": self.instance, "request_seq": request.seq},
                      arrays={"image": image})
        sent_ns = out.stamp("refiner_send")
        self.publisher.send(out)
        self.counters["refined"] += 1
        self.refine_ms.add((sent_ns - recv_ns) / 1e6)

    def step(self, timeout_ms: int = 200) -> None:
        if self.stop_watch.recv(timeout_ms=0) is not None:
            self.finished = True
            return
        request = self.work.fetch(timeout_ms=timeout_ms)
        if request is None:
            return
        if request.kind is Kind.END_OF_STREAM:
            self.finished = True
        elif request.kind is Kind.REFINE_REQUEST:
            self.handle(request)
        else:
            self.counters["unexpected"] += 1

    def stats(self) -> dict:
        return {**self.counters, "refine_ms": self.refine_ms.summary(), "endpoint": self.address,
                "backend": self.refiner.backend.describe(), "steps": self.settings.steps,
                "strength": self.settings.strength, "scheduler": self.settings.scheduler,
                "unet_calls": self.refiner.unet_evaluations(),
                "work": self.work.stats.as_dict(), "refined_sent": self.publisher.stats.sent,
                "end_of_stream": self.finished}


def serve(runtime, worker: RefinerWorker) -> None:
    log = runtime.log
    log.info("refiner %d ready on %s (%s, %d UNet evaluations per image)", worker.instance, worker.address,
             worker.refiner.backend.describe(), worker.refiner.unet_evaluations())
    while runtime.running and not worker.finished:
        worker.step()
        runtime.heartbeat(worker.stats)
    runtime.report("stopping", worker.stats())
    time.sleep(0.05)  # let the last refined image leave before the sockets close
    log.info("refined %d, skipped %d of %d requests", worker.counters["refined"],
             worker.counters["skipped"], worker.counters["requests"])


def main(config: ServiceConfig, instance: int = 0) -> int:
    """Refine until the decoder's end of stream or a stop signal; exit code 0, or 2 on a setup problem."""
    from .runtime import run_service

    if config.refiner.nice and config.refiner.device == "cpu":
        # Best effort: on a shared CPU the preview path is the latency-critical one, so the
        # refiner yields the cores to the decoder whenever both want them.
        os.nice(config.refiner.nice)
    return run_service("refiner", config, instance,
                       lambda runtime: RefinerWorker(runtime, config, instance), serve)


if __name__ == "__main__":
    from .service_main import cli

    sys.exit(cli("refiner", main))
