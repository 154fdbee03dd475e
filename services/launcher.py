"""`spikevaediff run`: the four live services as separate processes on loopback, started, watched
and stopped together.

1. `run_config.build_run_config` makes RUN_DIR/config.json: one ServiceConfig with free loopback ports (or
   ipc sockets inside RUN_DIR) for every lane.
2. The launcher binds the control PULL, then starts `python -m spikevaediff.services.cli serve NAME
   --config F --instance K` for the recorder, the decoder and the refiners, waits until each
   reports `ready`, then starts the replay (which waits for its subscribers' hello) and waits for it.
3. It streams until the recorder exits (it stops on the decoder's end of stream), the deadline
   passes, a service fails, or the user presses Ctrl-C; then stops the rest: SIGINT, wait, SIGTERM,
   wait, SIGKILL. Every child runs in its own process group (the launcher forwards signals, so a
   terminal's Ctrl-C reaches each service once) and dies with the launcher if it is killed.
4. It keeps each service's last STATUS (final stats) for the run report (`run_report`).

Each child's output goes to RUN_DIR/logs/<service>[-k].log.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from spikevaediff.core.errors import UserError
from spikevaediff.core.wire import Kind, WireError, decode

from .settings import ServiceConfig

log = logging.getLogger("spikevaediff.launcher")

START_ORDER = ("recorder", "decoder", "refiner")  # then the replay, which waits for subscribers
STOP_STEPS = ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
CLEAN_EXIT_S = 15.0  # after the recorder finished: time the others get to exit on their own


# ---------------------------------------------------------------------------- processes
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the launcher dies (no orphans even on SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class ServiceProcess:
    """One child service: its command, process, log file and last reported state."""

    name: str
    instance: int
    popen: subprocess.Popen | None = None
    log_path: Path | None = None
    state: str = "starting"
    stats: dict = field(default_factory=dict)
    error: str = ""
    pid: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.name != "refiner" else f"refiner-{self.instance}"

    def start(self, config_path: Path, log_dir: Path, threads: int) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.label}.log"
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(max(1, threads))
        env.setdefault("PYTHONUNBUFFERED", "1")
        command = [sys.executable, "-m", "spikevaediff.services.cli", "serve", self.name,
                   "--config", str(config_path), "--instance", str(self.instance)]
        with open(self.log_path, "wb") as log_file:
            self.popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group: we forward signals ourselves
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.pid = self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, sig: int) -> None:
        """Send `sig` to the service's whole process group."""
        if not self.alive:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except (OSError, AttributeError):
            return ""
        return lines[-1].strip() if lines else ""


class Interrupted(Exception):
    """The user pressed Ctrl-C (or the launcher got SIGTERM)."""


@dataclass
class RunOutcome:
    """What happened: why it ended, each service's final state and stats, how long it took."""

    reason: str                     # "end_of_stream", "interrupted", "deadline", "failed"
    services: dict                  # label -> {"state", "pid", "returncode", "stats", "error"}
    wall_s: float
    error: str = ""


