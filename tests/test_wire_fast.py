"""The optional C accelerator (core/_wirefast.c) against the pure-Python wire code.

Parity is the rule: for any input, `decode` (C first, Python for whatever C hands back) and
`decode_python` give the same Message or the same WireError reason, and `encode` gives the
same bytes with and without the C header packer. Every case of test_wire.py runs again here
with decode and encode checked on both paths, then a seeded fuzz does the same for
thousands of mutated messages. Skipped where the extension is not built (no compiler).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import test_wire
import zmq
from spikevaediff.core import wire
from spikevaediff.core.wire import DEFAULT_LIMITS, Kind, Limits, Message, WireError
from test_wire import *  # the wire cases, collected again here with both paths checked

FAST = wire._FAST
pytestmark = pytest.mark.skipif(FAST is None, reason="spikevaediff.core._wirefast is not built "
                                "(no C compiler at install) or SPIKEVAEDIFF_PURE_PYTHON_WIRE is set")


# ---------------------------------------------------------------- comparing outcomes


def _strict(value):
    """A comparable form that tells 1, 1.0 and True apart (== does not) and keeps order."""
    if isinstance(value, dict):
        return ("dict", tuple((type(k).__name__, k, _strict(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", tuple(_strict(v) for v in value))
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def _summary(msg: Message):
    arrays = tuple((name, a.dtype.str, a.shape, a.tobytes(), a.flags.writeable) for name, a in msg.arrays.items())
    return (msg.kind, _strict(msg.stream), _strict(msg.seq), _strict(msg.bin_index), _strict(msg.t_start),
            _strict(msg.t_stop), _strict(msg.stamps), _strict(msg.wall_ns), _strict(msg.meta), arrays)


def _outcome(function, *args):
    try:
        return "ok", function(*args)
    except WireError as error:
        return "wire_error", error
    except Exception as error:  # noqa: BLE001  (compared too: the paths must not differ in how they fail)
        return "crash", error


def _same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "ok":
        first, second = a[1], b[1]
        if isinstance(first, Message):
            return _summary(first) == _summary(second)
        return [bytes(f) for f in first] == [bytes(f) for f in second]  # encoded frames
    return type(a[1]) is type(b[1]) and str(a[1]) == str(b[1])  # WireError: reason and detail


def decode_on_both_paths(frames, limits: Limits = DEFAULT_LIMITS) -> Message:
    """`wire.decode`, after checking it agrees with `decode_python` on `frames`."""
    fast = _outcome(wire.decode, frames, limits)
    reference = _outcome(wire.decode_python, frames, limits)
    assert _same(fast, reference), (fast, reference)
    if fast[0] != "ok":
        raise fast[1]
    return fast[1]


def _encode_python(msg, limits):
    saved, wire._FAST = wire._FAST, None
    try:
        return wire.encode(msg, limits)
    finally:
        wire._FAST = saved


def encode_on_both_paths(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list:
    """`wire.encode`, after checking the C header packer gives msgpack's bytes (or the same error)."""
    fast = _outcome(wire.encode, msg, limits)
    reference = _outcome(_encode_python, msg, limits)
    assert _same(fast, reference), (fast, reference)
    if fast[0] != "ok":
        raise fast[1]
    return fast[1]


@pytest.fixture(autouse=True)
def _wire_cases_check_both_paths(monkeypatch):
    """The test_wire cases collected here call the comparing versions of decode and encode."""
    monkeypatch.setattr(test_wire, "decode", decode_on_both_paths)
    monkeypatch.setattr(test_wire, "encode", encode_on_both_paths)


# ---------------------------------------------------------------- the fast path is really used


def test_the_extension_is_loaded_and_recognises_every_kind():
    assert wire.DECODE_PATH == "c"
    for kind in Kind:
        frames = [bytes(f) for f in wire.encode(test_wire._message(kind))]
        assert FAST.parse(frames, DEFAULT_LIMITS.fast_params) is not None, kind


def test_received_zmq_frames_take_the_fast_path():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire-fast")
        b.connect("inproc://wire-fast")
        a.send_multipart(wire.encode(test_wire._message(Kind.REFINE_REQUEST)), copy=False)
        frames = b.recv_multipart(copy=False)
    finally:
        ctx.destroy(linger=0)
    assert FAST.parse(frames, DEFAULT_LIMITS.fast_params) is not None
    assert _summary(wire.decode(frames)) == _summary(wire.decode_python(frames))


def test_custom_dtype_whitelists_use_the_python_path():
    assert Limits(dtypes=frozenset({"<f4"})).fast_params is None
    assert Limits(max_frames=4).fast_params is not None


