"""Registries of plugins, in the style of timm's ``_registry.py``: preference losses, reward losses, judges,
advantage estimators.

Built-in plugins register themselves with a decorator when their package is imported (``register_loss``,
``register_reward_loss``, ``register_judge``); a registry imports that package itself the first time it is asked
for names, so nothing else has to. Third-party packages add theirs through an entry-point group:

.. code-block:: toml

    [project.entry-points."lightning_pref.losses"]  # or .reward_losses, .judges, .advantages
    my_loss = "my_pkg.losses:MyLoss"

Loading the entry point imports the module; a class that is not registered yet is registered under the entry
point's name.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownPluginError(KeyError):
    """Raised for a plugin name (of any registry) that is not registered; its message lists the registered names."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


class Registry(Generic[T]):
    """Named plugin classes of one kind.

    Args:
        kind: what the plugins are, in messages (``loss``, ``judge``).
        plural: its plural, in messages.
        group: the entry-point group third-party packages advertise theirs under.
        base: import path of the base class every plugin of this registry subclasses (imported when plugins
            load, to check them: the registry module itself is imported by the plugins' packages).
        package: the package whose import registers the built-in plugins.
    """

    def __init__(self, kind: str, plural: str, group: str, base: str, package: str) -> None:
        self.kind, self.plural, self.group, self.base, self.package = kind, plural, group, base, package
        self.classes: dict[str, type[T]] = {}
        self.plugins_loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator that registers a class under ``name``.

        Raises:
            ValueError: if another class is already registered under ``name``.
        """

        def decorator(cls: type[T]) -> type[T]:
            existing = self.classes.get(name)
            if existing is not None and _qualname(existing) != _qualname(cls):
                raise ValueError(f"{self.kind} name {name!r} is already registered by {_qualname(existing)}")
            self.classes[name] = cls
            cls.registered_name = name
            return cls

        return decorator

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``.

        Raises:
            UnknownPluginError: with the registered names and the closest match.
        """
        self.load_plugins()
        if name in self.classes:
            return self.classes[name]
        raise UnknownPluginError(self.unknown_message(name))

    def create(self, name: str, **kwargs: Any) -> T:
        """Instantiate the class registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Sorted names of all registered classes, entry-point plugins included."""
        self.load_plugins()
        return sorted(self.classes)

    def unknown_message(self, name: str) -> str:
        """One line naming the unknown name, the closest registered one and all registered names."""
        names = sorted(self.classes)
        close = difflib.get_close_matches(name.lower(), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"Unknown {self.kind} {name!r}.{hint} Registered {self.plural}: {', '.join(names)}."

    def resolve(self, value: str) -> type[T] | None:
        """The class a registered name or a registered class's name refers to; ``None`` for anything else."""
        if value in self.names():
            return self.classes[value]
        return next((c for c in self.classes.values() if c.__name__ == value), None)

    def from_spec(self, spec: dict[str, Any]) -> T:
        """Build from ``{"class_path", "init_args"}`` (``class_path`` an import path or a registered name), as
        checkpoints keep a plugin.

        Raises:
            UnknownPluginError: the class cannot be found (e.g. the plugin that defined it is not installed).
        """
        path, init_args = spec["class_path"], spec.get("init_args") or {}
        if "." not in path:
            return self.create(path, **init_args)
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise UnknownPluginError(f"{self.kind} {path!r} cannot be imported; install the package that defines it") from None
        return cls(**init_args)

    def names_subclasses_of(self, cls: object) -> bool:
        """Whether this registry's plugins are what a parameter typed ``cls`` takes (``cls`` is the base class or
        one of its subclasses), so a registered name may stand for one."""
        return any(_qualname(c) == self.base for c in getattr(cls, "__mro__", ()))

    def load_plugins(self, force: bool = False) -> None:
        """Import the built-in plugins' package, then the classes advertised under this registry's entry-point
        group.

        A plugin that fails to import produces a warning naming its distribution instead of a crash, so one
        broken package cannot take the CLI down.
        """
        if self.plugins_loaded and not force:
            return
        self.plugins_loaded = True
        importlib.import_module(self.package)
        for ep in importlib.metadata.entry_points(group=self.group):
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            try:
                obj = ep.load()
                module, _, name = self.base.rpartition(".")
                base = getattr(importlib.import_module(module), name)
                if not (isinstance(obj, type) and issubclass(obj, base)):
                    raise TypeError(f"{ep.value} is a {type(obj).__name__}, not a {name} class")
                if obj not in self.classes.values():
                    self.register(ep.name)(obj)
            except Exception as err:  # noqa: BLE001 - any failure of third-party code must not crash us
                warnings.warn(
                    f"lightning-pref: could not load {self.kind} plugin {ep.name!r} ({ep.value}) from distribution "
                    f"{dist!r}: {type(err).__name__}: {err}",
                    stacklevel=2,
                )


class Recorded:
    """Mixin of plugin classes: each keeps its constructor's arguments, so :attr:`spec` can rebuild it (a
    checkpoint keeps the loss it was trained with this way)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_init(cls.__init__)

    @property
    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``, as in YAML."""
        cls = type(self)
        return {"class_path": _qualname(cls), "init_args": dict(self.__dict__.get("_init_args") or {})}


def _recording_init(init: Any) -> Any:
    """Wrap ``__init__`` to keep its bound arguments (defaults filled in) as ``_init_args``; for a subclass
    calling ``super().__init__``, the outermost (most derived) call's arguments are kept."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recording(self: Any, *args: Any, **kwargs: Any) -> None:
        outermost = "_init_args" not in self.__dict__
        if outermost:
            self.__dict__["_init_args"] = None  # inner __init__ calls see it and leave it to this one
        init(self, *args, **kwargs)
        if outermost:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = {}
            for name, value in list(bound.arguments.items())[1:]:  # [0] is self
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    arguments[name] = value
            self.__dict__["_init_args"] = arguments
            _check_finite(type(self), arguments)

    return recording


def _check_finite(cls: type, arguments: dict[str, Any]) -> None:
    """Refuse a NaN or infinite number among a plugin's arguments (also inside a dict or list, e.g. a weighted
    loss's terms): the range checks plugins make (``beta <= 0``) are false for NaN, which would reach the loss
    and be reported as a learning-rate problem. A ``ValueError``, as plugins refuse their other arguments (the
    CLI names the option)."""
    def bad(value: Any) -> bool:
        if isinstance(value, dict):
            return any(bad(v) for v in value.values())
        if isinstance(value, list | tuple):
            return any(bad(v) for v in value)
        return isinstance(value, float) and not math.isfinite(value)

    for name, value in arguments.items():
        if bad(value):
            plugin = getattr(cls, "registered_name", "") or cls.__name__
            raise ValueError(f"{plugin}: {name} must be finite, got {value!r}")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: Preference losses (``model.loss`` of ``PreferenceModule``).
LOSSES: Registry = Registry(
    "loss", "losses", "lightning_pref.losses", "lightning_pref.losses.base.PreferenceLoss", "lightning_pref.losses"
)
#: Pairwise reward-model losses (``model.loss`` of ``RewardModule``).
REWARD_LOSSES: Registry = Registry(
    "reward loss", "reward losses", "lightning_pref.reward_losses", "lightning_pref.reward.losses.base.RewardLoss",
    "lightning_pref.reward.losses",
)
#: Judges of completions (``evaluate --judge``, on-policy training).
JUDGES: Registry = Registry(
    "judge", "judges", "lightning_pref.judges", "lightning_pref.judges.base.Judge", "lightning_pref.judges"
)
#: Advantage estimators (``model.estimator`` of ``PolicyGradientModule``).
ADVANTAGES: Registry = Registry(
    "advantage estimator", "advantage estimators", "lightning_pref.advantages",
    "lightning_pref.rl.advantages.base.AdvantageEstimator", "lightning_pref.rl.advantages",
)
#: Every registry: what the CLI resolves registered names in and lists.
REGISTRIES: tuple[Registry, ...] = (LOSSES, REWARD_LOSSES, JUDGES, ADVANTAGES)

register_loss = LOSSES.register
get_loss_class = LOSSES.get
get_loss = LOSSES.create
list_losses = LOSSES.names
register_reward_loss = REWARD_LOSSES.register
register_judge = JUDGES.register
register_advantage = ADVANTAGES.register


def load_plugins(force: bool = False) -> None:
    """Import the plugins of every registry (losses, reward losses, judges, advantage estimators)."""
    for registry in REGISTRIES:
        registry.load_plugins(force)
