"""Errors that mean "the input was wrong", as opposed to a bug in revival.

`UserError` is what the library raises for a bad argument, config value, path or file: the `revival` command prints
it as one line and exits with status 2. Anything else that escapes a command is a bug and keeps its traceback. It
subclasses `ValueError`, so `except ValueError` keeps catching it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: an argument, a config value, a path or a file. The message names it and says what was expected."""


class MissingPathError(UserError, FileNotFoundError):
    """A path given by the user does not exist (also a `FileNotFoundError`)."""


def reject_unknown(given, valid: list[str], where: str, noun: str = "key", error: type = ValueError) -> None:
    """Raise `error`("<where>: unknown <noun>(s) [...]; valid <noun>s: <valid>") where `given` names any not in
    `valid` (ValueError for a library argument, UserError for a config file's key)."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise error(f"{where}: unknown {noun}(s) {unknown}; valid {noun}s: {valid}")
