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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from monai_peft.errors import AdapterError, MethodNotApplicableError, TargetingError
from monai_peft.targeting import (
    TargetSpec,
    exact_patterns,
    find_targets,
    get_preset,
    get_submodule,
    innermost,
    set_submodule,
)

if TYPE_CHECKING:
    from monai_peft.config import PeftConfig
    from monai_peft.targeting import NetworkPreset

__all__ = ["AdapterLayer", "BaseTuner", "PlanItem", "WrappingTuner"]


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
            if name in ("base_layer", "adapters") or name.startswith("__") or "base_layer" not in self._modules:
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

    def resolve_plan(self, model: nn.Module) -> tuple[PeftConfig, dict[str, Any]]:
        """``(resolved config, plan description)`` for ``model``, without modifying either.

        The resolved config names exactly the modules the method adapts and carries every fact the method
        read from the network (qkv slices, token grid, prefix tokens ...), so that building the adapter
        again from it (e.g. when loading a saved adapter) gives the same modules and shapes, whatever the
        presets say by then. The description is JSON, saved in ``adapter_config.json`` under ``"plan"``.
        Default (methods that tune base tensors in place): the config as given and no description.
        """
        return self.config, {}


def _merge_excludes(a: list[str] | str | None, b: list[str] | str | None) -> list[str]:
    def as_list(x: list[str] | str | None) -> list[str]:
        if x is None:
            return []
        return [f"re:{x}"] if isinstance(x, str) else list(x)

    return as_list(a) + as_list(b)


@dataclass(frozen=True)
class PlanItem:
    """One module a :class:`WrappingTuner` wraps, with everything needed to build its adapter.

    Attributes:
        name: canonical name of the target.
        module: the original (innermost) module at ``name``.
        layer_cls: the :class:`AdapterLayer` class that wraps it.
        context: method-specific facts found while planning (e.g. LoRA's qkv rows, DKA's channels and token
            geometry); tuners keep no state between calls, so everything travels here.
    """

    name: str
    module: nn.Module
    layer_cls: type[AdapterLayer]
    context: Any = None


class WrappingTuner(BaseTuner):
    """A tuner that wraps each target module in an :class:`AdapterLayer`.

    Subclasses define :attr:`default_roles`, :meth:`layer_class` (which wrapper fits a module, or
    None if the method cannot adapt it) and :meth:`build_adapter` (the per-adapter module). Tuners
    that need more than the module to build an adapter return it from :meth:`item_context` and
    override :meth:`build`; whole-plan work (probes, shared objects) goes in :meth:`prepare`.
    """

    default_roles: ClassVar[tuple[str, ...]] = ()
    applies_to: ClassVar[str] = ""

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:  # pragma: no cover
        raise NotImplementedError

    def build_adapter(
        self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]
    ) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def item_context(self, model: nn.Module, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> Any:
        """Facts about one accepted target that :meth:`build` needs (default: none)."""
        return None

    def plan_item(self, model: nn.Module, name: str, module: nn.Module) -> PlanItem | str:
        """The :class:`PlanItem` of one candidate, or the reason (a string) it cannot be adapted."""
        layer_cls = self.layer_class(name, module)
        if layer_cls is None:
            return ""
        return PlanItem(name, module, layer_cls, self.item_context(model, name, module, layer_cls))

    def check_targets(self, model: nn.Module, names: list[str]) -> None:
        """Hook for whole-selection checks (e.g. fused-qkv slices need a fused qkv target)."""

    def plan(self, model: nn.Module) -> list[PlanItem]:
        """A :class:`PlanItem` for every module to wrap; raises if none. Does not modify ``model``."""
        names = self.resolve(model, *self.default_roles)
        plan: list[PlanItem] = []
        rejected: list[str] = []
        for name in names:
            module = innermost(get_submodule(model, name))
            item = self.plan_item(model, name, module)
            if isinstance(item, str):
                rejected.append(f"{name} ({type(module).__name__}{': ' + item if item else ''})")
            else:
                plan.append(item)
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
        self.check_targets(model, [item.name for item in plan])
        return plan

    def check_applicable(self, model: nn.Module) -> None:
        self.plan(model)

    def prepare(self, model: nn.Module, plan: list[PlanItem], adapter_name: str) -> Any:
        """Whole-plan work done once per injection, before the adapters are built (default: none)."""
        return None

    def build(self, item: PlanItem, shared: Any) -> nn.Module:
        """The adapter module of one plan item (default: :meth:`build_adapter`)."""
        return self.build_adapter(item.name, item.module, item.layer_cls)

    def inject(self, model: nn.Module, adapter_name: str) -> None:
        plan = self.plan(model)
        shared = self.prepare(model, plan, adapter_name)
        for item in plan:
            adapter = self.build(item, shared)
            current = get_submodule(model, item.name)
            if isinstance(current, item.layer_cls):
                layer = current
            else:
                layer = item.layer_cls(current)
                set_submodule(model, item.name, layer)
            layer.add_adapter(adapter_name, adapter)

    # -- the resolved plan ------------------------------------------------------------------------
    def resolved_fields(self, model: nn.Module, plan: list[PlanItem]) -> dict[str, Any]:
        """Config fields (besides the targets) that the plan resolved from the network (default: none)."""
        return {}

    def item_info(self, item: PlanItem) -> dict[str, Any]:
        """JSON-friendly description of one plan item for the saved plan."""
        info = getattr(item.context, "to_dict", None)
        return {"layer": item.layer_cls.__name__, **(info() if callable(info) else {})}

    def resolve_plan(self, model: nn.Module) -> tuple[PeftConfig, dict[str, Any]]:
        """Targets become the exact module names; see :meth:`BaseTuner.resolve_plan`."""
        plan = self.plan(model)
        names = exact_patterns(model, [item.name for item in plan])  # registration order, exact matches
        config = self.config.replace(
            target_modules=names, target_types=None, exclude_modules=None, **self.resolved_fields(model, plan)
        )
        return config, {"modules": {item.name: self.item_info(item) for item in plan}}
