"""The root of every error a user can cause: a bad setting, name, file, database or request.
The command catches this class only, as one line and exit 2; anything else is a bug in ppsearch
or a library and shows its traceback."""
from __future__ import annotations


class PPSearchError(ValueError):
    """A mistake or a missing resource on the user's side, with what to do in the message."""


class MissingFileError(PPSearchError, FileNotFoundError):
    """A file a setting names does not exist."""
