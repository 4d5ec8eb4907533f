"""The one exception users see: bad input, named in one line.

Anything raised as ChainloraError is the user's to fix (a file, a line, a key, a package to
install); the CLI prints its message on one line and exits 2. Every other exception is a bug
and keeps its traceback (exit 1).
"""


class ChainloraError(Exception):
    """A user error with a one-line message naming the file, line, key or package."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class NotFound(ChainloraError):
    """A named task or adapter is not in the library (any more): the server's 404."""
