"""Optional download of a real Allen Visual Coding - Neuropixels session and its movie templates.

Only when the user asks (`spikevaediff fetch`); never at run time, never in tests. Sources:
  - `allen-s3` (default): Allen's public bucket, which holds both the session files and the
    movie templates (`natural_movie_templates/natural_movie_N.h5`, which are .npy files);
  - `dandi`: the session from DANDI (dandiset 000021 / 000022), the templates from Allen's bucket;
  - `allensdk`: allensdk's own cache, run by a Python interpreter of the user's choosing
    (allensdk pins numpy<1.24 and pandas 1.5.3, so it cannot live in our environment).
Everything that touches the network goes through `open_url`.
Files are laid out as the reader expects: `<out>/session_<id>/session_<id>.nwb` with
`<movie>.npy` next to it.
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from spikevaediff.core.errors import UserError

ALLEN_S3 = "https://allen-brain-observatory.s3.amazonaws.com/visual-coding-neuropixels/ecephys-cache"
DANDI_API = "https://api.dandiarchive.org/api"
DANDISETS = {"brain_observatory_1.1": "000021", "functional_connectivity": "000022"}
MOVIE_NUMBERS = {"natural_movie_one": 1, "natural_movie_three": 3}
SOURCES = ("allen-s3", "dandi", "allensdk")
CHUNK = 1 << 20


def open_url(url: str, timeout: float = 60.0):
    """The one network boundary: a readable binary response for `url`."""
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "spikevaediff-fetch"})
    return urllib.request.urlopen(request, timeout=timeout)


@dataclass
class FetchResult:
    session_path: Path
    frames_paths: list[Path] = field(default_factory=list)


def download(url: str, dest: Path, progress: bool = True) -> Path:
    """Stream `url` into `dest` (through a temporary file, so a failed download leaves nothing)."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with open_url(url) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length", 0) or 0) if hasattr(response, "headers") else 0
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    except OSError as exc:  # URLError and HTTPError are OSErrors
        raise UserError(f"could not download {url}: {exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _json(url: str) -> dict:
    try:
        with open_url(url) as response:
            return json.loads(response.read().decode())
    except OSError as exc:
        raise UserError(f"could not reach {url}: {exc}") from None
    except ValueError:
        raise UserError(f"unexpected (non-JSON) answer from {url}") from None


def allen_session_url(session_id: int) -> str:
    return f"{ALLEN_S3}/session_{session_id}/session_{session_id}.nwb"


def allen_template_url(movie: str) -> str:
    return f"{ALLEN_S3}/natural_movie_templates/natural_movie_{MOVIE_NUMBERS[movie]}.h5"


def dandi_session_url(session_id: int, dandiset: str = "000021") -> str:
    """Download URL of the session file (not the per-probe LFP files) in a dandiset."""
    query = urllib.parse.urlencode({"glob": f"*ses-{session_id}*.nwb", "page_size": 100})
    url = f"{DANDI_API}/dandisets/{dandiset}/versions/draft/assets/?{query}"
    while url:
        page = _json(url)
        for asset in page.get("results", []):
            path = asset.get("path", "")
            if path.endswith(f"ses-{session_id}.nwb"):
                return f"{DANDI_API}/assets/{asset['asset_id']}/download/"
        url = page.get("next")
    raise UserError(f"session {session_id} not found in dandiset {dandiset}")


def _check_movies(movies) -> list[str]:
    movies = list(movies)
    for m in movies:
        if m not in MOVIE_NUMBERS:
            raise UserError(f"no template source for movie '{m}' (choose from {', '.join(MOVIE_NUMBERS)})")
    return movies


def _verify(session_path: Path, frames_paths: list[Path]) -> None:
    import h5py
    import numpy as np

    if not h5py.is_hdf5(session_path):
        raise UserError(f"downloaded {session_path} is not an HDF5/NWB file")
    for path in frames_paths:
        try:
            frames = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError):
            raise UserError(f"downloaded {path} is not a .npy movie template") from None
        if frames.ndim != 3:
            raise UserError(f"downloaded {path} has shape {frames.shape}, not [frames, height, width]")


def fetch_session(session_id: int, out_dir: str | os.PathLike, movies=("natural_movie_one", "natural_movie_three"),
                  source: str = "allen-s3", dandiset: str = "000021", overwrite: bool = False,
                  progress: bool = True) -> FetchResult:
    """Download a session and its movie templates into `<out_dir>/session_<id>/`."""
    if source not in ("allen-s3", "dandi"):
        raise UserError(f"unknown source '{source}' (choose from {', '.join(SOURCES)})")
    movies = _check_movies(movies)
    folder = Path(out_dir) / f"session_{session_id}"
    session_path = folder / f"session_{session_id}.nwb"
    if overwrite or not session_path.exists():
        url = allen_session_url(session_id) if source == "allen-s3" else dandi_session_url(session_id, dandiset)
        download(url, session_path, progress)
    frames_paths = []
    for movie in movies:
        path = folder / f"{movie}.npy"
        if overwrite or not path.exists():
            download(allen_template_url(movie), path, progress)
        frames_paths.append(path)
    _verify(session_path, frames_paths)
    return FetchResult(session_path, frames_paths)


# The allensdk route: a small script run by another interpreter (allensdk's own environment).
_ALLENSDK_SCRIPT = r"""
import sys, shutil
from pathlib import Path
try:
    import numpy as np
    from allensdk.brain_observatory.ecephys.ecephys_project_cache import EcephysProjectCache
except ImportError as exc:
    print(f"allensdk is not importable by {sys.executable}: {exc}", file=sys.stderr)
    sys.exit(3)
session_id, out_dir, movies = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
numbers = {"natural_movie_one": 1, "natural_movie_three": 3}
cache = EcephysProjectCache.from_warehouse(manifest=str(out_dir / "allensdk_cache" / "manifest.json"))
cache.get_session_data(session_id)
cached = out_dir / "allensdk_cache" / f"session_{session_id}" / f"session_{session_id}.nwb"
folder = out_dir / f"session_{session_id}"
folder.mkdir(parents=True, exist_ok=True)
shutil.copyfile(cached, folder / cached.name)
for movie in movies:
    np.save(folder / f"{movie}.npy", np.asarray(cache.get_natural_movie_template(numbers[movie])))
print(folder / cached.name)
"""


def fetch_with_allensdk(session_id: int, out_dir: str | os.PathLike, python: str,
                        movies=("natural_movie_one", "natural_movie_three")) -> FetchResult:
    """Let allensdk, installed in another environment (`python`), download the session."""
    movies = _check_movies(movies)
    if not python:
        raise UserError("the allensdk source needs --allensdk-python (allensdk cannot share our environment)")
    out_dir = Path(out_dir)
    try:
        done = subprocess.run([python, "-c", _ALLENSDK_SCRIPT, str(session_id), str(out_dir), ",".join(movies)],
                              capture_output=True, text=True)
    except OSError as exc:
        raise UserError(f"cannot run {python}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"allensdk download failed: {last}")
    folder = out_dir / f"session_{session_id}"
    result = FetchResult(folder / f"session_{session_id}.nwb", [folder / f"{m}.npy" for m in movies])
    _verify(result.session_path, result.frames_paths)
    return result
