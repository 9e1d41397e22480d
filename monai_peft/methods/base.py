"""What every PEFT method is built from.

- :class:`AdapterLayer`: a module that wraps one module of the base network (``base_layer``) and
  holds the tensors of one or more *named* adapters in ``self.adapters[name]``. One adapter is
  active at a time; it can be disabled (base behaviour) and, when the algebra allows, merged into
  the base weights. Layers never hold optimiser state or know about other layers.
- :class:`BaseTuner`: applies one method to a network: picks targets (config or network preset),
  wraps them with the method's adapter layers, and/or names base tensors the method tunes in
  place (selective tuning). :class:`~monai_peft.model.PeftModel` drives tuners and layers only
  through this interface, so nothing method-specific lives in the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from monai_peft.errors import AdapterError, MethodNotApplicableError, TargetingError
from monai_peft.targeting import (
    TargetSpec,
    find_targets,
    get_preset,
    get_submodule,
    innermost,
    set_submodule,
)

if TYPE_CHECKING:
    from monai_peft.config import PeftConfig
    from monai_peft.targeting import NetworkPreset

__all__ = ["AdapterLayer", "BaseTuner", "WrappingTuner"]


class AdapterLayer(nn.Module):
    """Wraps ``base_layer`` and adds named adapters to its computation.

    Subclasses implement :meth:`forward` using :meth:`active` (the active adapter's module, or
    ``None`` when the base behaviour is wanted), and, if ``mergeable``, :meth:`merge_adapter_into_base`
    / :meth:`unmerge_adapter_from_base`.

    State (plain attributes, visible to ``torch.compile`` guards):
        active_adapter: name of the active adapter (may be absent from this layer).
        disabled: True inside ``PeftModel.disable_adapter()``.
        merged_adapter: name of the adapter folded into the base weights, or None.
    """

    _is_monai_peft_adapter_layer: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    method_name: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks come from the wrapped module (e.g. timm's ``patch_embed.grid_size``,
        ``in_features``), so code that inspects a wrapped module keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters") or "base_layer" not in self._modules:
                raise
            return getattr(self._modules["base_layer"], name)

    # -- adapter bookkeeping ---------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:
            raise AdapterError(f"layer already has an adapter named {name!r}")
        weight = next(iter(self.base_layer.parameters()), None)
        if weight is not None:
            adapter.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        self.adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        if name in self.adapters:
            del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name

    def active(self) -> nn.Module | None:
        """The adapter to apply in :meth:`forward`, or None (disabled, merged, or not here)."""
        name = self.active_adapter
        if self.disabled or self.merged_adapter is not None or name is None or name not in self.adapters:
            return None
        return self.adapters[name]

    # -- merging ---------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the active adapter into the base weights (no-op if not present here)."""
        name = self.active_adapter
        if name is None or name not in self.adapters or self.merged_adapter == name:
            return
        if self.merged_adapter is not None:
            self.unmerge()
        if not self.mergeable:
            raise AdapterError(f"{type(self).__name__} adapters cannot be merged into the base weights")
        self.merge_adapter_into_base(self.adapters[name])
        self.merged_adapter = name

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        self.unmerge_adapter_from_base(self.adapters[self.merged_adapter])
        self.merged_adapter = None

    def merge_adapter_into_base(self, adapter: nn.Module) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def unmerge_adapter_from_base(self, adapter: nn.Module) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapter!r}, merged={self.merged_adapter!r}"


