"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserInputError(ValueError):
    """Bad configuration or data that the user can fix; the message says where and how."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and what to do."""
