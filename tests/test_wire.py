"""The wire protocol: round trips of every kind, and every kind of bad input rejected with a reason."""
from __future__ import annotations

import os
import pickle

import msgpack
import numpy as np
import pytest
import zmq

from spikevaediff.core.envelope import pack_frames, unpack_frames
from spikevaediff.core.wire import (ARRAY_RULES, SCHEMA_VERSION, Kind, Limits, Message, WireError,
                                    decode, encode, topic_for)

RNG = np.random.default_rng(7)


def _arrays_for(kind: Kind) -> dict[str, np.ndarray]:
    image = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return {
        Kind.COUNTS: {"counts": RNG.poisson(3, 480).astype(np.float32)},
        Kind.PREVIEW: {"image": image, "latents": RNG.standard_normal(16).astype(np.float32)},
        Kind.REFINE_REQUEST: {"image": image,
                              "clip_vision": RNG.standard_normal((257, 64)).astype(np.float32),
                              "clip_text": RNG.standard_normal((77, 64)).astype(np.float16)},
        Kind.REFINED: {"image": RNG.integers(0, 256, (512, 512, 3), dtype=np.uint8)},
        Kind.STATUS: {},
        Kind.END_OF_STREAM: {},
    }[kind]


def _message(kind: Kind = Kind.COUNTS, **changes) -> Message:
    meta = {"state": "ready", "units": 480, "areas": ["VISp", "VISl"], "speed": 1.5, "note": None}
    fields = dict(kind=kind, stream="session_715093703", seq=41, bin_index=1234, t_start=40.0,
                  t_stop=40.0333, stamps={"replay_send": 123456789, "decoder_recv": 123459999},
                  wall_ns=1_700_000_000_000_000_000, meta=meta, arrays=_arrays_for(kind))
    fields.update(changes)
    return Message(**fields)


def _wire(msg: Message) -> list[bytes]:
    return [bytes(f) for f in encode(msg)]


def _with_header(frames: list[bytes], **changes) -> list[bytes]:
    header = msgpack.unpackb(frames[1], raw=False)
    for key, value in changes.items():
        if value is _DELETE:
            del header[key]
        else:
            header[key] = value
    return [frames[0], msgpack.packb(header, use_bin_type=True), *frames[2:]]


_DELETE = object()


def _reason(frames, limits: Limits = Limits()) -> str:
    with pytest.raises(WireError) as info:
        decode(frames, limits)
    assert isinstance(info.value, ValueError)
    return info.value.reason


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind):
    msg = _message(kind)
    frames = _wire(msg)
    assert frames[0] == topic_for(kind, msg.stream)
    back = decode(frames)
    for name in ("kind", "stream", "seq", "bin_index", "t_start", "t_stop", "stamps", "wall_ns", "meta"):
        assert getattr(back, name) == getattr(msg, name), name
    assert list(back.arrays) == list(msg.arrays)
    for name, array in msg.arrays.items():
        assert back.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(back.arrays[name], array)
    assert set(ARRAY_RULES[kind]) - {"clip_text"} <= set(back.arrays)


def test_round_trip_through_real_zmq_frames_and_the_one_frame_envelope():
    msg = _message(Kind.REFINE_REQUEST)
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire-test")
        b.connect("inproc://wire-test")
        a.send_multipart(encode(msg), copy=False)
        back = decode(b.recv_multipart(copy=False))  # zmq.Frame objects, no copy
        a.send(pack_frames(encode(msg)))
        packed = decode(unpack_frames(b.recv(copy=False)))
    finally:
        ctx.destroy(linger=0)
    for got in (back, packed):
        np.testing.assert_array_equal(got.arrays["clip_vision"], msg.arrays["clip_vision"])
        np.testing.assert_array_equal(got.arrays["image"], msg.arrays["image"])
        assert got.seq == msg.seq and got.stamps == msg.stamps


