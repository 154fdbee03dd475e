"""Data commands: simulate, inspect, bin, psth, fetch, bench-binning.

Heavy imports (pynwb, matplotlib) stay inside the run functions so `spikevaediff --help` is instant.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from spikevaediff.core.errors import UserError

MOVIES = ("natural_movie_one", "natural_movie_three")


def register(subparsers) -> None:
    _register_simulate(subparsers)
    _register_inspect(subparsers)
    _register_bin(subparsers)
    _register_psth(subparsers)
    _register_fetch(subparsers)
    _register_bench(subparsers)


# ---- shared option parsing --------------------------------------------------------------------

def _list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]
    if not items:
        raise UserError("empty list")
    return items


def _window(text: str | None):
    if text is None:
        return None
    parts = _list(text)
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"window must look like 0.05,0.1 (seconds after frame onset), got '{text}'") from None
    if len(values) != 2:
        raise UserError(f"window needs exactly two numbers (start,stop), got '{text}'")
    return tuple(values)


def _add_filter_option(p) -> None:
    p.add_argument("--no-filters", action="store_true",
                   help="keep every unit (default: allensdk's filters: quality good, isi_violations "
                        "<= 0.5, amplitude_cutoff <= 0.1, presence_ratio >= 0.95)")


def _filters(args):
    from spikevaediff.replay.nwb import DEFAULT_UNIT_FILTERS

    return None if args.no_filters else DEFAULT_UNIT_FILTERS


def _progress() -> bool:
    return sys.stderr.isatty()


# ---- simulate ---------------------------------------------------------------------------------

def _register_simulate(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="write a synthetic session in the Allen Neuropixels NWB layout",
        description="Simulate six visual areas watching a natural-image movie and write the session "
                    "as an Allen-layout NWB file (units, electrodes, stimulus tables, invalid_times, "
                    "movie template). Default: demo size (natural_movie_three 600x4, natural_movie_one "
                    "900x10, ~417 units, 64x128 frames); --full mirrors brain_observatory_1.1.")
    p.add_argument("--out", required=True, type=Path, help="NWB file to write (e.g. runs/S.nwb)")
    p.add_argument("--full", action="store_true",
                   help="full size: natural_movie_three 3600x10, natural_movie_one 900x20, ~450 units")
    p.add_argument("--movies", help=f"comma-separated movies to show (default: both: {','.join(MOVIES)})")
    p.add_argument("--frames", action="append", metavar="[MOVIE=]N",
                   help="frames per movie; N for all movies or MOVIE=N (repeatable)")
    p.add_argument("--repeats", action="append", metavar="[MOVIE=]N",
                   help="repeats per movie; N for all movies or MOVIE=N (repeatable)")
    p.add_argument("--units-scale", type=float, help="multiply the realistic unit counts per area (default 1)")
    p.add_argument("--frame-size", metavar="HxW", help="movie frame size (default 64x128, Allen's 1:2 aspect)")
    p.add_argument("--seed", type=int, default=0, help="session seed: units and spikes (default 0)")
    p.add_argument("--movie-seed", type=int, default=0,
                   help="movie seed; keep it equal across sessions to pool them (default 0)")
    p.add_argument("--external-frames", action="store_true",
                   help="write the movie as <movie>.npy next to the file (Allen's way) instead of a "
                        "stimulus template inside it")
    p.set_defaults(func=run_simulate)


def _per_movie(values: list[str] | None, movies: list[str], what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in values or []:
        name, _, number = item.rpartition("=")
        try:
            n = int(number)
        except ValueError:
            raise UserError(f"--{what} expects N or MOVIE=N, got '{item}'") from None
        if name and name not in movies:
            raise UserError(f"--{what}: '{name}' is not among the simulated movies ({', '.join(movies)})")
        for m in ([name] if name else movies):
            out[m] = n
    return out


def build_config(args):
    """SimulationConfig from the simulate command's options."""
    from dataclasses import replace

    from spikevaediff.replay.simulate import MovieSpec, SimulationConfig

    base = SimulationConfig.full() if args.full else SimulationConfig()
    defaults = {m.name: m for m in base.movies}
    names = _list(args.movies) or [m.name for m in base.movies]
    for n in names:
        if n not in MOVIES:
            raise UserError(f"unknown movie '{n}' (choose from {', '.join(MOVIES)})")
    frames = _per_movie(args.frames, names, "frames")
    repeats = _per_movie(args.repeats, names, "repeats")
    movies = tuple(MovieSpec(n, frames.get(n, defaults[n].n_frames), repeats.get(n, defaults[n].n_repeats))
                   for n in names)
    changes = dict(movies=movies, seed=args.seed, movie_seed=args.movie_seed,
                   external_frames=args.external_frames)
    if args.units_scale is not None:
        changes["units_scale"] = args.units_scale
    if args.frame_size:
        try:
            h, w = (int(x) for x in args.frame_size.lower().split("x"))
        except ValueError:
            raise UserError(f"--frame-size must look like 64x128, got '{args.frame_size}'") from None
        changes.update(frame_height=h, frame_width=w)
    return replace(base, **changes)


