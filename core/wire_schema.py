"""The wire protocol's vocabulary: message kinds, limits, array rules and the `Message` itself.

`core.wire` encodes and decodes these (and re-exports every name here); docs/PROTOCOL.md is the
written specification.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any

import numpy as np

SCHEMA_VERSION = 1


class Kind(str, Enum):
    """Message kinds; the value is the first part of the topic."""

    COUNTS = "counts"                  # binned spike counts of one bin (lossless lane)
    PREVIEW = "preview"                # 64x64 VDVAE preview of one bin (latest-wins)
    REFINE_REQUEST = "refine_request"  # preview + predicted CLIP embeddings for the refiner
    REFINED = "refined"                # refined image (latest-wins)
    STATUS = "status"                  # heartbeat / ready / error / stopping
    END_OF_STREAM = "end_of_stream"    # the sender has no more messages on this stream


class WireError(ValueError):
    """A message that breaks the protocol. `reason` is a short stable code used for counters."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# numpy dtype strings allowed on the wire (always little-endian or byte-sized).
ALLOWED_DTYPES = frozenset({
    "|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<i8", "<f2", "<f4", "<f8",
})
FLOAT_DTYPES = frozenset({"<f2", "<f4", "<f8"})


@dataclass(frozen=True)
class Limits:
    """Upper bounds a receiver enforces before it trusts anything in a message."""

    max_header_bytes: int = 16 * 1024
    max_payload_bytes: int = 8 * 1024 * 1024  # per frame: 2x a 512x512x3 image or a 257x768 f64
    max_frames: int = 10                      # topic + header + up to 8 arrays
    max_ndim: int = 4
    max_topic_bytes: int = 128
    max_stamps: int = 32
    max_meta_items: int = 64
    max_meta_depth: int = 4
    dtypes: frozenset = ALLOWED_DTYPES

    def __post_init__(self):
        # `fast_params`: these limits as `_wirefast.parse` takes them, or None when a custom
        # dtype whitelist needs the Python decode. An attribute, not a field: no part of
        # equality or repr, and cheaper to read per message than a property.
        params = None
        if self.dtypes == ALLOWED_DTYPES:
            params = (self.max_frames, self.max_header_bytes, self.max_payload_bytes, self.max_ndim,
                      self.max_topic_bytes, self.max_stamps, self.max_meta_items, self.max_meta_depth)
        object.__setattr__(self, "fast_params", params)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ArrayRule:
    """What a kind expects of one named array."""

    ndim: int
    dtypes: frozenset | None = None  # None: any whitelisted dtype
    required: bool = True
    last_dim: int | None = None      # e.g. 3 for RGB images


_IMAGE = ArrayRule(ndim=3, dtypes=frozenset({"|u1"}), last_dim=3)
_EMBEDDING = ArrayRule(ndim=2, dtypes=FLOAT_DTYPES)

# Arrays each kind must (or may) carry. Other names are allowed as extras.
ARRAY_RULES: dict[Kind, dict[str, ArrayRule]] = {
    Kind.COUNTS: {"counts": ArrayRule(ndim=1)},
    Kind.PREVIEW: {"image": _IMAGE},
    Kind.REFINE_REQUEST: {
        "image": _IMAGE,
        "clip_vision": _EMBEDDING,
        "clip_text": ArrayRule(ndim=2, dtypes=FLOAT_DTYPES, required=False),
    },
    Kind.REFINED: {"image": _IMAGE},
    Kind.STATUS: {},
    Kind.END_OF_STREAM: {},
}

STREAM_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # used with fullmatch: `$` would let "x\n" in
NAME_RE = re.compile(r"[A-Za-z0-9_]{1,32}")
_INT63 = 2 ** 63

# Header keys on the wire (short: the header travels with every bin).
_HEADER_KEYS = ("v", "kind", "stream", "seq", "bin", "t0", "t1", "stamps", "wall_ns", "meta", "arrays")


def monotonic_ns() -> int:
    """The clock for per-stage stamps (comparable only on one host)."""
    return time.monotonic_ns()


@dataclass
class Message:
    """One protocol message.

    `stamps` maps a stage name (e.g. "replay_send", "decoder_recv") to `time.monotonic_ns()`
    on the host that took it; `wall_ns` is `time.time_ns()` at creation, for cross-host
    comparisons. `arrays` travel as raw payload frames, in insertion order. Decoded arrays
    are read-only views of the received frames (no copy); call `.copy()` to modify one.
    """

    kind: Kind
    stream: str = "main"
    seq: int = 0
    bin_index: int = -1
    t_start: float = 0.0
    t_stop: float = 0.0
    stamps: dict[str, int] = field(default_factory=dict)
    wall_ns: int = field(default_factory=time.time_ns)
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def topic(self) -> bytes:
        return topic_for(self.kind, self.stream)

    def stamp(self, stage: str) -> int:
        """Record `monotonic_ns()` under `stage` and return it."""
        now = monotonic_ns()
        self.stamps[stage] = now
        return now


@lru_cache(maxsize=4096)
def topic_for(kind: Kind | str, stream: str = "") -> bytes:
    """The topic frame: `b"<kind>/<stream>"`; with no stream, the prefix for all of a kind."""
    return f"{Kind(kind).value}/{stream}".encode("ascii")