def test_payload_frames_are_zero_copy_and_decoded_arrays_read_only():
    counts = np.arange(500, dtype=np.float32)
    frames = encode(Message(Kind.COUNTS, arrays={"counts": counts}))
    assert np.shares_memory(np.frombuffer(frames[2], dtype=np.float32), counts)
    back = decode(frames).arrays["counts"]
    assert np.shares_memory(back, counts)  # decode views the frame too
    assert not back.flags.writeable


def test_non_contiguous_and_big_endian_arrays_arrive_as_little_endian_values():
    base = np.arange(24, dtype=">f8").reshape(4, 6)
    msg = Message(Kind.COUNTS, arrays={"counts": np.arange(5.0), "view": base[:, ::2]})
    back = decode(_wire(msg))
    assert back.arrays["view"].dtype == np.dtype("<f8")
    np.testing.assert_array_equal(back.arrays["view"], base[:, ::2])


def test_stamp_records_monotonic_time():
    msg = Message(Kind.STATUS, meta={"state": "heartbeat"})
    first = msg.stamp("a")
    second = msg.stamp("b")
    assert second >= first and msg.stamps == {"a": first, "b": second}


# ---------------------------------------------------------------- bad input


def test_malformed_msgpack_is_rejected():
    good = _wire(_message())
    assert _reason([good[0], b"\xc1\xff\x00garbage"]) == "malformed"
    assert _reason([good[0], good[1][:-7]]) == "malformed"  # truncated
    assert _reason([good[0], good[1] + b"\x00"]) == "malformed"  # trailing bytes
    assert _reason([good[0], msgpack.packb([1, 2, 3])]) == "malformed"  # not a map
    assert _reason([good[0], msgpack.packb({1: 2})]) == "malformed"  # non-string key


def test_wrong_schema_version_is_rejected():
    good = _wire(_message())
    assert _reason(_with_header(good, v=SCHEMA_VERSION + 1)) == "version"
    assert _reason(_with_header(good, v="1")) == "version"
    assert _reason(_with_header(good, v=True)) == "version"


def test_unknown_kind_is_rejected():
    good = _wire(_message())
    assert _reason(_with_header(good, kind="exploit")) == "kind"
    assert _reason(_with_header(good, kind=["counts"])) == "kind"


def test_oversized_header_is_rejected_before_parsing():
    good = _wire(_message())
    limits = Limits(max_header_bytes=256)
    assert _reason(_with_header(good, meta={"junk": "x" * 300}), limits) == "header_size"
    with pytest.raises(WireError, match="header_size"):
        encode(_message(meta={"junk": "x" * 300}), limits)


def test_oversized_payload_is_rejected():
    small = Limits(max_payload_bytes=1024)
    frames = _wire(_message())  # 480 float32 = 1920 bytes
    assert _reason(frames, small) == "payload_size"
    with pytest.raises(WireError, match="payload_size"):
        encode(_message(), small)


@pytest.mark.parametrize("dtype", ["|O", "<c8", ">f4", "<M8[ns]", "<U4", "|V8"])
def test_dtypes_off_the_whitelist_are_rejected(dtype):
    frames = _wire(_message())
    header = msgpack.unpackb(frames[1], raw=False)
    header["arrays"][0]["dtype"] = dtype
    assert _reason(_with_header(frames, arrays=header["arrays"])) == "dtype"


def test_encode_refuses_object_arrays():
    with pytest.raises(WireError, match="dtype"):
        encode(Message(Kind.COUNTS, arrays={"counts": np.array([1, "a"], dtype=object)}))


def test_shape_that_disagrees_with_the_bytes_is_rejected():
    frames = _wire(_message())
    assert _reason([*frames[:2], frames[2][:-4]]) == "shape"
    header = msgpack.unpackb(frames[1], raw=False)
    header["arrays"][0]["shape"] = [481]
    assert _reason(_with_header(frames, arrays=header["arrays"])) == "shape"
    header["arrays"][0]["shape"] = [-480]
    assert _reason(_with_header(frames, arrays=header["arrays"])) == "shape"