def run_simulate(args) -> int:
    from spikevaediff.replay.simulate import simulate_session

    report = simulate_session(args.out, build_config(args), progress=_progress())
    movies = ", ".join(f"{m} {f} frames x {r} repeats" for m, (f, r) in report.movies.items())
    print(f"wrote {report.path}: {report.n_units} units in 6 areas; {movies}; "
          f"{report.duration_s:.0f} s of recording; simulated in {report.seconds:.1f} s")
    for path in report.frames_files:
        print(f"wrote {path} (movie frames, outside the NWB file as Allen ships them)")
    return 0


# ---- inspect ----------------------------------------------------------------------------------

def _register_inspect(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="units per area and movies of an NWB session",
        description="Print units per area (all / passing allensdk's default filters), movies with "
                    "frames x repeats, and whether movie frames are available.")
    p.add_argument("session", type=Path, help="Allen-layout NWB file")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from spikevaediff.replay.nwb import open_session

    with open_session(args.session) as session:
        info = session.summary()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}  (session {info['session_id']})")
    print(f"{'area':<8}{'units':>8}{'passing filters':>18}")
    for area, c in info["areas"].items():
        print(f"{area:<8}{c['units']:>8}{c['passing_filters']:>18}")
    print(f"{'total':<8}{info['units']:>8}{info['units_passing_filters']:>18}")
    print()
    print(f"{'movie':<22}{'frames':>8}{'repeats':>9}{'invalid':>9}  frames available")
    for movie, m in info["movies"].items():
        print(f"{movie:<22}{m['frames']:>8}{m['repeats']:>9}{m['invalid_presentations']:>9}  "
              f"{'yes' if m['frames_available'] else 'no (no template, no .npy beside the file)'}")
    if not info["movies"]:
        print("(no movie presentations in this file)")
    print(f"\ninvalid_times intervals: {info['invalid_intervals']}")
    return 0


# ---- bin --------------------------------------------------------------------------------------

def _register_bin(subparsers) -> None:
    p = subparsers.add_parser(
        "bin", help="frame-aligned spike counts of one movie to .npz",
        description="Count each unit's spikes in a window after every frame onset of a movie and "
                    "write counts [presentations x units] (or x sub-bins) with frame index, repeat "
                    "index, validity, unit ids and areas.")
    p.add_argument("session", type=Path, help="Allen-layout NWB file")
    p.add_argument("--movie", required=True, help="e.g. natural_movie_one")
    p.add_argument("--areas", help="comma-separated areas (default: all), e.g. VISp,VISl")
    p.add_argument("--window", help="start,stop in seconds after frame onset (default: from the "
                                    "areas' latencies, e.g. 0.051,0.106 for all six)")
    p.add_argument("--subbins", type=int, default=1, help="split the window into N sub-bins (default 1)")
    p.add_argument("--out", required=True, type=Path, help="output .npz")
    _add_filter_option(p)
    p.set_defaults(func=run_bin)


def run_bin(args) -> int:
    from spikevaediff.replay.binning import bin_session
    from spikevaediff.replay.nwb import open_session

    window = _window(args.window)
    with open_session(args.session) as session:
        binned = bin_session(session, args.movie, areas=_list(args.areas), window=window,
                             n_subbins=args.subbins, filters=_filters(args))
    out = binned.save_npz(args.out)
    p, u = binned.counts.shape[:2]
    print(f"wrote {out}: {p} presentations x {u} units"
          + (f" x {args.subbins} sub-bins" if args.subbins > 1 else "")
          + f", window {binned.window[0]:.3f}-{binned.window[1]:.3f} s, "
          f"{int((~binned.valid).sum())} presentations marked invalid")
    return 0


# ---- psth -------------------------------------------------------------------------------------

