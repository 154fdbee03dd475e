"""The trained-model directory: what `train` writes and every service and `evaluate` reads.

    BUNDLE/
      manifest.json              format version, profile, models, units in order, binning, split,
                                 alphas, target shapes, metrics, package versions, file hashes
      ridges/<name>.safetensors  one RidgeRegression per target group (vdvae, clip_vision, ...)
      ridges/<name>.json         its sidecar (alpha, CV scores, shapes)
      <extra files>              anything else the trainer ships (e.g. a report), hashed too

The manifest is human-readable JSON with sorted keys. Loading checks the format version, that
every listed file is present with its recorded size (and hash), that each ridge's input width
equals the unit count and its output width the recorded target shape; and `check_units` checks
a session's units (id and order) against the ones the bundle was trained on.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import UserError, read_json
from .ridge import RidgeRegression

BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
RIDGE_DIR = "ridges"
_UNITS_PLACEHOLDER = "\u0000units\u0000"  # stands in for the unit list while dumping the rest
_RIDGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSIONED_PACKAGES = ("spikevaediff", "torch", "numpy", "scikit-learn", "safetensors",
                       "diffusers", "transformers", "pynwb")


def package_versions(names=_VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages a bundle depends on (absent ones are skipped)."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class BundleManifest:
    """Everything needed to reuse a trained model on a session and to say how it was made.

    units: (session_id, unit_id) in the column order of the ridges' inputs; unit_areas beside it.
    window: (start, stop) of a frame's counting window, seconds after frame onset.
    models: weight ids by key, e.g. {"vdvae": {"path": ..., "sha256": ...}, "clip": {...}}.
    target_shapes: per ridge name, the shape its flat output reshapes to (e.g. [257, 768]).
    files: filled by `write_bundle` (relative path -> {"bytes", "sha256"}).
    """

    profile: str
    units: list[tuple[str, int]]
    unit_areas: list[str] = field(default_factory=list)
    areas: list[str] = field(default_factory=list)
    sessions: list = field(default_factory=list)  # ids and paths of the pooled sessions
    movie: str = ""
    n_frames: int = 0
    window: tuple[float, float] = (0.0, 1 / 30)
    n_subbins: int = 1
    average_repeats: bool = False
    split: dict = field(default_factory=dict)  # {"name": "segments", ...params}
    weights_dir: str = ""
    models: dict = field(default_factory=dict)
    alphas: dict = field(default_factory=dict)  # filled from the ridges when left empty
    target_shapes: dict = field(default_factory=dict)
    training_metrics: dict = field(default_factory=dict)
    package_versions: dict = field(default_factory=package_versions)
    seed: int = 0
    created: str = field(default_factory=_now)
    extra: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    format_version: int = BUNDLE_FORMAT_VERSION

    def __post_init__(self):
        self.units = [(str(s), int(u)) for s, u in self.units]
        self.window = tuple(float(t) for t in self.window)
        if self.unit_areas and len(self.unit_areas) != len(self.units):
            raise UserError(f"manifest lists {len(self.units)} units but {len(self.unit_areas)} unit areas")

    @property
    def unit_keys(self) -> list[tuple[str, int]]:
        return list(self.units)

    def to_json(self) -> str:
        """Indented JSON with sorted keys; each (session, unit) pair on one line."""
        data = dataclasses.asdict(self)
        data["units"] = _UNITS_PLACEHOLDER
        data["window"] = list(self.window)
        text = json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n"
        pairs = ",\n".join(f"    {json.dumps([s, u])}" for s, u in self.units)
        return text.replace(json.dumps(_UNITS_PLACEHOLDER), f"[\n{pairs}\n  ]" if pairs else "[]")

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> "BundleManifest":
        if not isinstance(data, dict):
            raise UserError(f"{where} is not a JSON object")
        version = data.get("format_version")
        if version != BUNDLE_FORMAT_VERSION:
            raise UserError(f"{where} has bundle format version {version}; this spikevaediff "
                            f"reads version {BUNDLE_FORMAT_VERSION} (retrain or upgrade)")
        known = {f.name for f in dataclasses.fields(cls)}
        for required in ("profile", "units"):
            if required not in data:
                raise UserError(f"{where} lacks the required field '{required}'")
        units = data["units"]
        if not isinstance(units, list) or not all(
                isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], int) for pair in units):
            raise UserError(f"{where}: 'units' must be a list of [session_id, unit_id] pairs")
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = dict(kwargs.get("extra") or {})
        extra.update({k: v for k, v in data.items() if k not in known})  # newer optional fields
        kwargs["extra"] = extra
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where} has a malformed field ({exc})") from None


@dataclass
class Bundle:
    """A loaded bundle: its manifest and one fitted RidgeRegression per target group."""

    path: Path
    manifest: BundleManifest
    ridges: dict[str, RidgeRegression]

    def ridge(self, name: str) -> RidgeRegression:
        if name not in self.ridges:
            raise UserError(f"bundle {self.path} has no '{name}' ridge "
                            f"(it has: {', '.join(sorted(self.ridges)) or 'none'})")
        return self.ridges[name]

    def file(self, relpath: str) -> Path:
        """Path of an extra file shipped in the bundle."""
        if relpath not in self.manifest.files:
            raise UserError(f"bundle {self.path} has no file '{relpath}'")
        return self.path / relpath

    def check_units(self, unit_keys) -> None:
        """UserError unless `unit_keys` [(session_id, unit_id), ...] equal the bundle's, in order."""
        expected = self.manifest.units
        given = [(str(s), int(u)) for s, u in unit_keys]
        if given == expected:
            return
        head = f"the session's units do not match bundle {self.path}"
        if len(given) != len(expected):
            missing = [k for k in expected if k not in set(given)]
            detail = (f"the bundle was trained on {len(expected)} units, the session gives "
                      f"{len(given)}")
            if missing:
                detail += f"; first bundle unit not in the session: {missing[0]}"
            raise UserError(f"{head}: {detail}")
        first = next(i for i, (a, b) in enumerate(zip(expected, given)) if a != b)
        if sorted(given) == sorted(expected):
            raise UserError(f"{head}: same {len(expected)} units in a different order (first "
                            f"difference at position {first}: bundle {expected[first]}, session "
                            f"{given[first]}); reorder with Bundle.unit_order")
        raise UserError(f"{head}: unit #{first} is {given[first]} in the session but "
                        f"{expected[first]} in the bundle ({len(expected)} units each)")

    def unit_order(self, unit_keys) -> np.ndarray:
        """Indices into `unit_keys` that put a session's units in the bundle's order.

        `counts[:, bundle.unit_order(keys)]` feeds the ridges; UserError if a unit is missing."""
        position = {(str(s), int(u)): i for i, (s, u) in enumerate(unit_keys)}
        missing = [k for k in self.manifest.units if k not in position]
        if missing:
            raise UserError(f"{len(missing)} of the {len(self.manifest.units)} units of bundle "
                            f"{self.path} are not in the session (first: {missing[0]})")
        return np.asarray([position[k] for k in self.manifest.units], dtype=np.int64)


