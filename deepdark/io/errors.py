"""The errors deepdark reports to its user, as opposed to bugs.

Anything raised as a :class:`DeepdarkError` is a problem with what the user gave (a file, a
path, an option, a configuration) that the message explains in one line; the command line
prints that line and exits with status 2. Every other exception is a bug and keeps its
traceback (exit status 1), so that it is reported, not mistaken for bad input.
"""


class DeepdarkError(Exception):
    """A problem with the user's input that the message names in one line."""


class InputError(DeepdarkError):
    """An input that does not exist or cannot be used (a path, an option value, a key)."""


class OutputError(DeepdarkError):
    """An output that would write over something the user has."""
