"""The command-line front door: `spikevaediff <command> ...`.

Each command lives in a small `commands_*` module with a `register(subparsers)` function that
adds its parser and sets `func`. Heavy imports (torch, diffusers, transformers) happen inside
the command functions, so `--help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "spikevaediff.services.commands_data",      # simulate, inspect, bin, psth, fetch, bench-binning
    "spikevaediff.services.commands_models",    # models check / init-tiny, caption
    "spikevaediff.services.commands_vdvae",     # train-vdvae
    "spikevaediff.services.commands_refiner",   # refine (one image), bench-models
    "spikevaediff.services.commands_training",  # train, evaluate, ablate, bench-ridge
    "spikevaediff.services.commands_export",    # export-unet
    "spikevaediff.services.commands_live",      # run, serve, keys, bench-transport
    "spikevaediff.services.commands_bench",     # bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikevaediff",
        description=(
            "Decode what a mouse sees from Neuropixels spikes, live: replay an Allen-layout NWB "
            "session, bin spikes per movie frame, predict VDVAE latents and CLIP embeddings with "
            "ridge regression, show a 64x64 VDVAE preview and a Versatile Diffusion refinement."
        ),
        epilog="Run `spikevaediff <command> --help` for the options of one command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command group not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def quiet_model_libraries() -> None:
    """Offline, and no per-load progress bars or advisory chatter from Hugging Face libraries.

    Set before transformers/diffusers are imported (they read these at import time); a user's own
    settings win.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never download at run time
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: list[str] | None = None) -> int:
    from spikevaediff.core.errors import UserError

    quiet_model_libraries()

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"spikevaediff {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"spikevaediff {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `spikevaediff inspect S.nwb --json | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