def test_environment_switch_forces_pure_python():
    code = "from spikevaediff.core import wire; print(wire.DECODE_PATH)"
    env = dict(os.environ, SPIKEVAEDIFF_PURE_PYTHON_WIRE="1")
    forced = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert forced.stdout.strip() == "python"
    env["SPIKEVAEDIFF_PURE_PYTHON_WIRE"] = "0"
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert default.stdout.strip() == "c"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_values_are_found_at_every_position(dtype):
    """The C check reads 8 bytes at a time: a bad value in any lane or in the tail is caught."""
    for size in (1, 2, 3, 5, 8, 9, 17):
        for position in range(size):
            for bad in (np.nan, np.inf, -np.inf):
                values = np.ones(size, dtype=dtype)
                values[position] = bad
                frames = [bytes(f) for f in wire.encode(Message(Kind.COUNTS, arrays={"counts": values}))]
                with pytest.raises(WireError, match="nonfinite"):
                    decode_on_both_paths(frames)
        extremes = np.array([np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).tiny, -0.0] * size,
                            dtype=dtype)
        frames = [bytes(f) for f in wire.encode(Message(Kind.COUNTS, arrays={"counts": extremes}))]
        assert FAST.parse(frames, DEFAULT_LIMITS.fast_params) is not None


# ---------------------------------------------------------------- fuzz

# Values a header field, a stamp, a meta entry or a shape may be replaced with.
ODD_VALUES = [None, True, False, 0, 1, -1, -2, 127, 128, -33, 255, 65536, 2 ** 31, 2 ** 62, 2 ** 63 - 1,
              2 ** 63, 2 ** 64 - 1, -(2 ** 63), 1.5, -0.0, 0.0, 1e308, float("nan"), float("inf"),
              float("-inf"), "", "x", "counts", "a" * 64, "a" * 65, "b\n", "é", "bad id!", b"bytes", [],
              [1], [[[]]], {}, {"state": "ready"}, {"a": {"b": {"c": {"d": {"e": 1}}}}},
              {"k": list(range(70))}, msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0)]
KEYS = ["v", "kind", "stream", "seq", "bin", "t0", "t1", "stamps", "wall_ns", "meta", "arrays"]
LIMITS = [DEFAULT_LIMITS, Limits(max_header_bytes=200), Limits(max_payload_bytes=100), Limits(max_ndim=2),
          Limits(max_frames=3), Limits(max_topic_bytes=10), Limits(max_stamps=1), Limits(max_meta_items=2),
          Limits(max_meta_depth=1), Limits(max_meta_depth=0), Limits(dtypes=frozenset({"|u1", "<f4"}))]


def _pack_pairs(pairs, single_float=False) -> bytes:
    """A msgpack map of `pairs` as given (duplicate keys allowed, unlike a dict)."""
    packer = msgpack.Packer(use_bin_type=True, use_single_float=single_float, datetime=False)
    return packer.pack_map_header(len(pairs)) + b"".join(packer.pack(k) + packer.pack(v) for k, v in pairs)