class BaseTuner:
    """Applies one PEFT method, configured by ``config``, to a network.

    Subclasses override :meth:`inject` (add adapter layers) and/or :meth:`owned_tensors` (base
    parameters tuned in place). Both receive the network with any earlier adapters in place and
    must address modules by canonical name (see :mod:`monai_peft.targeting`).
    """

    config_cls: ClassVar[type[PeftConfig]]

    def __init__(self, config: PeftConfig) -> None:
        self.config = config

    @property
    def method(self) -> str:
        return self.config.method

    def owned_tensors(self, model: nn.Module) -> list[str]:
        """Canonical names of base parameters/buffers this method trains in place."""
        return []

    def inject(self, model: nn.Module, adapter_name: str) -> None:
        """Add this method's adapter layers to ``model`` under ``adapter_name``."""

    def check_applicable(self, model: nn.Module) -> None:
        """Raise :class:`MethodNotApplicableError` / :class:`TargetingError` (saying why) if this method,
        as configured, cannot be applied to ``model``. Must not modify ``model``."""
        self.owned_tensors(model)

    # -- helpers shared by the methods ----------------------------------------------------------
    def preset(self, model: nn.Module) -> NetworkPreset | None:
        return get_preset(model)

    def preset_role(self, model: nn.Module, *roles: str) -> TargetSpec:
        """The first preset role that exists for ``model``, or a clear error naming alternatives."""
        preset = self.preset(model)
        if preset is not None:
            for role in roles:
                spec = preset.role(role)
                if spec is not None:
                    return spec
        net = type(innermost(model)).__name__
        where = f"the {preset.name} preset has no {' / '.join(roles)} role" if preset else f"{net} has no preset"
        raise TargetingError(
            f"{self.method}: target_modules=None needs a network preset ({where}); pass target_modules "
            f"(names, dotted suffixes or 're:' regexes) and/or target_types explicitly"
        )

    def target_spec(self, model: nn.Module, *default_roles: str) -> TargetSpec:
        """The config's explicit targets, or the preset's ``default_roles`` when none are given."""
        cfg = self.config
        if cfg.target_modules is None and not cfg.target_types:
            base = self.preset_role(model, *default_roles)
            exclude: list[str] | str | None = base.exclude
            if cfg.exclude_modules is not None:
                exclude = _merge_excludes(base.exclude, cfg.exclude_modules)
            return TargetSpec(modules=base.modules, types=base.types, exclude=exclude)
        return TargetSpec(modules=cfg.target_modules, types=cfg.target_types, exclude=cfg.exclude_modules)

    def resolve(self, model: nn.Module, *default_roles: str) -> list[str]:
        """Canonical names of the modules this method adapts."""
        return find_targets(model, self.target_spec(model, *default_roles))


def _merge_excludes(a: list[str] | str | None, b: list[str] | str | None) -> list[str]:
    def as_list(x: list[str] | str | None) -> list[str]:
        if x is None:
            return []
        return [f"re:{x}"] if isinstance(x, str) else list(x)

    return as_list(a) + as_list(b)


class WrappingTuner(BaseTuner):
    """A tuner that wraps each target module in an :class:`AdapterLayer`.

    Subclasses define :attr:`default_roles`, :meth:`layer_class` (which wrapper fits a module, or
    None if the method cannot adapt it) and :meth:`build_adapter` (the per-adapter module).
    """

    default_roles: ClassVar[tuple[str, ...]] = ()
    applies_to: ClassVar[str] = ""

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:  # pragma: no cover
        raise NotImplementedError

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def check_targets(self, model: nn.Module, names: list[str]) -> None:
        """Hook for whole-selection checks (e.g. fused-qkv slices need a fused qkv target)."""

    def plan(self, model: nn.Module) -> list[tuple[str, nn.Module, type[AdapterLayer]]]:
        """(canonical name, original module, layer class) of every module to wrap; raises if none."""
        names = self.resolve(model, *self.default_roles)
        plan: list[tuple[str, nn.Module, type[AdapterLayer]]] = []
        rejected: list[str] = []
        for name in names:
            module = innermost(get_submodule(model, name))
            layer_cls = self.layer_class(name, module)
            if layer_cls is None:
                rejected.append(f"{name} ({type(module).__name__})")
            else:
                plan.append((name, module, layer_cls))
        if rejected and (self.config.target_modules is not None or self.config.target_types):
            explicit = self.config.target_modules is not None and not isinstance(self.config.target_modules, str)
            if explicit or not plan:
                raise MethodNotApplicableError(
                    f"{self.method} cannot adapt {', '.join(rejected[:8])}{' ...' if len(rejected) > 8 else ''}; "
                    f"it applies to {self.applies_to}. Narrow target_modules/target_types or choose another method"
                )
        if not plan:
            raise MethodNotApplicableError(
                f"{self.method} found nothing it can adapt in {type(innermost(model)).__name__} "
                f"(it applies to {self.applies_to}); candidates were {rejected[:8]}"
            )
        self.check_targets(model, [n for n, _, _ in plan])
        return plan

    def check_applicable(self, model: nn.Module) -> None:
        self.plan(model)

    def inject(self, model: nn.Module, adapter_name: str) -> None:
        for name, module, layer_cls in self.plan(model):
            adapter = self.build_adapter(name, module, layer_cls)
            current = get_submodule(model, name)
            if isinstance(current, layer_cls):
                layer = current
            else:
                layer = layer_cls(current)
                set_submodule(model, name, layer)
            layer.add_adapter(adapter_name, adapter)

