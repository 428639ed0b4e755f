"""The errors that mean "bad input": the command line prints them as one line and exits 2.

Every error a user can cause with a file, a field or a value derives from `UserError`,
and its message names that file, field or value. The CLI (`lmcore.cli.main`) catches
`UserError` alone: any other exception is a bug in lmcore and keeps its traceback.
Subclasses also derive from the matching built-in (ValueError, FileNotFoundError) so
that library callers can keep catching those.
"""

from __future__ import annotations

__all__ = ["InputError", "InputNotFound", "UserError"]


class UserError(Exception):
    """Bad input (a file, a config field, a value); the message names it."""


class InputError(UserError, ValueError):
    """A value or file content that lmcore cannot use; the message names it."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist; the message names it."""
