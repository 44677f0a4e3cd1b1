"""Errors a user can cause. The CLI prints them as one `Error:` line plus a hint, exit 1."""

from __future__ import annotations


class ZForcingError(Exception):
    """An expected failure with a message for the user and a hint on what to do instead."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


class DataError(ZForcingError):
    """Raw or prepared data that cannot be read."""


class CheckpointError(ZForcingError):
    """A checkpoint folder that is missing, incomplete, corrupted or of the wrong kind."""


class TrainingError(ZForcingError):
    """Training that cannot go on (diverged, or asked to do something impossible)."""
