"""The model bundle: round trip, unit checks, and clear errors for damaged bundles."""
import json

import numpy as np
import pytest

from spikevaediff.core.bundle import (BUNDLE_FORMAT_VERSION, BundleManifest, load_bundle,
                                      write_bundle)
from spikevaediff.core.errors import UserError
from spikevaediff.core.ridge import RidgeRegression

UNITS = [("715093703", 950910352), ("715093703", 950910364), ("719161530", 950911932),
         ("719161530", 950911940), ("719161530", 950912001)]


def _ridges(rng):
    x = rng.poisson(2.0, size=(60, len(UNITS))).astype(float)
    return x, {
        "vdvae": RidgeRegression(alphas=(1.0, 10.0, 100.0), cv=3).fit(x, rng.normal(size=(60, 12))),
        "clip_vision": RidgeRegression(alpha=60_000.0, low_rank=True).fit(x, rng.normal(size=(60, 3 * 4))),
    }


def _manifest(**changes):
    base = dict(profile="tiny", units=UNITS, unit_areas=["VISp", "VISp", "VISl", "VISl", "VISl"],
                areas=["VISl", "VISp"], sessions=[{"id": "715093703", "path": "a.nwb"},
                                                  {"id": "719161530", "path": "b.nwb"}],
                movie="natural_movie_one", window=(0.03, 0.0633), n_subbins=2,
                split={"name": "segments", "gap": 30}, models={"vdvae": {"sha256": "ab12"}},
                target_shapes={"vdvae": [12], "clip_vision": [3, 4]},
                training_metrics={"vdvae": {"cv_r2": 0.1}}, seed=7)
    base.update(changes)
    return BundleManifest(**base)


@pytest.fixture
def bundle_dir(tmp_path):
    rng = np.random.default_rng(0)
    x, ridges = _ridges(rng)
    extra = tmp_path / "notes.md"
    extra.write_text("trained for a test\n")
    out = write_bundle(tmp_path / "bundle", _manifest(), ridges, extra_files={"docs/notes.md": extra})
    return out, x, ridges


def test_round_trip(bundle_dir):
    path, x, ridges = bundle_dir
    bundle = load_bundle(path)
    m = bundle.manifest
    assert m.format_version == BUNDLE_FORMAT_VERSION
    assert m.units == UNITS and m.window == (0.03, 0.0633) and m.n_subbins == 2
    assert m.split == {"name": "segments", "gap": 30} and m.seed == 7
    assert m.alphas["vdvae"] == ridges["vdvae"].alpha_ and m.alphas["clip_vision"] == 60_000.0
    assert "torch" in m.package_versions and m.created
    assert set(bundle.ridges) == {"vdvae", "clip_vision"}
    assert bundle.ridges["clip_vision"].is_low_rank
    for name, ridge in ridges.items():
        np.testing.assert_allclose(bundle.ridge(name).predict(x), ridge.predict(x), rtol=1e-5, atol=1e-5)
    assert bundle.file("docs/notes.md").read_text() == "trained for a test\n"
    text = (path / "manifest.json").read_text()
    assert list(json.loads(text)) == sorted(json.loads(text))  # sorted keys, readable
    bundle.check_units(list(UNITS))  # the same units in the same order pass
    with pytest.raises(UserError, match="no 'clip_text'"):
        bundle.ridge("clip_text")


def test_check_units_rejects_mismatches_with_a_clear_message(bundle_dir):
    bundle = load_bundle(bundle_dir[0])
    with pytest.raises(UserError, match="5 units, the session gives 4.*\\(('719161530', 950912001)\\)"):
        bundle.check_units(UNITS[:4])
    swapped = [UNITS[1], UNITS[0]] + UNITS[2:]
    with pytest.raises(UserError, match="different order.*position 0"):
        bundle.check_units(swapped)
    other = UNITS[:2] + [("719161530", 1)] + UNITS[3:]
    with pytest.raises(UserError, match="unit #2"):
        bundle.check_units(other)
    # A session listing the same units in another order can be reordered explicitly.
    order = bundle.unit_order(swapped)
    assert [swapped[i] for i in order] == UNITS
    with pytest.raises(UserError, match="not in the session"):
        bundle.unit_order(UNITS[1:])


def test_missing_or_corrupt_manifest(bundle_dir):
    path = bundle_dir[0]
    manifest = path / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_bundle(path)
    data = json.loads(good)
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(UserError, match="format version 99"):
        load_bundle(path)
    del data["units"]
    data["format_version"] = BUNDLE_FORMAT_VERSION
    manifest.write_text(json.dumps(data))
    with pytest.raises(UserError, match="'units'"):
        load_bundle(path)
    manifest.unlink()
    with pytest.raises(UserError, match="manifest.json is missing"):
        load_bundle(path)
    with pytest.raises(UserError, match="does not exist"):
        load_bundle(path.parent / "nowhere")


def test_missing_or_damaged_weights(bundle_dir):
    path = bundle_dir[0]
    weights = path / "ridges" / "vdvae.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load_bundle(path)
    load_bundle(path, verify_hashes=False)  # size still matches: loads without the hash check
    weights.write_bytes(bytes(data[:-8]))
    with pytest.raises(UserError, match="bytes"):
        load_bundle(path, verify_hashes=False)
    weights.unlink()
    with pytest.raises(UserError, match="missing"):
        load_bundle(path)


def test_manifest_and_ridges_must_agree_when_writing(tmp_path):
    rng = np.random.default_rng(1)
    _, ridges = _ridges(rng)
    with pytest.raises(UserError, match="takes 5 inputs.*4 units"):
        write_bundle(tmp_path / "a", _manifest(units=UNITS[:4], unit_areas=[]), ridges)
    with pytest.raises(UserError, match="target shape"):
        write_bundle(tmp_path / "b", _manifest(target_shapes={"vdvae": [13]}), ridges)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_overwrite_only_replaces_a_bundle(tmp_path):
    rng = np.random.default_rng(2)
    _, ridges = _ridges(rng)
    out = write_bundle(tmp_path / "bundle", _manifest(seed=1), ridges)
    with pytest.raises(UserError, match="already exists"):
        write_bundle(out, _manifest(seed=2), ridges)
    write_bundle(out, _manifest(seed=2), ridges, overwrite=True)
    assert load_bundle(out).manifest.seed == 2
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="not a bundle"):
        write_bundle(precious, _manifest(), ridges, overwrite=True)
    assert (precious / "thesis.tex").exists()
