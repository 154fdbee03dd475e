"""The one exception type users see: a clear one-line message and exit code 2.

Anything raised as `UserError` (bad file, unknown area, missing weights, wrong shape...) is
printed by the CLI as a single line, never as a traceback.
"""
from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line, exit code 2."""

    exit_code = 2


def read_json(path, what: str):
    """The JSON value in file `path`; a UserError naming `what` and the path if it cannot be read
    or is not valid JSON (callers check that the file exists, with their own advice)."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{what} {path} is corrupt (not valid JSON: {exc})") from None


class MissingWeightsError(UserError):
    """Raised when a profile needs weight files that are not on disk.

    `missing` lists (name, expected path, where it comes from) for each missing piece.
    """

    def __init__(self, profile: str, missing: list[tuple[str, str, str]]):
        self.profile = profile
        self.missing = missing
        items = "; ".join(f"{name} (expected at {path}; from {source})" for name, path, source in missing)
        super().__init__(f"profile '{profile}' is missing {len(missing)} weight file(s): {items}")
