"""One validated configuration object for the live services (`run` writes it; `serve` reads it).

A JSON file holds the endpoints of every lane, the inputs (sessions, bundle), the pacing, the
refiner's settings and each service's thread budget. Everything is checked at load time so a
service fails at start with one clear line, not mid-stream.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from spikevaediff.core.errors import UserError, read_json

SERVICES = ("replay", "decoder", "refiner", "recorder")
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune")  # the torch UNet backend's


@dataclass
class Endpoints:
    """Where each lane lives (addresses; the side that binds is fixed per lane).

    counts:   replay XPUB binds -> decoder, recorder SUB connect (lossless, ordered; the
              hello handshake rides on this socket's subscriptions)
    sync:     reserved (unused: the handshake needs no socket of its own)
    preview:  decoder XPUB binds -> recorder, monitors, refiners (end of stream) connect (latest)
    work:     decoder ROUTER binds <-> refiner DEALERs connect (newest request to a free refiner)
    control:  launcher PULL binds <- every service's STATUS PUSH
    refined:  refiner XPUB binds -> recorder connects; instance k binds `instance_address(refined, k)`
    """

    counts: str = "tcp://127.0.0.1:5601"
    sync: str = "tcp://127.0.0.1:5602"
    preview: str = "tcp://127.0.0.1:5603"
    work: str = "tcp://127.0.0.1:5604"
    control: str = "tcp://127.0.0.1:5605"
    refined: str = "tcp://127.0.0.1:5606"


def instance_address(address: str, instance: int) -> str:
    """The address of service instance k: tcp port + k, or `<name>-k.<ext>` for ipc (k=0 unchanged)."""
    if instance == 0:
        return address
    if address.startswith("tcp://"):
        host, _, port = address.rpartition(":")
        return f"{host}:{int(port) + instance}"
    stem, dot, suffix = address.rpartition(".")
    if dot and "/" not in suffix:
        return f"{stem}-{instance}.{suffix}"
    return f"{address}-{instance}"


@dataclass
class RefinerSettings:
    steps: int = 5
    strength: float = 0.75
    scheduler: str = "dpmsolver++"
    guidance_scale: float = 7.5
    text_share: float = 0.4
    backend: str = "torch"
    backend_path: str = ""              # an ONNX file or TensorRT engine for those backends
    skip_similarity: float = 0.0        # >0: skip a request whose embeddings have cosine >= this to the last refined
    seed: int = 0
    device: str = "cpu"
    precision: str = "float32"          # "float16" halves the work on a CUDA device (the CPU runs float32)
    compile: str = ""                   # torch backend: "" eager, or a torch.compile mode ("reduce-overhead" = CUDA graphs)
    nice: int = 10                      # CPU refiners run at lower priority than the decoder (0: off)


@dataclass
class ServiceConfig:
    sessions: list = field(default_factory=list)
    bundle: str = ""
    weights_dir: str = ""               # "" = the bundle's weights folder
    out: str = "runs/live"
    speed: float = 1.0                  # 1 = real time; 2 = twice as fast
    start_frame: int = 0
    duration: float = 30.0              # seconds of neural time to stream (0 = the whole movie once)
    loop: bool = False
    subscribers: list = field(default_factory=lambda: ["decoder", "recorder"])
    subscriber_timeout_s: float = 30.0  # replay: how long to wait for every subscriber's hello
    endpoints: Endpoints = field(default_factory=Endpoints)
    refiner: RefinerSettings = field(default_factory=RefinerSettings)
    n_refiners: int = 1
    threads: dict = field(default_factory=lambda: {"replay": 1, "decoder": 1, "refiner": 1, "recorder": 1})
    cpus: dict = field(default_factory=dict)  # service -> CPU ids it is pinned to (Linux); {} = no pinning
    curve_dir: str = ""                 # folder of CURVE keys: enables encryption/authentication on tcp
    heartbeat_s: float = 1.0
    preview_seed: int = 0
    decoder_device: str = "cpu"         # "cuda": ridge projections and the preview decode (one CUDA graph) on the GPU
    decoder_catch_up: bool = True       # under overload decode only the newest queued bin (skips counted)

    def validate(self) -> "ServiceConfig":
        if self.speed <= 0:
            raise UserError(f"speed must be > 0, got {self.speed}")
        if self.duration < 0:
            raise UserError(f"duration must be >= 0, got {self.duration}")
        if self.start_frame < 0:
            raise UserError(f"start frame must be >= 0, got {self.start_frame}")
        if self.subscriber_timeout_s <= 0:
            raise UserError(f"subscriber_timeout_s must be > 0, got {self.subscriber_timeout_s}")
        if not 0 <= self.refiner.skip_similarity <= 1:
            raise UserError(f"refiner skip_similarity must be in [0, 1], got {self.refiner.skip_similarity}")
        if self.n_refiners < 0:
            raise UserError("n_refiners must be >= 0")
        if not 0 < self.refiner.strength <= 1:
            raise UserError(f"refiner strength must be in (0, 1], got {self.refiner.strength}")
        if self.refiner.steps < 1:
            raise UserError("refiner steps must be >= 1")
        for what, device in (("decoder_device", self.decoder_device), ("refiner device", self.refiner.device)):
            if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
                raise UserError(f"{what} must be cpu, cuda or cuda:N, got '{device}'")
        if self.refiner.precision not in ("float32", "float16"):
            raise UserError(f"refiner precision must be float32 or float16, got '{self.refiner.precision}'")
        if self.refiner.compile not in COMPILE_MODES:
            raise UserError(f"refiner compile must be one of {', '.join(repr(m) for m in COMPILE_MODES)}, "
                            f"got '{self.refiner.compile}'")
        for name, value in asdict(self.endpoints).items():
            if not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise UserError(f"endpoint {name} must be tcp://, ipc:// or inproc://, got '{value}'")
        for section in ("threads", "cpus"):
            unknown = set(getattr(self, section)) - set(SERVICES)
            if unknown:
                raise UserError(f"unknown service(s) in {section}: {', '.join(sorted(unknown))}")
        for name, cpus in self.cpus.items():
            if not cpus or not all(isinstance(c, int) and c >= 0 for c in cpus):
                raise UserError(f"cpus.{name} must be a non-empty list of CPU ids, got {cpus!r}")
        return self

    def refined_address(self, instance: int = 0) -> str:
        """Where refiner instance `instance` publishes its refined images."""
        return instance_address(self.endpoints.refined, instance)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> "ServiceConfig":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        raw = read_json(path, "config")
        return cls.from_dict(raw, source=str(path)).validate()

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ServiceConfig":
        if not isinstance(raw, dict):
            raise UserError(f"{source}: expected a JSON object")
        nested = {"endpoints": Endpoints, "refiner": RefinerSettings}
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise UserError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
        kwargs = {}
        for key, value in raw.items():
            if key in nested:
                sub_known = {f.name for f in fields(nested[key])}
                if not isinstance(value, dict) or set(value) - sub_known:
                    raise UserError(f"{source}: bad '{key}' section (allowed keys: {', '.join(sorted(sub_known))})")
                value = nested[key](**value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise UserError(f"{source}: {exc}") from None
