"""What every live service shares: thread budget, signals, sockets, and status reports.

A service is a small loop over its sockets. `ServiceRuntime` gives it:
- its CPU budget (torch and BLAS threads from the config, so decoder and refiner do not fight
  over the same cores on a small machine);
- a stop flag set by SIGINT/SIGTERM (the loop checks `runtime.running`; a second signal
  interrupts at once);
- a `Network` (CURVE when the config names a keys folder);
- status reports on the control lane: a PUSH to the launcher's PULL (`endpoints.control`).
  Each report is a STATUS message whose meta is
  `{"service", "instance", "pid", "state", "stats", "error"}`, with state one of
  starting / ready / running / stopping / stopped / error. Sends never block: with no launcher
  listening (a service run alone by `serve`), reports are dropped.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import zmq

from spikevaediff.core.wire import Kind, Message, encode

from .settings import ServiceConfig

STATES = ("starting", "ready", "running", "stopping", "stopped", "error")


def limit_threads(n: int) -> None:
    """Cap torch and BLAS threads of this process at n."""
    n = max(1, int(n))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:  # pragma: no cover
        pass


def pin_to_cpus(cpus, log) -> None:
    """Pin this process to `cpus` (Linux), so the decoder and the refiner never share a core."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    available = os.sched_getaffinity(0)
    wanted = {c for c in cpus if c in available}
    if not wanted:
        log.warning("none of CPUs %s is available (have %s); not pinning", cpus, sorted(available))
        return
    os.sched_setaffinity(0, wanted)


def default_cpu_pinning(n_cpus: int | None = None) -> dict:
    """On a machine with 2+ cores the decoder (the latency-critical preview path) gets core 0 to
    itself; everything else shares the other cores, where the CPU refiners run at a lower priority
    (`refiner.nice`) so the replay's pacing and the recorder come first."""
    if n_cpus is None:
        n_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_cpus < 2:
        return {}
    rest = list(range(1, n_cpus))
    return {"decoder": [0], "refiner": rest, "replay": rest, "recorder": rest}


class ServiceRuntime:
    def __init__(self, name: str, config: ServiceConfig, instance: int = 0):
        from .transport import CurveConfig, Endpoint, Network

        self.name = name
        self.instance = instance
        self.config = config
        self.log = logging.getLogger(f"spikevaediff.{name}" + (f".{instance}" if instance else ""))
        limit_threads(config.threads.get(name, 1))
        pin_to_cpus(config.cpus.get(name), self.log)
        self._signals = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        curve = CurveConfig.from_config({"keys_dir": config.curve_dir, "identity": name}) if config.curve_dir else None
        self.net = Network(curve=curve)
        # With CURVE every connecting socket names the server it trusts: the launcher.
        control = Endpoint(config.endpoints.control, peer="launcher" if config.curve_dir else None)
        self._control = self.net.socket(zmq.PUSH, control,
                                        {zmq.SNDHWM: 100, zmq.LINGER: 500, zmq.IMMEDIATE: 1})
        self._seq = 0
        self._last_heartbeat = 0.0

    # -- stopping ---------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._signals += 1
        if self._signals > 1:
            raise KeyboardInterrupt
        self.log.info("signal %d: stopping", signum)

    @property
    def running(self) -> bool:
        return self._signals == 0

    def request_stop(self) -> None:
        self._signals = max(self._signals, 1)

    # -- status -----------------------------------------------------------------------------
    def report(self, state: str, stats: dict | None = None, error: str = "") -> None:
        """Send one STATUS to the launcher (dropped if nobody listens)."""
        assert state in STATES, state
        msg = Message(kind=Kind.STATUS, stream=self.name, seq=self._seq,
                      meta={"service": self.name, "instance": self.instance, "pid": os.getpid(),
                            "state": state, "stats": stats or {}, "error": error})
        self._seq += 1
        msg.stamp(f"{self.name}_status")
        try:
            self._control.send_multipart(encode(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass

    def heartbeat(self, stats_fn) -> None:
        """A `running` report with fresh stats every `heartbeat_s` (cheap to call every loop)."""
        now = time.monotonic()
        if now - self._last_heartbeat >= self.config.heartbeat_s:
            self._last_heartbeat = now
            self.report("running", stats_fn())

    def close(self) -> None:
        self.net.close()


def run_service(name: str, config: ServiceConfig, instance: int, build, serve) -> int:
    """The lifecycle every service shares; returns the exit code.

    starting -> `build(runtime)` -> ready -> `serve(runtime, service)` (the loop and its orderly
    finish) -> stopped: 0. A UserError reports `error` with its one line: 2. A second signal stops
    at once (the service's `close()`, if it has one, keeps what it wrote): 130.
    """
    from spikevaediff.core.errors import UserError

    runtime = ServiceRuntime(name, config, instance)
    service = None
    try:
        runtime.report("starting")
        service = build(runtime)
        runtime.report("ready", service.stats())
        serve(runtime, service)
        runtime.report("stopped", service.stats())
        return 0
    except UserError as exc:
        runtime.log.error("%s", exc)
        runtime.report("error", service.stats() if service else None, error=str(exc))
        return 2
    except KeyboardInterrupt:  # a second signal: stop at once
        if service is not None:
            getattr(service, "close", lambda: None)()
            runtime.report("stopped", service.stats())
        return 130
    finally:
        runtime.close()
