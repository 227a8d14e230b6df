"""Exceptions and warnings for user-facing data problems (bad folders, unknown names, missing files)."""

from __future__ import annotations

from latentdiff.errors import UserError


class DataError(UserError):
    """A problem with the user's data or data config; the message is one line that names the problem and the fix."""


class DataWarning(UserWarning):
    """Something in the user's data was skipped or changed (corrupt file, upscaled image); training goes on."""
