"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserInputError(ValueError):
    """Bad configuration or data that the user can fix; the message says where and how."""


class RowError(UserInputError):
    """One data row fails a check; ``data.on_invalid: drop`` skips such rows and counts them by ``reason``.

    Args:
        message: the one-line error (file, line/row, field and fix), as for any :class:`UserInputError`.
        reason: a short name to count drops by, e.g. ``"wrong type"``, ``"empty response"``.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and what to do."""
