"""User-facing errors.

Every problem a user can fix is raised as an ``FxqError``: one paragraph saying what was wrong
and what to do. The CLI prints it without a traceback (``--debug`` shows one) and exits non-zero.
"""
from __future__ import annotations


class FxqError(Exception):
    """An error whose message is meant for the user, not the developer."""

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None):
        self.what = what.rstrip()
        self.fix = fix.rstrip() if fix else None
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if self.fix:
            return f"{self.what} {self.fix}"
        return self.what


class ModelLoadError(FxqError):
    """The MODEL argument could not be turned into a model."""


class CaptureError(FxqError):
    """The model could not be captured into an FX graph."""


class CalibrationDataError(FxqError):
    """The --calib data is unusable."""


class LoweringError(FxqError):
    """The quantized graph could not be lowered to the requested backend."""


class PassError(FxqError):
    """A pass failed; the message says which passes ran before it."""

    exit_code = 3
