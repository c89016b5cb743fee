"""The one exception type that means "the user gave us something we cannot use"."""


class WrenError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero.

    Raise it for bad input (a missing file, malformed JSON, an unknown preset, an unreadable
    checkpoint) with a message that names the file, the line where there is one, and what was
    expected. Bugs stay ordinary exceptions so their tracebacks are not hidden.
    """
