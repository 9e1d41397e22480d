"""Base tensors that adapters train *in place* (selective tuning, ``modules_to_save``, BatchNorm
running statistics).

Selective methods (BitFit, norm tuning, partial-k, full fine-tuning ...) train a subset of the base
network's own parameters, exactly as the papers do, so a PEFT model costs no extra accelerator
memory. To keep the adapter semantics (several named adapters, ``disable_adapter``, ``unload``),
this module remembers the original value of every such tensor (a CPU copy) and swaps values when
the active adapter changes. The live tensors in the network always hold the values of the adapter
that is "live" (the active one, or the base values when adapters are disabled).
"""

from __future__ import annotations

import torch
from torch import nn

from monai_peft.errors import AdapterError
from monai_peft.targeting import canonical_named_tensors

__all__ = ["InPlaceState"]


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


class InPlaceState:
    """Bookkeeping of in-place-trained base tensors for every adapter of one model."""

    def __init__(self) -> None:
        self.owned: dict[str, list[str]] = {}
        self.base: dict[str, torch.Tensor] = {}
        self.stored: dict[str, dict[str, torch.Tensor]] = {}
        self.live_adapter: str | None = None

    # ------------------------------------------------------------------------------------------
    def all_names(self) -> set[str]:
        return {n for names in self.owned.values() for n in names}

    def add(self, model: nn.Module, adapter: str, names: list[str]) -> None:
        """Register ``names`` as trained in place by ``adapter`` (values start at the base's)."""
        tensors = canonical_named_tensors(model)
        missing = [n for n in names if n not in tensors]
        if missing:
            raise AdapterError(f"adapter {adapter!r} names tensors that the model does not have: {missing[:8]}")
        live_owned = set(self.owned.get(self.live_adapter, [])) if self.live_adapter else set()
        for n in names:
            if n not in self.base:
                if n in live_owned:  # pragma: no cover - base always holds names owned by anyone
                    raise AdapterError(f"internal error: no base value recorded for {n}")
                self.base[n] = _cpu_copy(tensors[n])
        self.owned[adapter] = list(dict.fromkeys(names))

    def remove(self, model: nn.Module, adapter: str) -> None:
        if self.live_adapter == adapter:
            self.switch(model, None)
        self.owned.pop(adapter, None)
        self.stored.pop(adapter, None)
        still = self.all_names()
        for n in list(self.base):
            if n not in still:
                del self.base[n]

    # ------------------------------------------------------------------------------------------
    def switch(self, model: nn.Module, adapter: str | None) -> None:
        """Make ``adapter``'s values live (None: the base values)."""
        old = self.live_adapter
        if old == adapter:
            return
        old_names = self.owned.get(old, []) if old is not None else []
        new_names = self.owned.get(adapter, []) if adapter is not None else []
        if not old_names and not new_names:
            self.live_adapter = adapter
            return
        tensors = canonical_named_tensors(model)
        if old is not None:
            self.stored[old] = {n: _cpu_copy(tensors[n]) for n in old_names}
        new_values = self.stored.get(adapter, {}) if adapter is not None else {}
        with torch.no_grad():
            for n in dict.fromkeys([*old_names, *new_names]):
                tensors[n].copy_(new_values.get(n, self.base[n]))
        self.live_adapter = adapter

    def values(self, model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
        """Current values of ``adapter``'s in-place tensors (live or stored)."""
        names = self.owned.get(adapter, [])
        if not names:
            return {}
        if self.live_adapter == adapter:
            tensors = canonical_named_tensors(model)
            return {n: tensors[n].detach() for n in names}
        stored = self.stored.get(adapter, {})
        return {n: stored.get(n, self.base[n]) for n in names}

    def set_values(self, model: nn.Module, adapter: str, values: dict[str, torch.Tensor]) -> None:
        """Assign loaded values to ``adapter``'s in-place tensors (live or stored)."""
        if self.live_adapter == adapter:
            tensors = canonical_named_tensors(model)
            with torch.no_grad():
                for n, v in values.items():
                    tensors[n].copy_(v)
        else:
            self.stored.setdefault(adapter, {}).update({n: _cpu_copy(v) for n, v in values.items()})

    def restore_base(self, model: nn.Module) -> None:
        """Put every base value back (used when unloading all adapters)."""
        self.switch(model, None)

    def forget(self) -> None:
        """Drop all bookkeeping (after ``merge_and_unload``: live values are now the base)."""
        self.owned.clear()
        self.base.clear()
        self.stored.clear()
        self.live_adapter = None
