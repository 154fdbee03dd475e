"""The wire protocol: multipart ZeroMQ messages `[topic, msgpack header, raw payload frames...]`.

Every message between the services is one `Message`. `encode` turns it into frames (the
topic first, so SUB sockets can filter by kind and stream; array payloads as raw
little-endian buffers, passed without a copy when already contiguous). `decode` is strict:
it checks the version, the kind, every size against `Limits`, the dtype whitelist, shape
against bytes, finite floats and every required field and type, and raises `WireError`
with a short reason code. Nothing is ever unpickled: headers are plain msgpack maps
(`raw=False`, string keys only, ext types refused).

docs/PROTOCOL.md is the written specification; keep the two in step.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import msgpack
import numpy as np

from .wire_schema import (  # noqa: F401  (re-exported: the protocol's names live in one place)
    _HEADER_KEYS, _INT63, ALLOWED_DTYPES, ARRAY_RULES, DEFAULT_LIMITS, FLOAT_DTYPES, NAME_RE,
    SCHEMA_VERSION, STREAM_RE, ArrayRule, Kind, Limits, Message, WireError, monotonic_ns, topic_for,
)

# ---------------------------------------------------------------- encode


@lru_cache(maxsize=4096)
def _valid_stream(stream: str) -> bool:
    return STREAM_RE.fullmatch(stream) is not None


@lru_cache(maxsize=4096)
def _valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


def _check_stream(stream) -> None:
    if type(stream) is not str or not _valid_stream(stream):
        raise WireError("field_value", f"bad stream id {stream!r}")


@lru_cache(maxsize=4096)
def _checked_topic(kind_value: str, stream: str) -> bytes:
    """The topic, once `stream` passed `_check_stream` (one cache lookup per send)."""
    _check_stream(stream)
    return f"{kind_value}/{stream}".encode("ascii")


def _to_wire_array(name: str, array: np.ndarray, limits: Limits) -> tuple[dict, memoryview]:
    # Fast path: a contiguous array of a default-whitelisted dtype (the usual case).
    if type(array) is np.ndarray and array.flags.c_contiguous:
        dtype = _WIRE_DTYPE_STR.get(array.dtype)
        if dtype is not None and dtype in limits.dtypes:
            shape = array.shape
            nbytes = array.nbytes
            if len(shape) <= limits.max_ndim and nbytes <= limits.max_payload_bytes:
                buffer = memoryview(array).cast("B") if nbytes else memoryview(b"")
                return {"name": name, "dtype": dtype, "shape": list(shape)}, buffer
    if type(array) is not np.ndarray or not array.flags.c_contiguous or array.dtype.byteorder == ">":
        array = np.ascontiguousarray(array)  # copies only what is not already wire-ready
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
    dtype = array.dtype.str
    if dtype not in limits.dtypes:
        raise WireError("dtype", f"array '{name}' has dtype {array.dtype} (not on the wire whitelist)")
    if array.ndim > limits.max_ndim:
        raise WireError("shape", f"array '{name}' has {array.ndim} dimensions (max {limits.max_ndim})")
    if array.nbytes > limits.max_payload_bytes:
        raise WireError("payload_size", f"array '{name}' is {array.nbytes} bytes "
                                        f"(max {limits.max_payload_bytes})")
    buffer = memoryview(array).cast("B") if array.size else memoryview(b"")
    return {"name": name, "dtype": dtype, "shape": list(array.shape)}, buffer


# Exact dtype objects -> wire string (np.dtype equality includes byte order, so a
# big-endian array never matches and takes the converting path).
_WIRE_DTYPE_STR = {np.dtype(name): name for name in ALLOWED_DTYPES}


def _pack_default(obj):
    # numpy scalars in meta become plain Python values; anything else is refused (no ext types).
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot put {type(obj).__name__} on the wire")


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list:
    """Frames for `msg`: `[topic, header, payload...]`; payloads are zero-copy memoryviews.

    Checks what the sender controls (names, dtypes, sizes, field types); finiteness is left to
    the receiver, which must check it anyway.
    """
    kind = msg.kind if type(msg.kind) is Kind else Kind(msg.kind)
    stream = msg.stream
    if type(stream) is not str:
        _check_stream(stream)  # raises
    kind_value = kind._value_  # Enum's .value and hash() are Python-level calls: dear per message
    topic = _checked_topic(kind_value, stream)
    specs, buffers = [], []
    for name, array in msg.arrays.items():
        if type(name) is not str or not _valid_name(name):
            raise WireError("array_spec", f"bad array name {name!r}")
        spec, buffer = _to_wire_array(name, array, limits)
        specs.append(spec)
        buffers.append(buffer)
    if len(buffers) + 2 > limits.max_frames:
        raise WireError("frames", f"{len(buffers)} arrays (max {limits.max_frames - 2})")
    packed = None
    if _FAST is not None:  # the same bytes as below, for plain built-in field values
        packed = _FAST.pack_header(kind_value, stream, msg.seq, msg.bin_index, msg.t_start,
                                   msg.t_stop, msg.stamps, msg.wall_ns, msg.meta, specs)
    if packed is None:
        packed = _pack_header(kind, msg, specs)
    if len(packed) > limits.max_header_bytes:
        raise WireError("header_size", f"{len(packed)} bytes (max {limits.max_header_bytes})")
    return [topic, packed, *buffers]


def _pack_header(kind: Kind, msg: Message, specs: list) -> bytes:
    """The msgpack header; numpy scalars become Python values, anything else odd is refused."""
    header = {
        "v": SCHEMA_VERSION,
        "kind": kind.value,
        "stream": msg.stream,
        "seq": int(msg.seq),
        "bin": int(msg.bin_index),
        "t0": float(msg.t_start),
        "t1": float(msg.t_stop),
        "stamps": {str(k): int(v) for k, v in msg.stamps.items()},
        "wall_ns": int(msg.wall_ns),
        "meta": msg.meta,
        "arrays": specs,
    }
    try:
        return _PACKER(header)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError("field_type", str(exc)) from None


_PACKER = msgpack.Packer(use_bin_type=True, default=_pack_default, autoreset=True).pack


# ---------------------------------------------------------------- decode


def _refuse_ext(code, data):
    raise WireError("malformed", f"msgpack ext type {code} not allowed")


def _parse_header(raw: memoryview, limits: Limits) -> dict:
    """The header map: well-formed msgpack, our version, exactly the known keys."""
    if len(raw) > limits.max_header_bytes:
        raise WireError("header_size", f"{len(raw)} bytes (max {limits.max_header_bytes})")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True,
                                 ext_hook=_refuse_ext, timestamp=0)
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage; all mean the same here
        raise WireError("malformed", f"header is not a msgpack map ({type(exc).__name__})") from None
    if type(header) is not dict:
        raise WireError("malformed", "header is not a msgpack map")
    version = header.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        if version is None:
            raise WireError("missing_field", "'v'")
        raise WireError("version", f"schema version {version!r} (expected {SCHEMA_VERSION})")
    if len(header) != len(_HEADER_KEYS) or not _HEADER_KEY_SET.issuperset(header):
        missing = [k for k in _HEADER_KEYS if k not in header]
        if missing:
            raise WireError("missing_field", ", ".join(repr(k) for k in missing))
        unknown = [k for k in header if k not in _HEADER_KEY_SET]
        raise WireError("unknown_field", ", ".join(repr(k) for k in unknown[:4]))
    return header


_HEADER_KEY_SET = frozenset(_HEADER_KEYS)
_NP_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}
_KIND_BY_VALUE = {k.value: k for k in Kind}


def _int_field(header: dict, key: str, low: int) -> int:
    value = header[key]
    if type(value) is not int:  # bool is an int subclass: refused too
        raise WireError("field_type", f"'{key}' must be an integer")
    if not low <= value < _INT63:
        raise WireError("field_value", f"'{key}'={value} out of range")
    return value


def _time_field(header: dict, key: str) -> float:
    value = header[key]
    if type(value) is not float and type(value) is not int:
        raise WireError("field_type", f"'{key}' must be a number")
    if not math.isfinite(value):
        raise WireError("nonfinite", f"'{key}' is not finite")
    return float(value)


def _check_meta(value, limits: Limits, depth: int = 0) -> None:
    """Meta holds small JSON-like values: str, int, finite float, bool, None, lists, str-keyed maps."""
    if depth > limits.max_meta_depth:
        raise WireError("field_value", "meta nested too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise WireError("nonfinite", "meta holds a non-finite number")
        return
    if isinstance(value, (list, dict)) and len(value) > limits.max_meta_items:
        raise WireError("field_value", "meta holds too many items")
    if isinstance(value, list):
        for item in value:
            _check_meta(item, limits, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise WireError("field_type", "meta keys must be strings")
            _check_meta(item, limits, depth + 1)
        return
    raise WireError("field_type", f"meta holds a {type(value).__name__}")


def _parse_array(spec, frame: memoryview, limits: Limits, rules: dict) -> tuple[str, np.ndarray]:
    """(name, read-only array view of `frame`) after checking the spec against the frame."""
    if type(spec) is not dict or len(spec) != 3:
        raise WireError("array_spec", "array spec must be a map of name, dtype, shape")
    try:
        name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    except KeyError:
        raise WireError("array_spec", "array spec must be a map of name, dtype, shape") from None
    if type(name) is not str or not _valid_name(name):
        raise WireError("array_spec", f"bad array name {name!r}")
    if type(dtype) is not str or dtype not in limits.dtypes:
        raise WireError("dtype", f"array '{name}' dtype {dtype!r} not allowed")
    if type(shape) is not list or len(shape) > limits.max_ndim:
        raise WireError("shape", f"array '{name}' has a bad shape {shape!r}")
    count = 1
    for n in shape:
        if type(n) is not int or n < 0:
            raise WireError("shape", f"array '{name}' has a bad shape {shape!r}")
        count *= n
    nbytes = len(frame)
    if nbytes > limits.max_payload_bytes:
        raise WireError("payload_size", f"array '{name}' is {nbytes} bytes "
                                        f"(max {limits.max_payload_bytes})")
    np_dtype = _NP_DTYPES.get(dtype) or np.dtype(dtype)  # a custom whitelist may add dtypes
    expected = np_dtype.itemsize * count
    if expected != nbytes:
        raise WireError("shape", f"array '{name}' shape {shape} needs {expected} bytes, "
                                 f"frame has {nbytes}")
    rule = rules.get(name)
    if rule is not None:
        if len(shape) != rule.ndim or (rule.last_dim is not None and shape[-1] != rule.last_dim):
            raise WireError("shape", f"array '{name}' shape {shape} does not fit its kind")
        if rule.dtypes is not None and dtype not in rule.dtypes:
            raise WireError("dtype", f"array '{name}' dtype {dtype} does not fit its kind")
    array = np.frombuffer(frame, dtype=np_dtype)
    if len(shape) != 1:  # frombuffer already gives the 1-D shape (the byte count matched)
        try:
            array = array.reshape(shape)
        except ValueError:  # zero-size, yet a dimension numpy cannot hold (e.g. [0, 2**63])
            raise WireError("shape", f"array '{name}' has a bad shape {shape!r}") from None
    if array.flags.writeable:
        array.flags.writeable = False  # a view of the received frame: never edited in place
    if dtype in FLOAT_DTYPES and nbytes and not np.isfinite(array).all():
        raise WireError("nonfinite", f"array '{name}' holds NaN or inf")
    return name, array


def _check_ints(header: dict) -> None:
    """The precise reason an integer field failed the fast check in `decode`."""
    _int_field(header, "seq", 0)
    _int_field(header, "bin", -1)
    _int_field(header, "wall_ns", 0)


def _check_times(header: dict) -> None:
    """The precise reason t0/t1 failed the fast check in `decode`."""
    if _time_field(header, "t1") < _time_field(header, "t0"):
        raise WireError("field_value", "t1 before t0")


_NEG_INF, _POS_INF = float("-inf"), float("inf")


def decode(frames, limits: Limits = DEFAULT_LIMITS) -> Message:
    """The `Message` in `frames` (bytes or zmq.Frame), or `WireError` saying why not.

    Every rule of docs/PROTOCOL.md section 5 is checked. With the optional C extension
    (`DECODE_PATH == "c"`), a valid message is recognised there; anything it is not sure of,
    every bad message included, goes to `decode_python`, which gives the precise reason.
    """
    if _FAST is not None and limits.fast_params is not None:
        parsed = _FAST.parse(frames, limits.fast_params)
        if parsed is not None:
            return _message_from_parts(frames, parsed)
    return decode_python(frames, limits)


def decode_python(frames, limits: Limits = DEFAULT_LIMITS) -> Message:
    """`decode` in pure Python: the reference for every rule and for the reason of a rejection.

    The common well-formed header takes a fast path (a few combined type and range tests);
    anything that fails it is re-checked field by field, in the documented order.
    """
    if not 2 <= len(frames) <= limits.max_frames:
        raise WireError("frames", f"{len(frames)} frames (expected 2..{limits.max_frames})")
    views = [memoryview(f) for f in frames]
    if len(views[0]) > limits.max_topic_bytes:
        raise WireError("topic", "topic too long")
    header = _parse_header(views[1], limits)

    kind_value = header["kind"]
    kind = _KIND_BY_VALUE.get(kind_value) if type(kind_value) is str else None
    if kind is None:
        raise WireError("kind", f"unknown kind {kind_value!r}")
    stream = header["stream"]
    if type(stream) is not str or not _valid_stream(stream):
        raise WireError("field_value", f"bad stream id {stream!r}")
    if views[0] != topic_for(kind, stream):
        raise WireError("topic", "topic does not match kind and stream")
    seq, bin_index, wall_ns = header["seq"], header["bin"], header["wall_ns"]
    if not (type(seq) is int and type(bin_index) is int and type(wall_ns) is int
            and 0 <= seq < _INT63 and -1 <= bin_index < _INT63 and 0 <= wall_ns < _INT63):
        _check_ints(header)
    t_start, t_stop = header["t0"], header["t1"]
    if not (type(t_start) is float and type(t_stop) is float and _NEG_INF < t_start <= t_stop < _POS_INF):
        _check_times(header)  # raises, or accepts ints / equal bounds after the exact checks
        t_start, t_stop = float(t_start), float(t_stop)
    stamps = header["stamps"]
    if type(stamps) is not dict or len(stamps) > limits.max_stamps:
        raise WireError("field_type", "'stamps' must be a small map")
    for stage, value in stamps.items():  # msgpack may hand over bytes keys: not a stage name
        if type(value) is not int or not 0 <= value < _INT63 or type(stage) is not str or not _valid_name(stage):
            raise WireError("field_value", f"bad stamp {stage!r}")
    meta = header["meta"]
    if type(meta) is not dict:
        raise WireError("field_type", "'meta' must be a map")
    if meta:
        _check_meta(meta, limits)
    if kind is Kind.STATUS and type(meta.get("state")) is not str:
        raise WireError("missing_field", "status message without meta['state']")

    specs = header["arrays"]
    if type(specs) is not list:
        raise WireError("field_type", "'arrays' must be a list")
    if len(specs) != len(views) - 2:
        raise WireError("frames", f"header lists {len(specs)} arrays, message has {len(views) - 2}")
    rules = ARRAY_RULES[kind]
    arrays: dict[str, np.ndarray] = {}
    for index, spec in enumerate(specs, 2):
        name, array = _parse_array(spec, views[index], limits, rules)
        if name in arrays:
            raise WireError("array_spec", f"array '{name}' listed twice")
        arrays[name] = array
    for name in _REQUIRED_ARRAYS[kind]:
        if name not in arrays:
            absent = [n for n in _REQUIRED_ARRAYS[kind] if n not in arrays]
            raise WireError("missing_array", f"{kind.value} needs {', '.join(absent)}")

    return Message(kind, stream, seq, bin_index, t_start, t_stop, stamps, wall_ns, meta, arrays)


_REQUIRED_ARRAYS = {kind: tuple(n for n, rule in rules.items() if rule.required)
                    for kind, rules in ARRAY_RULES.items()}


# ---------------------------------------------------------------- optional C fast path


def _message_from_parts(frames, parsed) -> Message:
    """The Message for a header `_wirefast.parse` accepted (payloads already checked finite)."""
    kind_index, stream, seq, bin_index, t_start, t_stop, stamps, wall_ns, meta, specs = parsed
    arrays = {}
    for index, (name, dtype, shape) in enumerate(specs, 2):
        array = np.frombuffer(frames[index], dtype=_NP_DTYPES[dtype])
        if len(shape) != 1:
            array = array.reshape(shape)
        if array.flags.writeable:
            array.flags.writeable = False
        arrays[name] = array
    return Message(_FAST_KINDS[kind_index], stream, seq, bin_index, t_start, t_stop, stamps, wall_ns,
                   meta, arrays)


def _load_fast():
    """The configured `_wirefast` module, or None (not built, switched off, or out of step)."""
    if os.environ.get("SPIKEVAEDIFF_PURE_PYTHON_WIRE", "") not in ("", "0"):
        return None
    try:
        from . import _wirefast
    except ImportError:  # built without a compiler: the pure-Python decode does everything
        return None
    if (_wirefast.HEADER_KEYS != _HEADER_KEYS or frozenset(_wirefast.DTYPES) != ALLOWED_DTYPES
            or frozenset(_wirefast.FLOAT_DTYPES) != FLOAT_DTYPES):
        return None  # a stale build of an older protocol: never half-understand
    table = tuple((kind.value, tuple((name, rule.ndim, None if rule.dtypes is None else tuple(rule.dtypes),
                                      rule.required, rule.last_dim)
                                     for name, rule in ARRAY_RULES[kind].items()))
                  for kind in _FAST_KINDS)
    _wirefast.configure(SCHEMA_VERSION, _FAST_KINDS.index(Kind.STATUS), table)
    return _wirefast


_FAST_KINDS = tuple(Kind)
_FAST = _load_fast()
DECODE_PATH = "c" if _FAST is not None else "python"
