"""Lanes: how protocol messages travel between services, with their delivery rules.

- `LOSSLESS` (spike counts): an XPUB with `XPUB_NODROP` and a bounded queue. A send blocks
  while a subscriber is behind, up to `send_timeout_ms`; a send that times out reaches no
  subscriber (all or none), is counted, and shows up downstream as a sequence gap.
  Before the first message the sender waits for its expected subscribers to say hello
  (`wait_for_subscribers`), so a slow joiner loses nothing.
- `LATEST` (previews, refined images): sends never block; messages travel packed in one frame
  (core.envelope) so receivers can use ZeroMQ's CONFLATE: the socket holds only the newest
  message, replaced by the I/O thread as new ones arrive, so memory stays at one message
  and a slow consumer always gets the newest. Messages it never saw show up as sequence
  gaps and are counted. A receiver that wants every message (the recorder) turns conflate
  off and gets a bounded queue instead; overflow there is counted as gaps too.
  libzmq also conflates the subscription pipe of such a socket, so a conflating receiver
  subscribes to exactly one topic and says no hello (latest lanes promise no delivery).
- Work sharing (refine requests to one or more refiners): `WorkDispatcher` keeps only the
  newest request and hands it to the next refiner that asks (`WorkFetcher`); it never blocks,
  and every request replaced before a refiner took it is counted.

Hello: a receiver with a `name` subscribes, after its data topics, to `HELLO_PREFIX + name`.
ZeroMQ forwards subscriptions to the XPUB in order, so once the publisher sees the hello,
the receiver's data subscriptions are in place and nothing sent afterwards is lost.
Receivers validate every message (core.wire.decode); bad ones are counted per reason,
logged (first of each reason, then every 100th) and skipped; a receiver never raises on input.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import zmq

from spikevaediff.core.envelope import pack_frames, unpack_frames
from spikevaediff.core.errors import UserError
from spikevaediff.core.wire import DEFAULT_LIMITS, Kind, Limits, Message, WireError, decode, encode, topic_for

from .transport import Endpoint, Network

log = logging.getLogger("spikevaediff.lanes")

LOSSLESS = "lossless"
LATEST = "latest"
LANES = (LOSSLESS, LATEST)
# Sorts after every data topic, so ZeroMQ (which replays subscriptions in byte order on
# reconnect) always delivers the data subscriptions first.
HELLO_PREFIX = b"\xffhello/"
DEFAULT_HWM = {LOSSLESS: 1000, LATEST: 4}
# ZMTP heartbeats: a peer that vanished without closing (host down, cable out) is cut off
# after 5 s, so its full queue cannot hold up the lossless lane forever.
_HEARTBEAT = {zmq.HEARTBEAT_IVL: 1000, zmq.HEARTBEAT_TIMEOUT: 5000, zmq.HEARTBEAT_TTL: 5000}
_LOG_EVERY = 100
# Plain ints: flag arithmetic on pyzmq's enums costs about a microsecond per frame.
_SNDMORE, _NOBLOCK, _POLLIN = int(zmq.SNDMORE), int(zmq.NOBLOCK), int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


@dataclass
class LaneStats:
    """Counters of one socket. `dropped` = missing (never arrived) + superseded (replaced unseen)."""

    sent: int = 0
    send_timeouts: int = 0
    received: int = 0
    bad: Counter = field(default_factory=Counter)
    gaps: int = 0
    missing: int = 0
    superseded: int = 0
    restarts: int = 0
    duplicates: int = 0
    first_seq: dict = field(default_factory=dict)  # "kind/stream" -> first seq this receiver saw

    @property
    def dropped(self) -> int:
        return self.missing + self.superseded

    def as_dict(self) -> dict:
        return {"sent": self.sent, "send_timeouts": self.send_timeouts, "received": self.received,
                "bad": dict(self.bad), "bad_total": sum(self.bad.values()), "gaps": self.gaps,
                "missing": self.missing, "superseded": self.superseded, "dropped": self.dropped,
                "restarts": self.restarts, "duplicates": self.duplicates,
                "first_seq": dict(self.first_seq)}


def _check_lane(lane: str) -> None:
    if lane not in LANES:
        raise UserError(f"unknown lane '{lane}' (choose from {', '.join(LANES)})")


def _as_topic(topic) -> bytes:
    if isinstance(topic, bytes):
        return topic
    if isinstance(topic, Kind):
        return topic_for(topic)
    return str(topic).encode()


class Publisher:
    """Sends messages on one lane; tracks which named receivers are listening."""

    def __init__(self, network: Network, endpoints: Endpoint | list[Endpoint], lane: str = LOSSLESS,
                 hwm: int | None = None, send_timeout_ms: int = 1000, limits: Limits = DEFAULT_LIMITS):
        _check_lane(lane)
        self.lane = lane
        self.limits = limits
        self.stats = LaneStats()
        self._subscribers: Counter = Counter()
        self._next_subscription_check = 0.0
        options = {zmq.SNDHWM: hwm or DEFAULT_HWM[lane], zmq.XPUB_VERBOSER: 1, zmq.LINGER: 2000,
                   **_HEARTBEAT}
        if lane == LOSSLESS:
            options[zmq.XPUB_NODROP] = 1
            options[zmq.SNDTIMEO] = int(send_timeout_ms)
        self.socket = network.socket(zmq.XPUB, endpoints, options)

    @property
    def subscribers(self) -> set[str]:
        """Names of the receivers that said hello and have not left."""
        return {name for name, count in self._subscribers.items() if count > 0}

    def poll_subscriptions(self, timeout_ms: int = 0) -> None:
        """Read pending (un)subscription messages; waits up to `timeout_ms` for the first."""
        if timeout_ms == 0 and not self.socket.getsockopt(_EVENTS) & _POLLIN:
            return  # the common case on every send: nothing new, no poller needed
        while self.socket.poll(timeout_ms, zmq.POLLIN):
            timeout_ms = 0
            event = self.socket.recv()
            if event[1:].startswith(HELLO_PREFIX):
                name = event[1 + len(HELLO_PREFIX):].decode("utf-8", "replace")
                self._subscribers[name] += 1 if event[0] == 1 else -1

    def wait_for_subscribers(self, expected: Iterable[str] | int, timeout_s: float = 10.0) -> set[str]:
        """Block until every expected receiver (names, or a number of them) has said hello."""
        deadline = time.monotonic() + timeout_s
        wanted = expected if isinstance(expected, int) else set(expected)

        def satisfied() -> bool:
            have = self.subscribers
            return len(have) >= wanted if isinstance(wanted, int) else wanted <= have

        while not satisfied():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                want = wanted if isinstance(wanted, int) else sorted(wanted)
                raise UserError(f"waited {timeout_s:g} s for subscribers {want}; "
                                f"only {sorted(self.subscribers)} said hello")
            self.poll_subscriptions(min(left_ms, 100))
        return self.subscribers

    def send(self, msg: Message) -> bool:
        """Encode and send. False when a lossless send timed out (counted); never raises on a slow peer."""
        frames = encode(msg, self.limits)
        now = time.monotonic()
        if now >= self._next_subscription_check:  # joins/leaves matter at human time scales
            self._next_subscription_check = now + 0.05
            self.poll_subscriptions()
        try:
            if self.lane == LATEST:  # never blocks: a full queue drops this message (seen as a gap)
                self.socket.send(pack_frames(frames), _NOBLOCK)
            else:
                # send_multipart's per-frame type checks and enum flag arithmetic cost more
                # than the send itself for small messages; the frames come from encode. A
                # timeout can only hit the first frame (libzmq admits a message whole).
                send = self.socket.send
                for frame in frames[:-1]:
                    send(frame, _SNDMORE, copy=False)
                send(frames[-1], 0, copy=False)
        except zmq.Again:
            self.stats.send_timeouts += 1
            log.warning("%s send timed out (seq %d): a subscriber is not keeping up", msg.topic, msg.seq)
            return False
        self.stats.sent += 1
        return True

    def close(self, linger_ms: int = 2000) -> None:
        self.socket.close(linger=linger_ms)


class Receiver:
    """Receives, validates and sequence-checks messages from one or more publishers."""

    def __init__(self, network: Network, endpoints: Endpoint | list[Endpoint],
                 topics: Iterable = (b"",), lane: str = LOSSLESS, name: str | None = None,
                 hwm: int | None = None, conflate: bool | None = None,
                 limits: Limits = DEFAULT_LIMITS):
        """`topics`: kinds or topic prefixes (b"" = everything). `name`: say hello under it.
        `conflate` (latest lane only, default on): keep just the newest message (one topic,
        no name; see below); off gives a queue of `hwm` messages."""
        _check_lane(lane)
        if conflate and lane != LATEST:
            raise UserError("conflate applies to the latest lane only")
        self.lane = lane
        self.conflate = lane == LATEST and conflate is not False
        topics = list(topics)
        if self.conflate and (len(topics) != 1 or name):
            # libzmq conflates the subscription pipe too: only the last subscription would
            # reach the publisher, so a conflating receiver has one topic and no hello.
            raise UserError("a conflating (latest-wins) receiver takes exactly one topic and no name")
        self.limits = limits
        self.name = name
        self.stats = LaneStats()
        self._last_seq: dict[tuple, int] = {}
        self._rcvtimeo = -1
        # ZeroMQ's own ceiling: frames far beyond our limits never reach Python (the peer is
        # cut off); frames up to it arrive and are counted as bad.
        max_frame = 4 * max(limits.max_payload_bytes, limits.max_header_bytes)
        if lane == LATEST:  # one frame carries every part
            max_frame = limits.max_frames * max_frame
        options = {zmq.RCVHWM: hwm or DEFAULT_HWM[LATEST if self.conflate else LOSSLESS],
                   zmq.LINGER: 0, zmq.MAXMSGSIZE: max_frame, **_HEARTBEAT}
        if self.conflate:
            options[zmq.CONFLATE] = 1
        self.socket = network.socket(zmq.SUB, endpoints, options)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, _as_topic(topic))
        if name:  # after the data topics: see the module docstring
            self.socket.setsockopt(zmq.SUBSCRIBE, HELLO_PREFIX + name.encode())

    def _reject(self, error: WireError) -> None:
        self.stats.bad[error.reason] += 1
        count = self.stats.bad[error.reason]
        if count == 1 or count % _LOG_EVERY == 0:
            log.warning("dropped a bad message (%s; %d so far): %s", error.reason, count, error)

    def _track(self, msg: Message) -> None:
        key = (msg.kind, msg.stream)
        last = self._last_seq.get(key)
        if last is None:
            self.stats.first_seq[f"{msg.kind.value}/{msg.stream}"] = msg.seq
        elif msg.seq == last:
            self.stats.duplicates += 1
        elif msg.seq < last:
            self.stats.restarts += 1  # the sender restarted its count
            log.warning("%s/%s restarted at seq %d (was %d)", msg.kind.value, msg.stream, msg.seq, last)
        elif msg.seq > last + 1:
            self.stats.gaps += 1
            self.stats.missing += msg.seq - last - 1
            # expected on a latest-wins lane (that is how drops show); news on the lossless one
            level = logging.WARNING if self.lane == LOSSLESS else logging.DEBUG
            log.log(level, "%s/%s gap: %d message(s) missing before seq %d",
                    msg.kind.value, msg.stream, msg.seq - last - 1, msg.seq)
        self._last_seq[key] = msg.seq

    def _receive_frames(self, flags: int = 0) -> list:
        """One message's frames as zero-copy `zmq.Frame`s.

        A Frame knows whether more parts follow, which saves a getsockopt(RCVMORE) per
        frame (the dearest call on this path for small messages).
        """
        recv = self.socket.recv
        frame = recv(flags, copy=False)
        frames = [frame]
        while frame.more:
            frame = recv(0, copy=False)
            frames.append(frame)
        return frames

    def _accept(self, frames: list) -> Message | None:
        try:
            if self.lane == LATEST:
                if len(frames) != 1:
                    raise WireError("envelope", f"{len(frames)} frames on a one-frame lane")
                frames = unpack_frames(frames[0], self.limits)
            msg = decode(frames, self.limits)
        except WireError as error:
            self._reject(error)
            return None
        self.stats.received += 1
        self._track(msg)
        return msg

    def recv(self, timeout_ms: int | None = 1000) -> Message | None:
        """The next valid message, or None after `timeout_ms` (None: forever) without one.

        Bad messages are counted and skipped.
        """
        start = time.monotonic()
        wait_ms = -1 if timeout_ms is None else int(timeout_ms)
        while True:
            if wait_ms != self._rcvtimeo:  # a blocking recv with a timeout: no poller per call
                self.socket.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo = wait_ms
            try:
                frames = self._receive_frames()
            except zmq.Again:
                return None
            msg = self._accept(frames)
            if msg is not None:
                return msg
            if timeout_ms is not None:
                wait_ms = max(0, int(timeout_ms - (time.monotonic() - start) * 1000))

    def recv_latest(self, timeout_ms: int = 1000) -> Message | None:
        """The newest valid message available: waits for one, then drains the queue.

        Valid messages passed over for a newer one are counted in `stats.superseded`.
        """
        newest = self.recv(timeout_ms)
        if newest is None:
            return None
        while self.socket.getsockopt(_EVENTS) & _POLLIN:
            msg = self._accept(self._receive_frames(_NOBLOCK))
            if msg is not None:
                self.stats.superseded += 1
                newest = msg
        return newest

    def close(self) -> None:
        self.socket.close(linger=0)


class WorkDispatcher:
    """Hands the newest request to whichever worker asks next; never blocks the caller.

    Workers (`WorkFetcher`) connect to a ROUTER and send "ready"; each gets at most one
    request per ready, so queues stay at one message per worker.
    """

    def __init__(self, network: Network, endpoints: Endpoint | list[Endpoint],
                 limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self.stats = LaneStats()
        self.socket = network.socket(zmq.ROUTER, endpoints,
                                     {zmq.LINGER: 0, zmq.ROUTER_MANDATORY: 1, **_HEARTBEAT})
        self._pending: list | None = None  # encoded frames of the newest request
        self._idle: list[bytes] = []  # workers that asked and are waiting

    def offer(self, msg: Message) -> None:
        """Make `msg` the request to hand out next (a request not yet taken is dropped, counted)."""
        frames = encode(msg, self.limits)  # fails here, in the caller, if it cannot travel
        if self._pending is not None:
            self.stats.superseded += 1
        self._pending = frames
        self.pump()

    def pump(self) -> None:
        """Collect "ready" from workers and hand out the pending request if someone waits."""
        while self.socket.poll(0, zmq.POLLIN):
            parts = self.socket.recv_multipart()
            if len(parts) == 2 and parts[1] == b"ready" and parts[0] not in self._idle:
                self._idle.append(parts[0])
        while self._pending is not None and self._idle:
            worker = self._idle.pop(0)
            try:
                self.socket.send_multipart([worker, *self._pending], flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:  # the worker went away (or is wedged): try the next one
                continue
            self.stats.sent += 1
            self._pending = None

    @property
    def waiting_workers(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        self.socket.close(linger=0)


class WorkFetcher:
    """A worker's side of `WorkDispatcher`: ask for the newest request, wait for it.

    One "ready" is outstanding at a time; it is repeated after `reask_s` without an answer,
    in case the dispatcher restarted and forgot it.
    """

    def __init__(self, network: Network, endpoints: Endpoint | list[Endpoint],
                 limits: Limits = DEFAULT_LIMITS, reask_s: float = 2.0):
        self.limits = limits
        self.reask_s = reask_s
        self.stats = LaneStats()
        self.socket = network.socket(zmq.DEALER, endpoints, {zmq.LINGER: 0, **_HEARTBEAT})
        self._asked_at: float | None = None

    def _ask(self) -> None:
        now = time.monotonic()
        if self._asked_at is None or now - self._asked_at > self.reask_s:
            self.socket.send(b"ready")
            self._asked_at = now

    def fetch(self, timeout_ms: int = 1000) -> Message | None:
        """The newest request (validated), or None after `timeout_ms`; bad ones are counted and skipped."""
        self._ask()
        deadline = time.monotonic() + timeout_ms / 1000
        newest = None
        while newest is None or self.socket.poll(0, zmq.POLLIN):
            if newest is None:
                left_ms = max(0, int((deadline - time.monotonic()) * 1000))
                if not self.socket.poll(left_ms, zmq.POLLIN):
                    return None
            frames = self.socket.recv_multipart(copy=False)
            self._asked_at = None  # answered: the next fetch asks again
            try:
                msg = decode(frames, self.limits)
            except WireError as error:
                self.stats.bad[error.reason] += 1
                log.warning("dropped a bad request (%s): %s", error.reason, error)
                if newest is None:
                    self._ask()
                continue
            self.stats.received += 1
            if newest is not None:  # a second answer to a repeated "ready": keep the newest
                self.stats.superseded += 1
            newest = msg
        return newest

    def close(self) -> None:
        self.socket.close(linger=0)
