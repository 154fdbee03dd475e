"""Commands about model weights and captions: `models check`, `models init-tiny`, `caption`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spikevaediff.core.config import PROFILE_NAMES
from spikevaediff.core.errors import UserError

TINY_KEYS = ("clip", "blip2", "versatile_diffusion")


def _add_profile_args(parser: argparse.ArgumentParser, default: str = "tiny") -> None:
    parser.add_argument("--profile", choices=PROFILE_NAMES, default=default,
                        help="tiny: small offline models (CPU, CI); paper: the published weights (default: %(default)s)")
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="weights folder (default: $SPIKEVAEDIFF_WEIGHTS/<profile> or ~/.cache/spikevaediff/<profile>)")


def register(subparsers) -> None:
    models = subparsers.add_parser(
        "models", help="check which model weights are present; build the tiny offline models",
        description="Model weights: list what a profile needs and what is missing, or write the tiny "
                    "random-weight models (CLIP, BLIP-2, Versatile Diffusion) that run offline.")
    sub = models.add_subparsers(dest="models_command", metavar="<action>")

    check = sub.add_parser(
        "check", help="list every weight a profile needs as present or missing (exit 2 if any is missing)",
        description="List each required weight of a profile: present or missing, its path and where it "
                    "comes from. Exit status 0 when all are present, 2 otherwise (the missing ones are named).")
    _add_profile_args(check)
    check.add_argument("--json", action="store_true", help="print the table as JSON")
    check.set_defaults(func=run_check)

    init = sub.add_parser(
        "init-tiny", help="write the tiny random-weight CLIP / BLIP-2 / Versatile Diffusion folders",
        description="Build the tiny models offline (random weights, trained-BPE tokenizers) as ordinary "
                    "Hugging Face folders in the tiny weights folder. Folders already present are kept "
                    "unless --force. The tiny VDVAE is trained instead: `spikevaediff train-vdvae`.")
    init.add_argument("--weights", type=Path, default=None, metavar="DIR",
                      help="tiny weights folder (default: $SPIKEVAEDIFF_WEIGHTS/tiny or ~/.cache/spikevaediff/tiny)")
    init.add_argument("--only", nargs="+", choices=TINY_KEYS, default=None, metavar="MODEL",
                      help=f"write only these ({', '.join(TINY_KEYS)}); default: all")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    init.add_argument("--force", action="store_true", help="rewrite folders that already exist")
    init.set_defaults(func=run_init_tiny)
    models.set_defaults(func=lambda args: _no_action(models))

    caption = subparsers.add_parser(
        "caption", help="caption movie frames with BLIP-2 into a captions JSON file (reused as a cache)",
        description="Caption every frame of a movie with BLIP-2 and write {frame index: text} as JSON. "
                    "Captions already in --out (yours or an earlier run's) are kept; only missing frames "
                    "are captioned. Frames come from an NWB session (--frames S.nwb --movie NAME) or a "
                    "uint8 .npy array [F,H,W] or [F,H,W,3] (--frames X.npy).")
    caption.add_argument("--frames", type=Path, required=True, metavar="S.nwb|X.npy",
                         help="an NWB session (with --movie) or a .npy array of uint8 frames")
    caption.add_argument("--movie", default=None, help="movie name in the session, e.g. natural_movie_one")
    caption.add_argument("--out", type=Path, required=True, metavar="captions.json",
                         help="captions file to complete (created if missing)")
    _add_profile_args(caption)
    caption.add_argument("--limit", type=int, default=None, metavar="N", help="caption only the first N frames")
    caption.add_argument("--max-new-tokens", type=int, default=20, help="caption length limit (default: %(default)s)")
    caption.add_argument("--batch-size", type=int, default=8, help="frames per BLIP-2 batch (default: %(default)s)")
    caption.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    caption.set_defaults(func=run_caption)


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _profile(args):
    from spikevaediff.core.config import ModelProfile

    return ModelProfile(name=args.profile, weights_dir=args.weights)


def run_check(args) -> int:
    """Print the weights table; raise MissingWeightsError (exit 2) naming the missing ones."""
    profile = _profile(args)
    rows = [{"weight": spec.key, "present": present, "optional": spec.optional, "path": str(path),
             "source": spec.source}
            for spec, path, present in profile.status()]
    if args.json:
        print(json.dumps({"profile": profile.name, "weights_dir": str(profile.weights_dir), "weights": rows},
                         indent=2))
    else:
        print(f"profile {profile.name}, weights folder {profile.weights_dir}")
        width = max(len(r["weight"]) for r in rows)
        path_width = max(len(r["path"]) for r in rows)
        print(f"  {'weight':<{width}}  {'status':<7}  {'path':<{path_width}}  source")
        for r in rows:
            status = "present" if r["present"] else ("absent" if r["optional"] else "MISSING")
            print(f"  {r['weight']:<{width}}  {status:<7}  {r['path']:<{path_width}}  {r['source']}")
        sys.stdout.flush()
    profile.require()  # raises with every missing weight, path and source
    return 0


def run_init_tiny(args) -> int:
    """Write the missing (or, with --force, all) tiny model folders."""
    from spikevaediff.core.config import ModelProfile
    from spikevaediff.core.tiny import ensure_tiny_weights

    profile = ModelProfile(name="tiny", weights_dir=args.weights)
    keys = tuple(args.only) if args.only else TINY_KEYS
    written = ensure_tiny_weights(profile, keys=keys, seed=args.seed, force=args.force)
    for key in keys:
        state = "written" if key in written else "already present"
        print(f"{key:<20} {state:<16} {profile.path(key)}")
    return 0


def load_frames(frames_path: Path, movie: str | None):
    """uint8 frames from an NWB session's movie or a .npy file (UserError on anything else)."""
    import numpy as np

    if not frames_path.exists():
        raise UserError(f"frames file not found: {frames_path}")
    if frames_path.suffix.lower() == ".npy":
        try:
            frames = np.load(frames_path, allow_pickle=False)
        except ValueError as exc:
            raise UserError(f"{frames_path} is not a plain .npy array ({exc})") from None
        if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] != 3):
            raise UserError(f"{frames_path} must hold uint8 frames [F,H,W] or [F,H,W,3], "
                            f"got {frames.dtype} {list(frames.shape)}")
        return frames
    if not movie:
        raise UserError("--movie is required with an NWB session (e.g. --movie natural_movie_one)")
    from spikevaediff.replay.nwb import open_session

    with open_session(frames_path) as session:
        return session.frames(movie)


def run_caption(args) -> int:
    """Caption frames into --out, reusing the captions already there."""
    import numpy as np

    from spikevaediff.core.captions import Captioner, captions_for_frames

    frames = load_frames(args.frames, args.movie)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit must be at least 1, got {args.limit}")
        frames = frames[:args.limit]
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size must be at least 1")
    profile = _profile(args)
    if profile.name == "tiny":
        from spikevaediff.core.tiny import ensure_tiny_weights

        ensure_tiny_weights(profile, keys=("blip2",))
    made = []

    def factory():
        made.append(Captioner(profile, device=args.device, batch_size=args.batch_size))
        return made[-1]

    captions = captions_for_frames(frames, np.arange(len(frames)), args.out, factory,
                                   max_new_tokens=args.max_new_tokens)
    generated = made[0].images_captioned if made else 0
    print(f"{len(captions)} captions in {args.out} ({generated} generated, {len(captions) - generated} reused)")
    return 0
