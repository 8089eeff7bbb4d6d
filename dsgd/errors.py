"""Errors a user can fix. The CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """Bad input: a malformed config, a missing data path, an invalid topology, ...

    The message must say what is wrong and what to do about it, in one line.
    """


class TrainingDiverged(UserError):
    """The loss became NaN or infinite. The last good checkpoint is kept."""


class BatchError(UserError, ValueError):
    """A batch whose shape or dtype does not fit the engine (workers, batch size, labels)."""


class RunInterrupted(Exception):
    """A run stopped by a signal (SIGTERM, Ctrl-C). The message says what was kept and how to
    continue; the CLI prints it on one line and exits with ``exit_code`` (128 + the signal)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
