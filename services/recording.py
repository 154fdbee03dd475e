"""The recorder's file: every preview and refined image of a live run, with its stamps, in one HDF5.

Layout (one group per stream kind; rows appended as messages arrive):

    /counts     seq, bin, frame, repeat, t0, t1, wall_ns, stamps/<stage>, hops/<hop>
    /preview    the same columns + image [N, H, W, 3] uint8 + stream (source service)
    /refined    the same columns + image [N, S, S, 3] uint8 + stream (which refiner instance)
    attrs       format, created, config (JSON), and, when the recorder stops cleanly, stats (JSON)

`stamps/<stage>` holds `time.monotonic_ns()` of each pipeline stage (-1 when the message did not
carry it); `hops/<hop>` the latency in milliseconds between two stamps (NaN when either is
missing). Every append ends with a flush, so a recorder killed mid-run leaves a file that opens
and holds every message written before the kill except, at worst, the one being written.
Images are stored one chunk per image (compressed lightly), created on the first message so a
refiner of any output size fits.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from spikevaediff.core.errors import UserError
from spikevaediff.core.wire import Kind, Message

FORMAT = "spikevaediff-recording/1"
GROUPS = {Kind.COUNTS: "counts", Kind.PREVIEW: "preview", Kind.REFINED: "refined"}
# Pipeline stages in path order; the stamps a message may carry.
STAGES = ("replay_send", "decoder_recv", "decoder_preview_send", "decoder_request_send",
          "refiner_recv", "refiner_send", "recorder_recv")
# Per-hop latencies (name -> (from stage, to stage)), all on one host's monotonic clock.
HOPS = {
    "transport": ("replay_send", "decoder_recv"),
    "decode": ("decoder_recv", "decoder_preview_send"),
    "preview_end_to_end": ("replay_send", "decoder_preview_send"),
    "request_transport": ("decoder_request_send", "refiner_recv"),
    "refine": ("refiner_recv", "refiner_send"),
    "refined_end_to_end": ("replay_send", "refiner_send"),
    "counts_to_recorder": ("replay_send", "recorder_recv"),
    "preview_to_recorder": ("decoder_preview_send", "recorder_recv"),
    "refined_to_recorder": ("refiner_send", "recorder_recv"),
}
_INT_COLUMNS = ("seq", "bin", "frame", "repeat", "wall_ns")
_FLOAT_COLUMNS = ("t0", "t1")


def hop_latencies_ms(stamps: dict) -> dict[str, float]:
    """Every hop whose two stamps are present, in milliseconds."""
    out = {}
    for hop, (start, stop) in HOPS.items():
        if start in stamps and stop in stamps:
            out[hop] = (int(stamps[stop]) - int(stamps[start])) / 1e6
    return out


class RecordingWriter:
    """Appends messages to one HDF5 file, flushing after each (see the module docstring)."""

    def __init__(self, path, config_json: str = "{}", image_compression: int = 1):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = h5py.File(self.path, "w")
        except OSError as exc:
            raise UserError(f"cannot create recording {self.path}: {exc}") from None
        self._compression = image_compression
        self._file.attrs["format"] = FORMAT
        self._file.attrs["created_wall_ns"] = time.time_ns()
        self._file.attrs["config"] = config_json
        self.counts = {name: 0 for name in GROUPS.values()}
        for name in GROUPS.values():
            self._make_group(name)
        self._file.flush()

    def _make_group(self, name: str) -> None:
        group = self._file.create_group(name)
        for column in _INT_COLUMNS:
            group.create_dataset(column, (0,), maxshape=(None,), dtype="i8", chunks=(256,))
        for column in _FLOAT_COLUMNS:
            group.create_dataset(column, (0,), maxshape=(None,), dtype="f8", chunks=(256,))
        group.create_dataset("stream", (0,), maxshape=(None,), dtype="S64", chunks=(256,))
        stamps = group.create_group("stamps")
        for stage in STAGES:
            stamps.create_dataset(stage, (0,), maxshape=(None,), dtype="i8", chunks=(256,))
        hops = group.create_group("hops")
        for hop in HOPS:
            hops.create_dataset(hop, (0,), maxshape=(None,), dtype="f8", chunks=(256,))

    def _append(self, dataset, value) -> None:
        n = dataset.shape[0]
        dataset.resize(n + 1, axis=0)
        dataset[n] = value

    def _image_dataset(self, group, image: np.ndarray):
        if "image" not in group:
            shape = image.shape
            group.create_dataset("image", (0, *shape), maxshape=(None, *shape), dtype="u1",
                                 chunks=(1, *shape), compression="gzip" if self._compression else None,
                                 compression_opts=self._compression or None)
        dataset = group["image"]
        if dataset.shape[1:] != image.shape:
            raise ValueError(f"image of shape {image.shape} after images of {dataset.shape[1:]}")
        return dataset

    def write(self, msg: Message) -> bool:
        """Append one counts/preview/refined message and flush. False for other kinds or a bad image."""
        name = GROUPS.get(msg.kind)
        if name is None:
            return False
        group = self._file[name]
        image = msg.arrays.get("image")
        if msg.kind is not Kind.COUNTS:
            if image is None:
                return False
            try:
                images = self._image_dataset(group, image)
            except ValueError:
                return False
            self._append(images, image)
        meta = msg.meta or {}
        values = {"seq": msg.seq, "bin": msg.bin_index, "frame": _as_int(meta.get("frame")),
                  "repeat": _as_int(meta.get("repeat")), "wall_ns": msg.wall_ns,
                  "t0": msg.t_start, "t1": msg.t_stop}
        for column, value in values.items():
            self._append(group[column], value)
        self._append(group["stream"], msg.stream.encode("ascii", "replace")[:64])
        for stage in STAGES:
            self._append(group["stamps"][stage], int(msg.stamps.get(stage, -1)))
        hops = hop_latencies_ms(msg.stamps)
        for hop in HOPS:
            self._append(group["hops"][hop], hops.get(hop, np.nan))
        self.counts[name] += 1
        self._file.flush()
        return True

    def set_stats(self, stats: dict) -> None:
        self._file.attrs["stats"] = json.dumps(stats, default=str)
        self._file.flush()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


def _as_int(value) -> int:
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else -1


def read_recording(path, images: bool = True) -> dict:
    """The recording as plain arrays: {group: {column: array, "stamps": {...}, "hops": {...}}}.

    `images=False` skips the image arrays (they can be large); "n_images" tells how many there are.
    A file cut short by a crash is read up to its shortest column.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UserError(f"recording not found: {path}")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"cannot open recording {path}: {exc}") from None
    with handle:
        if handle.attrs.get("format") != FORMAT:
            raise UserError(f"{path} is not a spikevaediff recording")
        out = {"attrs": {k: _attr(v) for k, v in handle.attrs.items()}}
        for name in GROUPS.values():
            group = handle[name]
            lengths = [group[c].shape[0] for c in (*_INT_COLUMNS, *_FLOAT_COLUMNS)]
            if "image" in group:
                lengths.append(group["image"].shape[0])
            n = min(lengths)
            data = {c: group[c][:n] for c in (*_INT_COLUMNS, *_FLOAT_COLUMNS)}
            data["stream"] = np.array([s.decode("ascii", "replace") for s in group["stream"][:n]])
            data["stamps"] = {s: group["stamps"][s][:n] for s in group["stamps"]}
            data["hops"] = {h: group["hops"][h][:n] for h in group["hops"]}
            data["n"] = n
            if images and "image" in group:
                data["image"] = group["image"][:n]
            out[name] = data
    return out


def _attr(value):
    return value.decode() if isinstance(value, bytes) else value