def _random_meta(rng, depth=0):
    choice = rng.integers(0, 9 if depth < 5 else 6)
    if choice < 6:
        return ODD_VALUES[int(rng.integers(0, 21))]  # numbers, None and bools
    if choice == 6:
        return str(rng.integers(0, 1000))
    if choice == 7:
        return [_random_meta(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {f"k{i}": _random_meta(rng, depth + 1) for i in range(int(rng.integers(0, 4)))}


def _small_arrays(rng, kind: Kind) -> dict:
    """Arrays of every kind, small (the fuzz makes thousands), in varied dtypes and sizes."""
    image = rng.integers(0, 256, (int(rng.integers(1, 5)), 3, 3), dtype=np.uint8)
    dtype = [np.float16, np.float32, np.float64, np.int32, np.uint8, np.bool_][int(rng.integers(0, 6))]
    return {
        Kind.COUNTS: {"counts": rng.normal(0, 1e3, int(rng.integers(0, 40))).astype(dtype)},
        Kind.PREVIEW: {"image": image, "latents": rng.normal(size=(2, 3)).astype(np.float32)},
        Kind.REFINE_REQUEST: {"image": image, "clip_vision": rng.normal(size=(5, 4)).astype(np.float32),
                              "clip_text": rng.normal(size=(3, 4)).astype(np.float16)},
        Kind.REFINED: {"image": image},
    }.get(kind, {})


def _base_frames(rng):
    kind = list(Kind)[int(rng.integers(0, len(Kind)))]
    msg = Message(kind, "session_7", seq=int(rng.integers(0, 1000)), bin_index=int(rng.integers(-1, 100)),
                  t_start=1.5, t_stop=1.5 + float(rng.random()), stamps={"replay_send": 123, "decoder_recv": 456},
                  meta={"state": "ready", "x": _random_meta(rng)}, arrays=_small_arrays(rng, kind))
    frames = [bytes(f) for f in wire.encode(msg, Limits(max_header_bytes=1 << 20))]
    return frames, msgpack.unpackb(frames[1], raw=False)


def _mutate(rng, frames, header):
    """One random change: a field, a key, an array spec, a payload, the topic or raw bytes.

    `header`: the decoded header of a valid message, or None (then only frame-level changes).
    """
    if not frames:
        return frames
    if header is None:
        header = {"arrays": []}
        what = [6, 7, 9][int(rng.integers(0, 3))]
    else:
        what = int(rng.integers(0, 12))
    pairs = list(header.items())
    single_float = False
    odd = ODD_VALUES[int(rng.integers(0, len(ODD_VALUES)))]
    if what == 0:  # a field gets an odd value
        index = int(rng.integers(0, len(pairs)))
        pairs[index] = (pairs[index][0], odd)
    elif what == 1:  # a key goes missing, is repeated, or an unknown/bytes/int key appears
        index = int(rng.integers(0, len(pairs)))
        change = int(rng.integers(0, 4))
        if change == 0:
            del pairs[index]
        elif change == 1:
            pairs.append((pairs[index][0], pairs[index][1] if rng.random() < 0.5 else odd))
        else:
            pairs.append(([b"seq", "extra", 7][int(rng.integers(0, 3))], 1))
        if rng.random() < 0.3:
            rng.shuffle(pairs)
    elif what == 2:  # stamps
        stamps = dict(header["stamps"])
        key = ["ok", "bad name", "x" * 33, "ok\n", b"raw", ""][int(rng.integers(0, 6))]
        stamps[key] = odd if rng.random() < 0.5 else 5
        if rng.random() < 0.2:
            stamps.update({f"s{i}": i for i in range(int(rng.integers(1, 40)))})
        pairs = [(k, stamps if k == "stamps" else v) for k, v in pairs]
    elif what == 3:  # meta
        meta = dict(header["meta"])
        meta[["x", "state", "deep", b"raw"][int(rng.integers(0, 4))]] = odd if rng.random() < 0.5 else _random_meta(rng)
        pairs = [(k, meta if k == "meta" else v) for k, v in pairs]
    elif what == 4 and header["arrays"]:  # an array spec
        specs = [dict(s) for s in header["arrays"]]
        spec = specs[int(rng.integers(0, len(specs)))]
        field = ["name", "dtype", "shape", "extra"][int(rng.integers(0, 4))]
        spec[field] = [odd, "<f4", "|u1", ">f4", "<f2", "|O", "image", "counts", [0, 2 ** 63], [],
                       [1, 2, 3, 4, 5], [-1]][int(rng.integers(0, 12))]
        if rng.random() < 0.2:
            specs.append(dict(spec))
        pairs = [(k, specs if k == "arrays" else v) for k, v in pairs]
    elif what == 5 and len(frames) > 2:  # a payload: NaN/inf, truncation, extension
        index = int(rng.integers(2, len(frames)))
        payload = bytearray(frames[index])
        if payload and rng.random() < 0.6:
            at = int(rng.integers(0, len(payload)))
            for spec in header["arrays"]:
                if spec["dtype"] in ("<f2", "<f4", "<f8") and len(payload) >= 8:
                    itemsize = int(spec["dtype"][2])
                    at -= at % itemsize
                    bad = np.array([[np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]], dtype=spec["dtype"])
                    payload[at:at + itemsize] = bad.tobytes()[:len(payload) - at]
                    break
        else:
            payload = payload[:int(rng.integers(0, len(payload) + 1))] + rng.bytes(int(rng.integers(0, 3)))
        return [*frames[:index], bytes(payload), *frames[index + 1:]]
    elif what == 6:  # topic
        topic = [b"", b"counts/", frames[0] + b"x", frames[0].upper(), b"x" * 200][int(rng.integers(0, 5))]
        return [topic, *frames[1:]]
    elif what == 7:  # frames missing or extra
        return frames[:int(rng.integers(0, len(frames)))] if rng.random() < 0.5 else [*frames, b"\x00" * 4]
    elif what == 8:  # floats as float32, ints as floats
        single_float = True
        if rng.random() < 0.5:
            pairs = [(k, float(v) if k in ("seq", "bin", "v") else v) for k, v in pairs]
        if rng.random() < 0.5:
            pairs = [(k, int(v) if k in ("t0", "t1") else v) for k, v in pairs]
    elif what == 9 and len(frames) > 1:  # raw header bytes: flips and truncation
        raw = bytearray(frames[1])
        for _ in range(int(rng.integers(1, 4))):
            if raw and rng.random() < 0.7:
                raw[int(rng.integers(0, len(raw)))] = int(rng.integers(0, 256))
            else:
                del raw[int(rng.integers(0, len(raw) + 1)):]
        return [frames[0], bytes(raw), *frames[2:]]
    if len(pairs) <= 1:  # no header to repack (a frame-level change was asked for and not possible)
        return frames
    elif what == 10:  # a stream id, with the topic to match (else the topic check stops it first)
        stream = ["bad id", "a" * 64, "a" * 65, "x\n", "é", "", "ok.id:1-2", "tab\t", "a/b"][int(rng.integers(0, 9))]
        pairs = [(k, stream if k == "stream" else v) for k, v in pairs]
        frames = [f"{header['kind']}/{stream}".encode(), *frames[1:]]
    # what 11 (and the cases that found nothing to change): the message as it was, repacked
    return [frames[0], _pack_pairs(pairs, single_float), *frames[2:]]


def _as_frame_type(rng, frames):
    kind = int(rng.integers(0, 4))
    if kind == 1:
        return [bytearray(f) for f in frames]
    if kind == 2:
        return [memoryview(f) for f in frames]
    if kind == 3:
        return [zmq.Frame(f) for f in frames]
    return frames


def test_fuzz_both_decode_paths_agree():
    rng = np.random.default_rng(20240611)
    reasons, fast_accepted = {}, 0
    for _ in range(3000):
        frames, header = _base_frames(rng)
        if rng.random() < 0.9:
            frames = _mutate(rng, frames, header)
        if rng.random() < 0.2:
            frames = _mutate(rng, frames, None)
        frames = _as_frame_type(rng, frames)
        limits = LIMITS[int(rng.integers(0, len(LIMITS)))] if rng.random() < 0.3 else DEFAULT_LIMITS
        try:
            decode_on_both_paths(frames, limits)
            reasons["ok"] = reasons.get("ok", 0) + 1
        except WireError as error:
            reasons[error.reason] = reasons.get(error.reason, 0) + 1
        if limits.fast_params is not None and FAST.parse(frames, limits.fast_params) is not None:
            fast_accepted += 1
    # the fuzz reaches both the accepting C path and most of the rejection reasons
    assert fast_accepted > 300 and reasons["ok"] >= fast_accepted
    assert len(set(reasons) - {"ok"}) >= 12, reasons


def test_fuzz_both_encode_paths_agree():
    rng = np.random.default_rng(5)
    odd_meta = [np.float32(1.5), np.int64(7), np.bool_(True), Kind.COUNTS, (1, "a"), {1: "int key"},
                b"bytes", 2 ** 64, -(2 ** 63) - 1, "\ud800", object(), float("nan")]
    outcomes = set()
    for _ in range(1500):
        meta = {"state": "ready", "x": _random_meta(rng)}
        if rng.random() < 0.3:
            meta["odd"] = odd_meta[int(rng.integers(0, len(odd_meta)))]
        stamps = {"a": 1, **({"b": np.int64(2)} if rng.random() < 0.2 else {}),
                  **({5: 1} if rng.random() < 0.1 else {})}
        msg = Message(list(Kind)[int(rng.integers(0, len(Kind)))], meta=meta, stamps=stamps,
                      seq=[0, 5, 2 ** 40, np.int64(3), True][int(rng.integers(0, 5))],
                      t_start=[0.0, 1.25, 3, np.float32(2.5)][int(rng.integers(0, 4))])
        try:
            encode_on_both_paths(msg)
            outcomes.add("ok")
        except WireError as error:
            outcomes.add(error.reason)
    assert {"ok", "field_type"} <= outcomes


def test_header_packer_matches_msgpack_for_every_int_and_length_form():
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1,
            -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, -(2 ** 63)]
    strings = ["", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65535, "a" * 65536, "ü" * 20]
    meta = {"state": "x", "ints": ints, "strings": strings, "list16": list(range(16)),
            "map16": {str(i): i for i in range(16)}, "floats": [0.1, -0.0, 1e-300, math.pi]}
    msg = Message(Kind.STATUS, "s", seq=2 ** 63 - 1, bin_index=-1, wall_ns=0, meta=meta,
                  stamps={"a": 0, "b": 2 ** 62})
    limits = Limits(max_header_bytes=1 << 20)
    frames = encode_on_both_paths(msg, limits)
    assert FAST.pack_header("status", "s", 0, -1, 0.0, 0.0, {}, 0, meta, []) is not None
    assert _summary(decode_on_both_paths(frames, limits)) == _summary(msg)
