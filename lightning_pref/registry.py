"""A small registry of loss plugins, in the style of timm's ``_registry.py``.

Built-in losses register themselves with :func:`register_loss` when ``lightning_pref.losses`` is imported.
Third-party packages add theirs through the entry-point group ``lightning_pref.losses``:

.. code-block:: toml

    [project.entry-points."lightning_pref.losses"]
    my_loss = "my_pkg.losses:MyLoss"

Loading the entry point imports the module; a class that is not registered yet is registered under the entry
point's name.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from lightning_pref.losses.base import PreferenceLoss

ENTRY_POINT_GROUP = "lightning_pref.losses"

_LOSSES: dict[str, type[PreferenceLoss]] = {}
_plugins_loaded = False

L = TypeVar("L", bound="type[PreferenceLoss]")


class UnknownLossError(KeyError):
    """Raised for a loss name that is not registered; its message lists the registered names."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


def register_loss(name: str) -> Callable[[L], L]:
    """Class decorator that registers a loss under ``name``.

    Raises:
        ValueError: if another class is already registered under ``name``.
    """

    def decorator(cls: L) -> L:
        existing = _LOSSES.get(name)
        if existing is not None and _qualname(existing) != _qualname(cls):
            raise ValueError(f"loss name {name!r} is already registered by {_qualname(existing)}")
        _LOSSES[name] = cls
        cls.registered_name = name
        return cls

    return decorator


def get_loss_class(name: str) -> type[PreferenceLoss]:
    """Look up a registered loss class by name.

    Raises:
        UnknownLossError: with the registered names and the closest match.
    """
    load_plugins()
    if name in _LOSSES:
        return _LOSSES[name]
    raise UnknownLossError(unknown_loss_message(name))


def get_loss(name: str, **kwargs) -> PreferenceLoss:
    """Instantiate the loss registered under ``name`` with ``kwargs`` (e.g. ``get_loss("dpo", beta=0.1)``)."""
    return get_loss_class(name)(**kwargs)


def loss_from_spec(spec: dict) -> PreferenceLoss:
    """Build a loss from ``{"class_path", "init_args"}`` (``PreferenceLoss.spec``, as checkpoints keep it).

    ``class_path`` is an import path or a registered name.

    Raises:
        UnknownLossError: the class cannot be found (e.g. the plugin that defined it is not installed).
    """
    import importlib

    path, init_args = spec["class_path"], spec.get("init_args") or {}
    if "." not in path:
        return get_loss(path, **init_args)
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UnknownLossError(f"loss {path!r} cannot be imported; install the package that defines it") from None
    return cls(**init_args)


def list_losses() -> list[str]:
    """Sorted names of all registered losses, entry-point plugins included."""
    load_plugins()
    return sorted(_LOSSES)


def unknown_loss_message(name: str) -> str:
    """One line naming the unknown loss, the closest registered name and all registered names."""
    names = sorted(_LOSSES)
    close = difflib.get_close_matches(name.lower(), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"Unknown loss {name!r}.{hint} Registered losses: {', '.join(names)}."


def load_plugins(force: bool = False) -> None:
    """Import the losses advertised under the ``lightning_pref.losses`` entry-point group.

    A plugin that fails to import produces a warning naming its distribution instead of a crash, so one broken
    package cannot take the CLI down.
    """
    global _plugins_loaded
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown distribution"
        try:
            obj = ep.load()
            if not isinstance(obj, type):
                raise TypeError(f"{ep.value} is a {type(obj).__name__}, not a PreferenceLoss class")
            if obj not in _LOSSES.values():
                register_loss(ep.name)(obj)
        except Exception as err:  # noqa: BLE001 - any failure of third-party code must not crash us
            warnings.warn(
                f"lightning-pref: could not load loss plugin {ep.name!r} ({ep.value}) from distribution "
                f"{dist!r}: {type(err).__name__}: {err}",
                stacklevel=2,
            )


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