class Launcher:
    """Starts, watches and stops the services of one run."""

    def __init__(self, config: ServiceConfig, config_path: Path, ready_timeout_s: float = 180.0,
                 deadline_s: float | None = None):
        from .transport import Endpoint, Network

        self.config = config
        self.config_path = Path(config_path)
        self.run_dir = Path(config.out)
        self.ready_timeout_s = ready_timeout_s
        self.deadline_s = deadline_s
        curve = None
        if config.curve_dir:  # the services' status reports reach us encrypted and authenticated too
            from .transport import CurveConfig
            curve = CurveConfig.from_config({"keys_dir": config.curve_dir, "identity": "launcher"})
        self.net = Network(curve=curve)
        self.control = self.net.socket(zmq.PULL, Endpoint(config.endpoints.control, bind=True),
                                       {zmq.RCVHWM: 10000, zmq.LINGER: 0})
        self.services: list[ServiceProcess] = []
        self._interrupts = 0
        self.bad_status = 0

    # -- status lane --------------------------------------------------------------------------
    def _find(self, name: str, instance: int) -> ServiceProcess | None:
        for proc in self.services:
            if proc.name == name and proc.instance == instance:
                return proc
        return None

    def drain_status(self, timeout_ms: int = 0) -> None:
        """Read every pending STATUS and update the services' states (bad ones counted)."""
        while self.control.poll(timeout_ms, zmq.POLLIN):
            timeout_ms = 0
            frames = self.control.recv_multipart()
            try:
                msg = decode(frames)
            except WireError:
                self.bad_status += 1
                continue
            meta = msg.meta
            if msg.kind is not Kind.STATUS or not isinstance(meta.get("service"), str):
                continue
            proc = self._find(meta["service"], int(meta.get("instance") or 0))
            if proc is None:
                continue
            proc.state = meta.get("state", proc.state)
            if isinstance(meta.get("stats"), dict) and meta["stats"]:
                proc.stats = meta["stats"]
            if meta.get("error"):
                proc.error = str(meta["error"])

    # -- signals ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._interrupts += 1

    def _check_interrupt(self) -> None:
        if self._interrupts:
            raise Interrupted()

    # -- starting -----------------------------------------------------------------------------
    def _spawn(self, name: str, instance: int = 0) -> ServiceProcess:
        proc = ServiceProcess(name, instance)
        self.services.append(proc)
        proc.start(self.config_path, self.run_dir / "logs", self.config.threads.get(name, 1))
        log.info("started %s (pid %d)", proc.label, proc.pid)
        return proc

    def _failure(self, proc: ServiceProcess) -> str:
        detail = proc.error or proc.last_log_line() or f"exit code {proc.returncode}"
        return f"{proc.label} failed: {detail} (log: {proc.log_path})"

    def _wait_ready(self, procs: list[ServiceProcess]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            self._check_interrupt()
            self.drain_status(100)
            for proc in procs:
                if proc.state == "error" or (not proc.alive and proc.state not in ("ready", "running")):
                    raise UserError(self._failure(proc))
            if all(p.state in ("ready", "running", "stopping", "stopped") for p in procs):
                return
            if time.monotonic() > deadline:
                late = ", ".join(p.label for p in procs if p.state not in ("ready", "running"))
                raise UserError(f"{late} did not report ready within {self.ready_timeout_s:g} s "
                                f"(logs in {self.run_dir / 'logs'})")

    def start_all(self) -> None:
        first = [self._spawn("recorder"), self._spawn("decoder")]
        first += [self._spawn("refiner", k) for k in range(self.config.n_refiners)]
        self._wait_ready(first)
        self._wait_ready([self._spawn("replay")])

    # -- streaming ----------------------------------------------------------------------------
    def stream(self) -> str:
        """Watch until the recorder is done; the reason the run ended."""
        recorder = self._find("recorder", 0)
        deadline = time.monotonic() + self.deadline_s if self.deadline_s else None
        while True:
            self._check_interrupt()
            self.drain_status(100)
            if not recorder.alive:
                if recorder.returncode != 0:
                    raise UserError(self._failure(recorder))
                return "end_of_stream"
            for proc in self.services:
                failed = proc.state == "error" or (not proc.alive and proc.returncode not in (0, None))
                if failed:
                    raise UserError(self._failure(proc))
            if deadline is not None and time.monotonic() > deadline:
                log.warning("run deadline passed; stopping the services")
                return "deadline"

    def wait_exit(self, timeout_s: float) -> bool:
        """Wait for every child to exit on its own (reading status meanwhile); True if all did.

        Another Ctrl-C cuts the wait short (the next, harsher signal goes out at once)."""
        end = time.monotonic() + timeout_s
        interrupts = self._interrupts
        while time.monotonic() < end and self._interrupts == interrupts:
            self.drain_status(50)
            if not any(p.alive for p in self.services):
                return True
        return not any(p.alive for p in self.services)

    def stop_all(self, replay_first: bool = True) -> None:
        """SIGINT, wait, SIGTERM, wait, SIGKILL: every child (and its group) ends."""
        for sig, wait_s in STOP_STEPS:
            alive = [p for p in self.services if p.alive]
            if not alive:
                break
            log.info("sending %s to %s", signal.Signals(sig).name, ", ".join(p.label for p in alive))
            for proc in alive:
                proc.signal(sig)
            self.wait_exit(wait_s)
        for proc in self.services:  # reap, and take the last words of each
            if proc.popen is not None:
                try:
                    proc.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL always lands
                    pass
        self.drain_status(200)

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        started = time.monotonic()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        reason, error = "end_of_stream", ""
        try:
            try:
                self.start_all()
                reason = self.stream()
                if reason == "end_of_stream":
                    self.wait_exit(CLEAN_EXIT_S)
            except Interrupted:
                reason = "interrupted"
            except UserError as exc:
                reason, error = "failed", str(exc)
            finally:
                self.stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.net.close(linger_ms=0)
        services = {p.label: {"state": p.state, "pid": p.pid, "returncode": p.returncode,
                              "stats": p.stats, "error": p.error} for p in self.services}
        return RunOutcome(reason, services, round(time.monotonic() - started, 3), error)


def run_live(config: ServiceConfig, ready_timeout_s: float = 180.0, report: bool = True) -> tuple[RunOutcome, dict | None]:
    """Save the config, run the services, write the report; (outcome, report summary or None)."""
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("recording.h5", "report.json", "report.md", "outcome.json"):
        (run_dir / stale).unlink(missing_ok=True)
    config_path = run_dir / "config.json"
    config.save(config_path)
    deadline = None
    if config.duration > 0 and not config.loop:
        deadline = config.duration / config.speed + 60.0
    outcome = Launcher(config, config_path, ready_timeout_s, deadline).run()
    (run_dir / "outcome.json").write_text(json.dumps(
        {"reason": outcome.reason, "error": outcome.error, "wall_s": outcome.wall_s,
         "services": outcome.services}, indent=2, default=str) + "\n")
    summary = None
    recording = run_dir / "recording.h5"
    if report and recording.is_file():
        from .run_report import write_run_report

        try:
            summary = write_run_report(run_dir, config, outcome)
        except UserError as exc:  # e.g. the recorder died before writing anything useful
            log.warning("no run report: %s", exc)
    return outcome, summary
