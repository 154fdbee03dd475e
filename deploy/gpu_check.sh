#!/usr/bin/env bash
# One command on a GPU host: the refiner at 512x512 through every available UNet backend, as a table.
# Usage: deploy/gpu_check.sh [--weights DIR] [--json OUT.json] [...]   (see deploy/gpu_check.py --help)
here="$(cd "$(dirname "$0")" && pwd)"; py="${PYTHON:-$([ -x "$here/../.venv/bin/python" ] && echo "$here/../.venv/bin/python" || echo python3)}"
exec timeout 480 "$py" "$here/gpu_check.py" "$@"
