"""The one exception type users see: a clear one-line message and exit code 2.

Anything raised as `UserError` (bad file, unknown area, missing weights, wrong shape...) is
printed by the CLI as a single line, never as a traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line, exit code 2."""

    exit_code = 2


class MissingWeightsError(UserError):
    """Raised when a profile needs weight files that are not on disk.

    `missing` lists (name, expected path, where it comes from) for each missing piece.
    """

    def __init__(self, profile: str, missing: list[tuple[str, str, str]]):
        self.profile = profile
        self.missing = missing
        items = "; ".join(f"{name} (expected at {path}; from {source})" for name, path, source in missing)
        super().__init__(f"profile '{profile}' is missing {len(missing)} weight file(s): {items}")
