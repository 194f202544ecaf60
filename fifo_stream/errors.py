"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class FifoStreamError(Exception):
    """A problem with the user's input or environment; the message says what and how to fix it."""

    exit_code = 2
