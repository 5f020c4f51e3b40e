"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


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


def raised_in(owner: str, err: BaseException, fix: str) -> UserInputError:
    """One line for an exception that a plugin's code raised (a judge, a loss, an estimator: a user's code, most
    often): the plugin, the error, and the line it came from, rather than a traceback through the training loop.

    Args:
        owner: the plugin and its method as users know them, e.g. ``"model.loss: MyLoss.forward"``.
        err: what it raised.
        fix: what to do, e.g. ``"fix the loss"``.
    """
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return UserInputError(f"{owner} raised {type(err).__name__}: {str(err).strip() or '(no message)'}{where}; {fix}")


def call_plugin(owner: str, fix: str, fn: Callable[..., T], *args: Any, refusal: str | None = None,
                **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, a plugin's code (a judge, a loss, an estimator: a user's, most often): what it
    raises is one line (:func:`raised_in` with ``owner`` and ``fix``). Its ``UserInputError`` passes as it is, and
    so does running out of memory, which is not the plugin's to fix.

    Args:
        refusal: where a ``ValueError`` is the plugin's own refusal of its input, the prefix of the one line that
            gives its message alone (e.g. ``"model.loss: MyLoss"``).
    """
    try:
        return fn(*args, **kwargs)
    except UserInputError:
        raise
    except ValueError as err:
        if refusal is None:
            raise raised_in(owner, err, fix) from err
        message = str(err).strip()
        raise UserInputError(f"{refusal}: {message.splitlines()[0] if message else type(err).__name__}") from None
    except Exception as err:  # noqa: BLE001 - whatever a plugin raises, the user needs its name and where
        if out_of_memory(err):
            raise
        raise raised_in(owner, err, fix) from err


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is running out of host or device memory: not a plugin's or a class's to fix, so it passes
    as it is where their other errors become one line."""
    torch = sys.modules.get("torch")  # not imported by the commands that load no model: no CUDA error then
    return isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError))
