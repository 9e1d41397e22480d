"""Method registry: method name -> (config class, tuner class).

Built-in methods register themselves when :mod:`monai_peft.methods` is imported. Third-party code
adds a method without touching monai_peft, either by calling :func:`register_method` or by
declaring an entry point in the ``monai_peft.methods`` group that points at a module (or callable)
which registers its methods when loaded::

    [options.entry_points]
    monai_peft.methods =
        my_method = my_package.my_method

Example::

    import monai_peft as mp

    @dataclass
    class MyConfig(mp.PeftConfig):
        scale: float = 1.0

    class MyTuner(mp.BaseTuner):
        def inject(self, model, adapter_name): ...

    mp.register_method("my_method", MyConfig, MyTuner)
    model = mp.get_peft_model(net, mp.get_config("my_method", scale=0.5))
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from monai_peft.errors import ConfigError

if TYPE_CHECKING:
    from monai_peft.config import PeftConfig
    from monai_peft.methods.base import BaseTuner

ENTRY_POINT_GROUP = "monai_peft.methods"


@dataclass(frozen=True)
class MethodSpec:
    """One registered method."""

    name: str
    config_cls: type[PeftConfig]
    tuner_cls: type[BaseTuner]


_REGISTRY: dict[str, MethodSpec] = {}
_entry_points_loaded = False


def register_method(
    name: str, config_cls: type[PeftConfig], tuner_cls: type[BaseTuner], *, overwrite: bool = False
) -> None:
    """Register a PEFT method under ``name``.

    Args:
        name: registry key (lower case, e.g. ``"lora"``); also stored in saved adapter configs.
        config_cls: a :class:`~monai_peft.config.PeftConfig` dataclass subclass.
        tuner_cls: a :class:`~monai_peft.methods.base.BaseTuner` subclass that injects the method.
        overwrite: replace an existing registration instead of raising.
    """
    from monai_peft.config import PeftConfig
    from monai_peft.methods.base import BaseTuner

    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(f"method name must be a non-empty string without surrounding spaces, got {name!r}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, PeftConfig)):
        raise ConfigError(f"config_cls for {name!r} must subclass monai_peft.PeftConfig, got {config_cls!r}")
    if not (isinstance(tuner_cls, type) and issubclass(tuner_cls, BaseTuner)):
        raise ConfigError(f"tuner_cls for {name!r} must subclass monai_peft.BaseTuner, got {tuner_cls!r}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] != MethodSpec(name, config_cls, tuner_cls):
        raise ConfigError(f"a method named {name!r} is already registered; pass overwrite=True to replace it")
    config_cls.method = name
    _REGISTRY[name] = MethodSpec(name, config_cls, tuner_cls)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()
        if callable(loaded) and not isinstance(loaded, type):
            loaded()


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name`` (error lists the known names)."""
    import monai_peft.methods  # noqa: F401  (registers the built-in methods)

    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown PEFT method {name!r}; registered methods: {list_methods()}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    import monai_peft.methods  # noqa: F401

    _load_entry_points()
    return sorted(_REGISTRY)


def get_config(name: str, preset: str | None = None, **kwargs: Any) -> PeftConfig:
    """Build the config of method ``name``: ``get_config("lora", r=4)`` == ``LoraConfig(r=4)``.

    Args:
        name: a registered method (:func:`list_methods`).
        preset: a named source configuration of that method (:func:`list_paper_presets`), e.g. ``"med-peft"`` for
            LoRA or ``"dutt2023"``; see :mod:`monai_peft.paper_presets` and ``docs/methods/presets.md``.
        **kwargs: config fields; they override the preset's values.

    Raises:
        ConfigError: unknown method, field or preset (the message lists the valid ones).

    Example::

        get_config("lora", preset="med-peft")          # LoraConfig(r=4, alpha=32, dropout=0.1, qkv_slices="qv")
        get_config("lora", preset="med-peft", r=32)    # the same with the paper's 100 %-label rank
    """
    cls = get_method(name).config_cls
    unknown = sorted(set(kwargs) - set(cls.field_names()))
    if unknown:
        raise ConfigError(f"unknown argument(s) {unknown} for method {name!r}; valid: {sorted(cls.field_names())}")
    values: dict[str, Any] = {}
    if preset is not None:
        from monai_peft.paper_presets import get_paper_preset

        values = dict(get_paper_preset(name, preset).values)
        stale = sorted(set(values) - set(cls.field_names()))
        if stale:
            raise ConfigError(
                f"preset {preset!r} of method {name!r} sets field(s) {stale} that {cls.__name__} does not have"
            )
    values.update(kwargs)
    return cls(**values)


def list_paper_presets(method: str | None = None) -> list[str] | dict[str, list[str]]:
    """Names of the paper presets of ``method`` (``get_config(method, preset=...)``), or ``{method: names}``
    for all methods when None (see :mod:`monai_peft.paper_presets`)."""
    from monai_peft.paper_presets import list_presets as _list

    if method is not None:
        get_method(method)  # unknown method -> the registry's error
    return _list(method)


#: Short name inside :mod:`monai_peft.registry` (``mp.list_paper_presets`` at the top level, since network
#: target presets have their own ``monai_peft.targeting.list_presets``).
list_presets = list_paper_presets
