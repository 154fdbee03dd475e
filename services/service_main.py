"""The `python -m spikevaediff.services.<name>_service --config FILE [--instance K]` entry point
shared by the live services (the `serve` command calls their `main` directly)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def cli(service: str, main_fn, argv=None) -> int:
    """Parse --config/--instance, load and validate the config, run `main_fn(config, instance)`."""
    from spikevaediff.core.errors import UserError

    from .cli import quiet_model_libraries
    from .settings import ServiceConfig

    parser = argparse.ArgumentParser(prog=f"python -m spikevaediff.services.{service}_service",
                                     description=f"Run the {service} service alone.")
    parser.add_argument("--config", type=Path, required=True, help="the run's ServiceConfig JSON")
    parser.add_argument("--instance", type=int, default=0, help="instance number (refiners: 0, 1, ...)")
    args = parser.parse_args(argv)
    quiet_model_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return main_fn(ServiceConfig.load(args.config), args.instance)
    except UserError as exc:
        print(f"{service}: error: {exc}", file=sys.stderr)
        return 2
