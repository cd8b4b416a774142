"""The errors deepdark reports to its user, as opposed to bugs.

Anything raised as a :class:`DeepdarkError` is a problem with what the user gave (a file, a
path, an option, a configuration) that the message explains in one line; the command line
prints that line and exits with status 2. Every other exception is a bug and keeps its
traceback (exit status 1), so that it is reported, not mistaken for bad input.
"""


class DeepdarkError(Exception):
    """A problem with the user's input that the message names in one line."""


class InputError(DeepdarkError, ValueError):
    """An input that does not exist or cannot be used (a path, an option value, a key): a bad value."""


class OutputError(DeepdarkError):
    """An output that would write over something the user has."""


class MissingInputError(InputError, FileNotFoundError):
    """An input path (a night folder or a file) that does not exist."""


class FrameError(DeepdarkError):
    """A raw frame that cannot be used; ``str()`` is ``"<path>: <reason>"``.

    Raised per file, so that callers can quarantine that file and carry on with the others.
    """

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class CorruptFileError(DeepdarkError, OSError):
    """Stored data that fail their checksum or cannot be decoded: the file is damaged."""