def _register_psth(subparsers) -> None:
    p = subparsers.add_parser(
        "psth", help="peri-stimulus time histograms per area (figure)",
        description="Draw each area's repeat-averaged population rate over the movie, and all areas "
                    "aligned to scene cuts (latency), as one figure.")
    p.add_argument("session", type=Path, help="Allen-layout NWB file")
    p.add_argument("--movie", required=True, help="e.g. natural_movie_one")
    p.add_argument("--areas", help="comma-separated areas (default: all)")
    p.add_argument("--bin-ms", type=float, default=2000 / 30, help="bin width in ms (default: 2 frames)")
    p.add_argument("--out", required=True, type=Path, help="figure file (.png, .pdf, .svg)")
    _add_filter_option(p)
    p.set_defaults(func=run_psth)


def run_psth(args) -> int:
    from spikevaediff.replay.nwb import open_session
    from spikevaediff.replay.psth import compute_psth, plot_psth

    if args.out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UserError(f"--out must end in .png, .pdf or .svg, got '{args.out.name}'")
    with open_session(args.session) as session:
        result = compute_psth(session, args.movie, _list(args.areas), _filters(args), args.bin_ms / 1000)
    out = plot_psth(result, args.out)
    rel = ", ".join(f"{a.area} {a.reliability:.2f}" for a in result.areas)
    print(f"wrote {out} ({len(result.areas)} areas, {result.n_repeats} repeats; repeat reliability: {rel})")
    return 0


# ---- fetch ------------------------------------------------------------------------------------

def _register_fetch(subparsers) -> None:
    p = subparsers.add_parser(
        "fetch", help="download a real Allen session and its movie templates (network)",
        description="Download an Allen Visual Coding - Neuropixels session file and the movie "
                    "templates into OUT/session_<id>/ (session_<id>.nwb + <movie>.npy). Sources: "
                    "allen-s3 (Allen's public bucket), dandi (session from DANDI, templates from "
                    "Allen), allensdk (allensdk's cache, run by another Python that has allensdk).")
    p.add_argument("--session-id", required=True, type=int, help="e.g. 715093703")
    p.add_argument("--out", required=True, type=Path, help="folder to download into")
    p.add_argument("--source", default="allen-s3", choices=("allen-s3", "dandi", "allensdk"),
                   help="where to download from (default allen-s3)")
    p.add_argument("--movies", default=",".join(MOVIES), help="movie templates to fetch")
    p.add_argument("--dandiset", default="000021",
                   help="dandiset for --source dandi (000021 brain_observatory_1.1, 000022 functional_connectivity)")
    p.add_argument("--allensdk-python", help="Python interpreter of an environment with allensdk")
    p.add_argument("--overwrite", action="store_true", help="download again even if files exist")
    p.set_defaults(func=run_fetch)


def run_fetch(args) -> int:
    from spikevaediff.replay import fetch

    movies = _list(args.movies)
    if args.source == "allensdk":
        result = fetch.fetch_with_allensdk(args.session_id, args.out, args.allensdk_python, movies)
    else:
        result = fetch.fetch_session(args.session_id, args.out, movies, args.source, args.dandiset,
                                     args.overwrite, progress=_progress())
    print(f"session: {result.session_path}")
    for path in result.frames_paths:
        print(f"frames:  {path}")
    print(f"next: spikevaediff inspect {result.session_path}")
    return 0


# ---- bench-binning ----------------------------------------------------------------------------

def _register_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-binning", help="benchmark vectorised binning against a naive loop",
        description="Bin a full-size session (natural_movie_three 3600 frames x 10 repeats, ~450 "
                    "units; simulated into a temporary folder unless --session is given) and print "
                    "its time beside a naive per-unit-per-frame loop measured in the same run "
                    "(on a subset of units, scaled), as a ratio.")
    p.add_argument("--session", type=Path, help="NWB file to bin (default: simulate a full-size one)")
    p.add_argument("--movie", default="natural_movie_three", help="movie to bin (default natural_movie_three)")
    p.add_argument("--naive-units", type=int, default=8,
                   help="units the naive loop runs on before scaling to all units (default 8)")
    p.add_argument("--runs", type=int, default=5, help="timed runs of the vectorised binning (default 5)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.set_defaults(func=run_bench_binning)


def run_bench_binning(args) -> int:
    from spikevaediff.replay.bench_binning import run_benchmark

    result = run_benchmark(args.session, args.movie, args.naive_units, args.runs, progress=_progress())
    print(result.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.as_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0
