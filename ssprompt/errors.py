"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, an argument, a config): reported in one line, exit code
    2. ``field``: the library argument at fault (``shots``, ``sfm``, ``checkpoint``, ...), which
    the CLI names as its flag (``--shots``); library messages never name CLI flags. A message
    about a field starts with the field's name (``"shots 100: must be in 1..64"``) or with the
    value alone (``"nowhere: not a folder"``)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def fail(where: object, problem: str, field: str | None = None) -> UserError:
    """Build a ``UserError`` that names the file (or argument) and the problem."""
    return UserError(f"{where}: {problem}", field)
