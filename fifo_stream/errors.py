"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class FifoStreamError(Exception):
    """A problem with the user's input or environment; the message says what and how to fix it."""

    exit_code = 2


class PeerExit(FifoStreamError):
    """Raised on a process of a torchrun job because another one stopped the job (and said why)."""

    def __init__(self, code: int):
        super().__init__(f"stopped with the other processes of the job (exit code {code})")
        self.exit_code = code


class InputError(FifoStreamError):
    """A user's image or video cannot be used; the message says why and what to do."""
