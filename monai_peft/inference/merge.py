"""Get a network ready for inference: eval mode, and every mergeable adapter folded into the base weights.

A merged LoRA / SSF / FacT / SVDiff / DiffFit / selective-tuning adapter costs nothing at inference: the
network is the plain base network with updated weights, ``W' = W + (alpha / r) B A`` for LoRA. Adapters that add
computation which is not a weight update (DKA, bottleneck adapters, prompts) cannot be merged; such a network runs
as it is.

Mergeability is read from the adapter layers themselves (``AdapterLayer.mergeable``), the same rule
:meth:`monai_peft.PeftModel.merge_adapter` enforces, so a new method is handled as soon as its layer says whether
it can be merged.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

from torch import nn

from monai_peft.model import PeftModel

__all__ = ["MergeReport", "merge_report", "prepare_for_inference"]


class MergeReport(NamedTuple):
    """Whether a :class:`~monai_peft.PeftModel` can be merged, and why not.

    Attributes:
        mergeable: True when :meth:`PeftModel.merge_and_unload` would fold the active adapter into the weights.
        reason: a sentence saying why not (empty when mergeable).
    """

    mergeable: bool
    reason: str


def merge_report(model: PeftModel) -> MergeReport:
    """Tell whether the active adapter of ``model`` can be merged into its base weights.

    Args:
        model: a :class:`~monai_peft.PeftModel`.

    Returns:
        :class:`MergeReport`. Not mergeable when the model has no active adapter, is inside
        ``disable_adapter()``, was already unloaded, or when any adapter layer holding the active adapter
        is not mergeable (DKA, bottleneck adapters, prompts ...).
    """
    if not isinstance(model, PeftModel):
        return MergeReport(False, f"{type(model).__name__} is not a monai_peft PeftModel")
    if model._unloaded:
        return MergeReport(False, "the PeftModel was already unloaded; use the module merge_and_unload returned")
    if model._disabled:
        return MergeReport(False, "the adapters are disabled (inside disable_adapter())")
    name = model.active_adapter
    if name is None:
        return MergeReport(False, "the PeftModel has no active adapter")
    blocked = sorted(
        {type(layer).__name__ for _, layer in model.adapter_layers() if name in layer.adapters and not layer.mergeable}
    )
    if blocked:
        method = model.peft_config[name].method
        return MergeReport(False, f"adapter {name!r} ({method}) uses layers that add computation: {blocked}")
    return MergeReport(True, "")


def _peft_children(model: nn.Module) -> list[tuple[str, PeftModel]]:
    """Outermost :class:`PeftModel` submodules of ``model`` (``model`` itself excluded), by qualified name."""
    found: list[tuple[str, PeftModel]] = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, PeftModel):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def _replace(root: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def prepare_for_inference(model: nn.Module, merge: bool = True, inplace: bool = False) -> nn.Module:
    """Return ``model`` ready for inference: in eval mode, with mergeable adapters merged.

    * A :class:`~monai_peft.PeftModel` whose active adapter is mergeable (LoRA, SSF, TSA, FacT, SVDiff, DiffFit,
      BitFit and other selective tuning ...) gives the **plain base module** with the adapter folded into its
      weights (``merge_and_unload``): same outputs up to float rounding, no adapter overhead.
    * A PeftModel whose adapter cannot be merged (DKA, bottleneck adapters, prompts), any other network, or
      ``merge=False`` gives ``model`` itself, unmerged.
    * A plain module that *contains* PeftModels (e.g. a wrapper with its own head) gets each mergeable PeftModel
      replaced by its merged module.

    Merging never touches the caller's model unless ``inplace=True``: the network is deep-copied first (on its
    device, so merging needs room for a second copy of the weights there; the copy is what is returned).

    Args:
        model: the network (a PeftModel, a module containing PeftModels, or any ``nn.Module``).
        merge: fold mergeable adapters into the weights (False: only switch to eval mode).
        inplace: merge the caller's PeftModel itself instead of a copy (saves memory; the caller's PeftModel is
            unloaded and can no longer be used, exactly as after ``merge_and_unload``).

    Returns:
        The module to run, in eval mode, with ``requires_grad`` off on merged copies.

    Note:
        Eval mode is set on what is returned. When nothing is merged, that is the caller's ``model``, so the
        caller's model is switched to eval mode (as MONAI's evaluators do anyway).

    Example::

        peft = mp.get_peft_model(SwinUNETR(...), mp.LoraConfig(r=8))
        net = prepare_for_inference(peft)           # plain SwinUNETR with merged weights, peft untouched
        net = prepare_for_inference(peft_dka)       # the DKA PeftModel itself, in eval mode
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_for_inference expects an nn.Module, got {type(model).__name__}")
    if not merge:
        return model.eval()
    if isinstance(model, PeftModel):
        if not merge_report(model).mergeable:
            return model.eval()
        target = model if inplace else copy.deepcopy(model)
        merged = target.merge_and_unload()
        return merged.eval()
    children = [(name, child) for name, child in _peft_children(model) if merge_report(child).mergeable]
    if not children:
        return model.eval()
    root = model if inplace else copy.deepcopy(model)
    for name, _ in children:
        _replace(root, name, root.get_submodule(name).merge_and_unload())
    if not inplace:
        for p in root.parameters():
            p.requires_grad_(False)
    return root.eval()
