"""Helpers for the live-service tests: start services as real processes, listen to their STATUS
reports on a real control socket, and collect what they publish."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from spikevaediff.core.wire import decode
from spikevaediff.services.settings import Endpoints, ServiceConfig
from spikevaediff.services.transport import Network, free_tcp_port

LANES = ("counts", "preview", "work", "control", "refined")


def make_config(bundle, **overrides) -> ServiceConfig:
    """A config on fresh loopback tcp ports (refined ports k = base + k stay free too)."""
    ports = {}
    for lane in LANES:
        port = free_tcp_port()
        while port in ports.values() or any(abs(port - p) < 4 for p in ports.values()):
            port = free_tcp_port()
        ports[lane] = port
    endpoints = Endpoints(**{lane: f"tcp://127.0.0.1:{port}" for lane, port in ports.items()})
    cfg = ServiceConfig(bundle=str(bundle), endpoints=endpoints, heartbeat_s=0.25,
                        subscriber_timeout_s=60.0)
    refiner = overrides.pop("refiner", {})
    for key, value in overrides.items():
        setattr(cfg, key, value)
    for key, value in refiner.items():
        setattr(cfg.refiner, key, value)
    return cfg.validate()


class ServiceRun:
    """Processes started with `python -m spikevaediff.services.<name>_service`, and the
    launcher's side of the control lane (a PULL bound where the services report)."""

    def __init__(self, tmp_path: Path, config: ServiceConfig):
        self.tmp = Path(tmp_path)
        self.config = config
        self.net = Network()
        self.control = self.net.context.socket(zmq.PULL)
        self.control.bind(config.endpoints.control)
        self.reports: list[dict] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._configs = 0

    def write_config(self, config: ServiceConfig | None = None) -> Path:
        self._configs += 1
        path = self.tmp / f"config{self._configs}.json"
        (config or self.config).save(path)
        return path

    def start(self, service: str, instance: int = 0, config: ServiceConfig | None = None,
              key: str | None = None) -> subprocess.Popen:
        key = key or (f"{service}{instance}" if instance else service)
        path = self.write_config(config)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        log = self.tmp / f"{key}.log"
        proc = subprocess.Popen([sys.executable, "-m", f"spikevaediff.services.{service}_service",
                                 "--config", str(path), "--instance", str(instance)],
                                env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.procs[key] = proc
        self.logs[key] = log
        return proc

    def poll_reports(self, timeout_ms: int = 0) -> None:
        while self.control.poll(timeout_ms):
            timeout_ms = 0
            self.reports.append(decode(self.control.recv_multipart()).meta)

    def find(self, service: str, state: str, pid: int | None = None, instance: int | None = None):
        for meta in reversed(self.reports):
            if (meta["service"] == service and meta["state"] == state
                    and (pid is None or meta["pid"] == pid)
                    and (instance is None or meta["instance"] == instance)):
                return meta
        return None

    def wait_for(self, predicate, timeout_s: float, what: str, pump=None):
        """Poll reports (and `pump()`, if given) until `predicate()` is truthy; fail after timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll_reports(20)
            if pump is not None:
                pump()
            value = predicate()
            if value:
                return value
            dead = {k: p.returncode for k, p in self.procs.items() if p.poll() not in (None, 0)}
            if dead:
                raise AssertionError(f"while waiting for {what}: {dead} exited early\n{self.tail()}")
        raise AssertionError(f"timed out waiting for {what}\n{self.tail()}")

    def wait_ready(self, service: str, proc_key: str | None = None, instance: int | None = None,
                   timeout_s: float = 120.0) -> dict:
        pid = self.procs[proc_key or service].pid
        return self.wait_for(lambda: self.find(service, "ready", pid, instance), timeout_s, f"{service} ready")

    def wait_exit(self, timeout_s: float = 60.0, pump=None) -> dict[str, int]:
        self.wait_for(lambda: all(p.poll() is not None for p in self.procs.values()), timeout_s,
                      "every service to exit", pump)
        self.poll_reports(200)
        return {k: p.returncode for k, p in self.procs.items()}

    def final(self, service: str, proc_key: str | None = None) -> dict:
        meta = self.find(service, "stopped", self.procs[proc_key or service].pid)
        assert meta is not None, f"no final report from {service}\n{self.tail()}"
        return meta["stats"]

    def tail(self, lines: int = 15) -> str:
        out = []
        for key, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {key} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.net.close(linger_ms=0)