def test_kind_specific_array_rules_are_enforced():
    image = np.zeros((64, 64, 3), dtype=np.float32)
    assert _reason(_wire(Message(Kind.PREVIEW, arrays={"image": image}))) == "dtype"
    flat = np.zeros((64, 64), dtype=np.uint8)
    assert _reason(_wire(Message(Kind.PREVIEW, arrays={"image": flat}))) == "shape"
    assert _reason(_wire(Message(Kind.COUNTS, arrays={"other": np.ones(3)}))) == "missing_array"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_payloads_are_rejected(bad, dtype):
    counts = np.ones(480, dtype=dtype)
    counts[123] = bad
    assert _reason(_wire(Message(Kind.COUNTS, arrays={"counts": counts}))) == "nonfinite"


def test_huge_but_finite_values_pass_the_finiteness_check():
    counts = np.full(100, 3e38, dtype=np.float32)  # the sum of squares overflows; values do not
    np.testing.assert_array_equal(decode(_wire(Message(Kind.COUNTS, arrays={"counts": counts})))
                                  .arrays["counts"], counts)


def test_non_finite_header_numbers_are_rejected():
    good = _wire(_message())
    assert _reason(_with_header(good, t0=float("nan"))) == "nonfinite"
    assert _reason(_with_header(good, meta={"gain": float("inf")})) == "nonfinite"


@pytest.mark.parametrize("field", ["seq", "bin", "t0", "t1", "stamps", "wall_ns", "meta", "arrays", "stream"])
def test_missing_fields_are_rejected(field):
    assert _reason(_with_header(_wire(_message()), **{field: _DELETE})) == "missing_field"


def test_status_needs_a_state():
    assert _reason(_wire(_message(Kind.STATUS, meta={"note": "hi"}))) == "missing_field"


@pytest.mark.parametrize("changes, reason", [
    ({"seq": "41"}, "field_type"),
    ({"seq": True}, "field_type"),
    ({"seq": -1}, "field_value"),
    ({"seq": 2 ** 63}, "field_value"),
    ({"bin": 1.5}, "field_type"),
    ({"t0": "now"}, "field_type"),
    ({"t0": 50.0}, "field_value"),  # t1 before t0
    ({"stamps": [1, 2]}, "field_type"),
    ({"stamps": {"bad stage!": 1}}, "field_value"),
    ({"stamps": {"replay_send": -5}}, "field_value"),
    ({"meta": "text"}, "field_type"),
    ({"meta": {"deep": [[[[[[1]]]]]]}}, "field_value"),
    ({"stream": "../etc/passwd"}, "field_value"),
    ({"extra": 1}, "unknown_field"),
    ({"arrays": {"counts": 1}}, "field_type"),
])
def test_wrong_field_types_and_values_are_rejected(changes, reason):
    assert _reason(_with_header(_wire(_message()), **changes)) == reason


def test_names_with_a_trailing_newline_are_rejected():
    # a `$` regex lets "x\n" through; the spec allows only the listed characters
    good = _wire(_message())
    stream = _message().stream + "\n"
    assert _reason([b"counts/" + stream.encode(), *_with_header(good, stream=stream)[1:]]) == "field_value"
    assert _reason(_with_header(good, stamps={"replay_send\n": 1})) == "field_value"
    with pytest.raises(WireError, match="field_value"):
        encode(_message(stream=stream))


def test_odd_keys_and_shapes_are_wire_errors_not_crashes():
    good = _wire(_message())
    assert _reason(_with_header(good, stamps={b"replay_send": 1})) == "field_value"  # bytes key
    header = msgpack.unpackb(good[1], raw=False)
    for shape in ([0, 2 ** 63], [0, 2 ** 62, 2 ** 62]):  # zero bytes, yet too big for numpy
        arrays = [*header["arrays"], {"name": "empty", "dtype": "<f4", "shape": shape}]
        assert _reason([*_with_header(good, arrays=arrays), b""]) == "shape"


