"""One-frame envelopes: a whole multipart message packed into a single ZeroMQ frame.

Latest-wins lanes need ZeroMQ's CONFLATE option (the receiving socket keeps only the newest
message, overwritten by the I/O thread, so memory stays at one message and the consumer
always gets the newest), and CONFLATE does not support multipart messages. So on those
lanes the frames of `wire.encode` travel packed:

    topic  0x00  u32 part count  u64 length per part  [pad to 8]  part  [pad to 8]  part ...

little-endian, each part starting at a multiple of 8 bytes (so arrays stay aligned), no
padding after the last part. The topic still comes first, so SUB prefix filtering works.
`unpack_frames` returns zero-copy views into the received frame and checks every length.
"""
from __future__ import annotations

import struct

from .wire import DEFAULT_LIMITS, Limits, WireError

_ALIGN = 8
_COUNT = struct.Struct("<I")


def _padding(position: int) -> int:
    return -position % _ALIGN


def pack_frames(frames: list) -> bytearray:
    """`[topic, header, payload...]` as one buffer (copies the parts once)."""
    topic, parts = bytes(frames[0]), [memoryview(p) for p in frames[1:]]
    if b"\x00" in topic:
        raise WireError("topic", "topic may not contain NUL")
    out = bytearray(topic)
    out += b"\x00"
    out += _COUNT.pack(len(parts))
    out += struct.pack(f"<{len(parts)}Q", *(p.nbytes for p in parts))
    for part in parts:
        out += bytes(_padding(len(out)))
        out += part if part.ndim == 1 and part.format == "B" else part.cast("B")
    return out


def unpack_frames(frame, limits: Limits = DEFAULT_LIMITS) -> list[memoryview]:
    """The frames packed in `frame` (views, no copy), or `WireError("envelope")`."""
    view = memoryview(frame)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    nul = bytes(view[:limits.max_topic_bytes + 1]).find(b"\x00")
    if nul < 0:
        raise WireError("envelope", "no topic terminator within the topic limit")
    position = nul + 1
    if position + _COUNT.size > len(view):
        raise WireError("envelope", "truncated part count")
    (count,) = _COUNT.unpack_from(view, position)
    if not 1 <= count <= limits.max_frames - 1:
        raise WireError("envelope", f"{count} parts (expected 1..{limits.max_frames - 1})")
    position += _COUNT.size
    if position + 8 * count > len(view):
        raise WireError("envelope", "truncated length table")
    lengths = struct.unpack_from(f"<{count}Q", view, position)
    position += 8 * count
    parts = [view[:nul]]
    for length in lengths:
        position += _padding(position)
        if position + length > len(view):
            raise WireError("envelope", "a part runs past the end of the frame")
        parts.append(view[position:position + length])
        position += length
    if position != len(view):
        raise WireError("envelope", f"{len(view) - position} stray bytes after the last part")
    return parts
