"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config): reported in one line, exit code 2."""


def fail(where: object, problem: str) -> UserError:
    """Build a ``UserError`` that names the file (or flag) and the problem."""
    return UserError(f"{where}: {problem}")