def test_frame_count_and_topic_must_match_the_header():
    good = _wire(_message())
    assert _reason(good[:1]) == "frames"
    assert _reason(good[:2]) == "frames"  # header lists one array, none sent
    assert _reason([*good, good[2]]) == "frames"
    assert _reason([b"counts/another_stream", *good[1:]]) == "topic"
    assert _reason([b"preview/" + _message().stream.encode(), *good[1:]]) == "topic"


def test_array_listed_twice_is_rejected():
    frames = _wire(_message())
    header = msgpack.unpackb(frames[1], raw=False)
    arrays = header["arrays"] * 2
    assert _reason([*_with_header(frames, arrays=arrays), frames[2]]) == "array_spec"


def test_msgpack_ext_types_are_refused():
    frames = _wire(_message())
    header = msgpack.unpackb(frames[1], raw=False)
    header["meta"] = {"x": msgpack.ExtType(42, b"payload")}
    assert _reason([frames[0], msgpack.packb(header), frames[2]]) == "malformed"
    header["meta"] = {"x": msgpack.Timestamp(1, 0)}
    assert _reason([frames[0], msgpack.packb(header, datetime=False), frames[2]]) == "field_type"


class _Bomb:
    """Unpickling this would create a file: proof that nothing is ever unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_looking_input_is_rejected_and_never_unpickled(tmp_path):
    marker = str(tmp_path / "unpickled")
    bomb = pickle.dumps(_Bomb(marker))
    good = _wire(_message())
    assert _reason([good[0], bomb]) == "malformed"  # a pickle where the header should be
    assert _reason([good[0], pickle.dumps({"v": 1, "kind": "counts"})]) == "malformed"
    header = msgpack.unpackb(good[1], raw=False)
    header["arrays"][0].update(dtype="|O", shape=[1])
    assert _reason([*_with_header(good, arrays=header["arrays"])[:2], bomb]) == "dtype"
    assert not os.path.exists(marker)


def test_envelope_rejects_lies_about_lengths():
    packed = bytes(pack_frames(encode(_message())))
    assert len(unpack_frames(packed)) == 3
    for bad in (packed[:-1], packed + b"\x00", b"no terminator" * 20, packed[:12]):
        with pytest.raises(WireError) as info:
            unpack_frames(bad)
        assert info.value.reason == "envelope"


def test_random_corruption_only_ever_raises_wire_error():
    """Fuzz: flipped bytes, truncations and junk frames never escape as other exceptions."""
    rng = np.random.default_rng(0)
    good = _wire(_message(Kind.REFINE_REQUEST))
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(400):
        frames = [bytearray(f) for f in good]
        target = int(rng.integers(0, 2)) if rng.random() < 0.8 else int(rng.integers(0, len(frames)))
        frame = frames[target]
        for _ in range(int(rng.integers(1, 4))):
            if frame and rng.random() < 0.7:
                frame[int(rng.integers(0, len(frame)))] = int(rng.integers(0, 256))
            else:
                del frame[int(rng.integers(0, len(frame) + 1)):]
        if rng.random() < 0.1:
            frames.append(bytearray(rng.bytes(int(rng.integers(0, 64)))))
        try:
            decode([bytes(f) for f in frames])
            outcomes["ok"] += 1
        except WireError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 200


def test_encode_rejects_what_cannot_travel():
    with pytest.raises(WireError, match="field_value"):
        encode(Message(Kind.COUNTS, stream="has space", arrays={"counts": np.ones(2)}))
    with pytest.raises(WireError, match="array_spec"):
        encode(Message(Kind.COUNTS, arrays={"counts": np.ones(2), "bad-name": np.ones(2)}))
    with pytest.raises(WireError, match="frames"):
        encode(Message(Kind.COUNTS, arrays={f"a{i}": np.ones(1) for i in range(9)}))
    with pytest.raises(WireError, match="field_type"):
        encode(Message(Kind.STATUS, meta={"state": "x", "obj": object()}))
    with pytest.raises(ValueError):
        encode(Message("nonsense"))