def write_bundle(directory, manifest: BundleManifest, ridges: dict[str, RidgeRegression],
                 extra_files: dict[str, Path] | None = None, overwrite: bool = False) -> Path:
    """Write a bundle directory atomically (built beside it, then renamed into place).

    `extra_files` maps a relative name inside the bundle to a file to copy there. An existing
    bundle at `directory` is replaced only with `overwrite=True`; any other existing non-empty
    directory is refused.
    """
    directory = Path(directory)
    _check_writable(directory, overwrite)
    if not ridges:
        raise UserError("a bundle needs at least one ridge")
    for name, ridge in ridges.items():
        if not _RIDGE_NAME.match(name):
            raise UserError(f"ridge name '{name}' must be lower-case letters, digits and _")
        if ridge.n_features_in_ != len(manifest.units):
            raise UserError(f"ridge '{name}' takes {ridge.n_features_in_} inputs but the manifest "
                            f"lists {len(manifest.units)} units")
        _check_target_shape(name, ridge, manifest.target_shapes, "manifest")
    extra_files = {str(k): Path(v) for k, v in (extra_files or {}).items()}
    for rel, src in extra_files.items():
        _check_relpath(rel)
        if not src.is_file():
            raise UserError(f"extra file {src} for the bundle does not exist")

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        manifest = dataclasses.replace(manifest, files={}, alphas=dict(manifest.alphas))
        written = []
        for name, ridge in sorted(ridges.items()):
            weights = ridge.save(staging / RIDGE_DIR / f"{name}.safetensors")
            written += [weights, weights.with_suffix(".json")]
            manifest.alphas.setdefault(name, _alpha_value(ridge.alpha_))
        for rel, src in extra_files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            written.append(target)
        manifest.files = {f.relative_to(staging).as_posix(): _file_record(f) for f in written}
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_manifest(directory, verify_hashes: bool = False) -> BundleManifest:
    """A bundle's manifest with every file it lists checked (sizes; hashes on request), without
    loading any weights: cheap enough for a launcher to validate its inputs up front."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"bundle {directory} does not exist (train one with `spikevaediff train`)")
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise UserError(f"{directory} is not a bundle: {MANIFEST_NAME} is missing")
    data = read_json(manifest_path, "bundle manifest")
    manifest = BundleManifest.from_dict(data, where=str(manifest_path))
    for rel, record in sorted(manifest.files.items()):
        _check_relpath(rel)
        _verify_file(directory / rel, record, verify_hashes)
    return manifest


def load_bundle(directory, device: str = "cpu", verify_hashes: bool = True) -> Bundle:
    """Read and validate a bundle; UserError naming the problem when anything is off."""
    directory = Path(directory)
    manifest = read_manifest(directory, verify_hashes)
    ridges = {}
    for rel in sorted(manifest.files):
        parts = PurePosixPath(rel)
        if parts.parent.as_posix() == RIDGE_DIR and parts.suffix == ".safetensors":
            ridge = RidgeRegression.load(directory / rel, device=device)
            name = parts.stem
            if ridge.n_features_in_ != len(manifest.units):
                raise UserError(f"bundle {directory}: ridge '{name}' takes {ridge.n_features_in_} "
                                f"inputs but the manifest lists {len(manifest.units)} units")
            _check_target_shape(name, ridge, manifest.target_shapes, f"bundle {directory}")
            ridges[name] = ridge
    if not ridges:
        raise UserError(f"bundle {directory} lists no ridge weights")
    return Bundle(path=directory, manifest=manifest, ridges=ridges)


# --------------------------------------------------------------------------------- helpers
def _check_writable(directory: Path, overwrite: bool) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise UserError(f"cannot write a bundle to {directory}: it is a file")
    if not any(directory.iterdir()):
        directory.rmdir()
        return
    if not (directory / MANIFEST_NAME).is_file():
        raise UserError(f"{directory} exists and is not a bundle; choose another --out")
    if not overwrite:
        raise UserError(f"bundle {directory} already exists (pass overwrite to replace it)")


def _check_relpath(rel: str) -> None:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel in ("", MANIFEST_NAME):
        raise UserError(f"bundle file name '{rel}' must be a relative path inside the bundle")


def _check_target_shape(name: str, ridge: RidgeRegression, shapes: dict, where: str) -> None:
    if name in shapes and math.prod(shapes[name]) != ridge.n_targets_:
        raise UserError(f"{where}: ridge '{name}' predicts {ridge.n_targets_} values but its "
                        f"target shape {list(shapes[name])} holds {math.prod(shapes[name])}")


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_file(path: Path, record: dict, verify_hashes: bool) -> None:
    if not path.is_file():
        raise UserError(f"bundle file {path} is missing")
    if not isinstance(record, dict) or "bytes" not in record:
        raise UserError(f"manifest entry for {path.name} is malformed")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise UserError(f"bundle file {path} is corrupt: {size} bytes, manifest says {record['bytes']}")
    if verify_hashes and record.get("sha256") and _sha256(path) != record["sha256"]:
        raise UserError(f"bundle file {path} is corrupt: its sha256 differs from the manifest")


def _alpha_value(alpha):
    return float(alpha) if np.ndim(alpha) == 0 else [float(a) for a in np.ravel(alpha)]


def _jsonable(value):
    """Plain JSON types for numpy scalars/arrays, tuples and paths inside the manifest."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
