"""PeftModel: a network with named PEFT adapters, modelled on Hugging Face peft.

It freezes the base, reports trainable parameters, saves/loads adapter-only files, switches,
disables, merges and unloads adapters. Method-specific work is delegated to the method's tuner
(:class:`~monai_peft.methods.base.BaseTuner`) and adapter layers
(:class:`~monai_peft.methods.base.AdapterLayer`), so this module knows no particular method.

Example::

    import monai_peft as mp
    from monai.networks.nets import ViT

    net = ViT(in_channels=1, img_size=(224, 224), patch_size=16, spatial_dims=2, classification=True, num_classes=2)
    model = mp.get_peft_model(net, mp.LoraConfig(r=4, alpha=32), modules_to_save=["classification_head"])
    model.print_trainable_parameters()
    model.save_adapter("out/")
    model = mp.PeftModel.from_pretrained(ViT(...), "out/")
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from monai_peft.checkpoint import (
    base_tensor_digests,
    combine_fingerprint,
    diagnose_base_mismatch,
    load_adapter_folder,
    model_class_name,
    write_adapter_folder,
)
from monai_peft.config import PeftConfig
from monai_peft.errors import (
    AdapterError,
    BaseModelMismatchError,
    CheckpointError,
    ConfigError,
    MethodNotApplicableError,
    TargetingError,
)
from monai_peft.inplace import InPlaceState
from monai_peft.methods.base import AdapterLayer, BaseTuner
from monai_peft.registry import get_method, list_methods
from monai_peft.targeting import (
    TargetSpec,
    canonical_named_modules,
    canonical_named_tensors,
    find_targets,
    innermost,
    set_submodule,
)

__all__ = ["PeftModel", "applicable_methods", "get_peft_model"]

_VERIFY_CHOICES = ("strict", "warn", "off")


def applicable_methods(model: nn.Module) -> list[str]:
    """Registered methods that, with their default config, can be applied to ``model``."""
    names = []
    for name in list_methods():
        spec = get_method(name)
        try:
            spec.tuner_cls(spec.config_cls()).check_applicable(model)
        except Exception:  # any failure means "does not apply with its defaults"
            continue
        names.append(name)
    return names


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    modules_to_save: list[str] | None = None,
) -> PeftModel:
    """Wrap ``model`` with the PEFT method described by ``peft_config``.

    Args:
        model: any ``nn.Module`` (MONAI networks have presets for ``target_modules=None``).
        peft_config: a method config, e.g. ``LoraConfig(r=4)`` or ``get_config("dka")``.
        adapter_name: name of this adapter (several can live in one model).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a new head);
            added to ``peft_config.modules_to_save``.

    Returns:
        A :class:`PeftModel` whose only trainable parameters are the adapter's.
    """
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"peft_config must be a monai_peft PeftConfig, got {type(peft_config).__name__}")
    if isinstance(model, PeftModel):
        raise AdapterError(
            "model is already a PeftModel: add another adapter with model.add_adapter(name, config) and "
            "model.set_adapter(name), or pass the plain base network"
        )
    injected = next((name for name, m in model.named_modules() if isinstance(m, AdapterLayer)), None)
    if injected is not None:
        raise AdapterError(
            f"model already holds adapter layers (e.g. at {injected!r}) from an earlier get_peft_model call, which "
            "modified it in place; wrapping it again would train and save both. Build a fresh base network, or use "
            "add_adapter/set_adapter on the first PeftModel"
        )
    if modules_to_save:
        merged = list(dict.fromkeys([*(peft_config.modules_to_save or []), *modules_to_save]))
        peft_config = peft_config.replace(modules_to_save=merged)
    return PeftModel(model, peft_config, adapter_name)


class PeftModel(nn.Module):
    """A base network plus named adapters; ``forward`` runs the base with the active adapter.

    Args:
        model: the base network (modified in place: target modules are wrapped).
        peft_config: config of the first adapter, or None to start without adapters
            (as :meth:`from_pretrained` does).
        adapter_name: name of the first adapter.
        is_trainable: whether the first adapter's parameters require gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig | None = None,
        adapter_name: str = "default",
        is_trainable: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise AdapterError(
                "model is already a PeftModel; use model.add_adapter(name, config) to add another adapter"
            )
        lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:
            raise ConfigError(
                f"the model has uninitialised lazy parameters ({lazy[:3]}); run one forward pass with a dummy "
                "batch before get_peft_model so that every weight exists"
            )
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self._tuners: dict[str, BaseTuner] = {}
        self._plans: dict[str, dict[str, Any]] = {}
        self._trainable: dict[str, bool] = {}
        self._inplace = InPlaceState()
        self._active: str | None = None
        self._disabled = False
        self._merged = False
        self._unloaded = False
        self._base_digests = base_tensor_digests(model)
        for p in model.parameters():
            p.requires_grad_(False)
        if peft_config is not None:
            self.add_adapter(adapter_name, peft_config, is_trainable=is_trainable)
            self.set_adapter(adapter_name)

    # ------------------------------------------------------------------------------------------
    # forwarding
    # ------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_usable()
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def train(self, mode: bool = True) -> PeftModel:
        super().train(mode)
        cfg = self.peft_config.get(self._active) if self._active else None
        if mode and cfg is not None and cfg.batchnorm_stats == "freeze":
            for _, m in canonical_named_modules(self.base_model):  # the base's BatchNorms, not the adapters' own
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------------------------------
    # adapters
    # ------------------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str | None:
        return self._active

    def resolved_plan(self, adapter_name: str | None = None) -> dict[str, Any]:
        """The resolved plan of an adapter (JSON, as saved under ``"plan"`` in ``adapter_config.json``): per adapted
        module its layer and the facts read from the network (qkv slices, token grid, prefix tokens, kernels)."""
        return dict(self._plans.get(self._resolve_name(adapter_name), {}))

    @property
    def active_peft_config(self) -> PeftConfig:
        if self._active is None:
            raise AdapterError("no adapter is active")
        return self.peft_config[self._active]

    def adapter_layers(self) -> list[tuple[str, AdapterLayer]]:
        """(canonical path, layer) of every adapter layer, outermost wrapper first per path."""
        out: list[tuple[str, AdapterLayer]] = []
        for path, _ in canonical_named_modules(self.base_model):
            module = self._outer(path)
            while isinstance(module, AdapterLayer):
                out.append((path, module))
                module = module.base_layer
        return out

    def _outer(self, path: str) -> nn.Module:
        from monai_peft.targeting import get_submodule

        return get_submodule(self.base_model, path)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, is_trainable: bool = True) -> None:
        """Inject a new adapter (not activated: call :meth:`set_adapter`)."""
        self._check_usable()
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise AdapterError(f"adapter name must be a non-empty string without dots, got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} already exists; delete it or choose another name")
        if self._merged:
            raise AdapterError(
                "an adapter is merged into the base weights; call unmerge_adapter() before adding another"
            )
        spec = get_method(peft_config.method)
        if not isinstance(peft_config, spec.config_cls):
            raise ConfigError(f"config class {type(peft_config).__name__} does not match method {spec.name!r}")
        try:
            # the resolved plan: exact module names and every fact read from the network (qkv slices, token
            # grid, prefix tokens); the adapter is built from it, so loading the saved config rebuilds the same
            resolved, plan = spec.tuner_cls(peft_config).resolve_plan(self.base_model)
            tuner = spec.tuner_cls(resolved)
            owned = self._owned_for(tuner, resolved)
            tuner.inject(self.base_model, adapter_name)
            self._inplace.add(self.base_model, adapter_name, owned)
        except (MethodNotApplicableError, TargetingError) as exc:
            self._remove_adapter_layers(adapter_name)
            others = [m for m in applicable_methods(self.base_model) if m != spec.name]
            net = type(innermost(self.base_model)).__name__
            raise type(exc)(f"{exc}. Methods that apply to {net} with their defaults: {others}") from exc
        except Exception:
            self._remove_adapter_layers(adapter_name)
            raise
        self.peft_config[adapter_name] = resolved
        self._plans[adapter_name] = plan
        self._tuners[adapter_name] = tuner
        self._trainable[adapter_name] = is_trainable
        for _, layer in self.adapter_layers():
            layer.set_active(self._active)
        self._apply_requires_grad()

    def _owned_for(self, tuner: BaseTuner, config: PeftConfig) -> list[str]:
        """In-place tensors of an adapter: the method's own, modules_to_save, BatchNorm stats."""
        model = self.base_model
        names = list(tuner.owned_tensors(model))
        if config.modules_to_save:
            for mod_name in find_targets(model, TargetSpec(modules=config.modules_to_save)):
                prefix = f"{mod_name}."
                names += [n for n in canonical_named_tensors(model) if n.startswith(prefix)]
        if config.batchnorm_stats == "save":
            for mod_name, module in canonical_named_modules(model):
                if isinstance(module, _BatchNorm) and module.track_running_stats:
                    names += [f"{mod_name}.{b}" for b, t in module.named_buffers(recurse=False) if t is not None]
        return list(dict.fromkeys(names))

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter (its parameters become trainable)."""
        self._check_usable()
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        if self._merged:
            self.unmerge_adapter()
        for _, layer in self.adapter_layers():
            layer.set_active(adapter_name)
        self._inplace.switch(self.base_model, adapter_name)
        self._active = adapter_name
        self._apply_requires_grad()
        if self.training:
            self.train(True)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter, its layers and in-place values (the base values come back)."""
        self._check_usable()
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        if self._merged:
            self.unmerge_adapter()
        self._inplace.remove(self.base_model, adapter_name)
        self._remove_adapter_layers(adapter_name)
        del self.peft_config[adapter_name], self._tuners[adapter_name], self._trainable[adapter_name]
        self._plans.pop(adapter_name, None)
        if self._active == adapter_name:
            self._active = None
            remaining = list(self.peft_config)
            if remaining:
                self.set_adapter(remaining[0])
        self._apply_requires_grad()

    def _remove_adapter_layers(self, adapter_name: str) -> None:
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        self._drop_empty_layers()

    def _drop_empty_layers(self, keep: bool = True) -> None:
        """Re-link wrapper chains without layers that hold no adapter (all layers if not keep)."""
        paths = dict.fromkeys(path for path, _ in self.adapter_layers())
        for path in paths:
            chain: list[AdapterLayer] = []
            module = self._outer(path)
            while isinstance(module, AdapterLayer):
                chain.append(module)
                module = module.base_layer
            kept = [layer for layer in chain if keep and len(layer.adapters) > 0]
            current: nn.Module = module
            for layer in reversed(kept):
                layer.base_layer = current
                current = layer
            if current is not self._outer(path):
                set_submodule(self.base_model, path, current)

    def _apply_requires_grad(self) -> None:
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        name = self._active
        if name is None or not self._trainable.get(name, False):
            return
        for _, layer in self.adapter_layers():
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.requires_grad_(True)
        tensors = canonical_named_tensors(self.base_model, buffers=False)
        for n in self._inplace.owned.get(name, []):
            t = tensors.get(n)
            if isinstance(t, nn.Parameter) and t.is_floating_point():
                t.requires_grad_(True)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model behaves exactly as the base network."""
        self._check_usable()
        was_merged = self._merged
        if was_merged:
            self.unmerge_adapter()
        layers = [layer for _, layer in self.adapter_layers()]
        for layer in layers:
            layer.disabled = True
        live = self._inplace.live_adapter
        self._inplace.switch(self.base_model, None)
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            if not self._unloaded:
                for layer in layers:
                    layer.disabled = False
                self._inplace.switch(self.base_model, live)
                if was_merged:
                    self.merge_adapter()

    # ------------------------------------------------------------------------------------------
    # merging
    # ------------------------------------------------------------------------------------------
    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (outputs unchanged, no extra compute)."""
        self._check_usable()
        name = self._active
        if name is None:
            raise AdapterError("no active adapter to merge")
        layers = [(p, layer) for p, layer in self.adapter_layers() if name in layer.adapters]
        blocked = sorted({f"{type(layer).__name__} at {p}" for p, layer in layers if not layer.mergeable})
        if blocked:
            raise AdapterError(
                f"adapter {name!r} ({self.peft_config[name].method}) cannot be merged: {blocked[:3]} add "
                "computation that is not a weight update. Deploy the PeftModel itself (it runs in eval mode "
                "like any nn.Module) or use a mergeable method (LoRA, SSF, selective tuning)"
            )
        for _, layer in layers:
            layer.merge()
        self._merged = True

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter` (float rounding aside, the base weights come back)."""
        self._check_usable()
        for _, layer in self.adapter_layers():
            layer.unmerge()
        self._merged = False

    def merge_and_unload(self) -> nn.Module:
        """The base network with the active adapter folded into its weights, as a plain module.

        Inside :meth:`disable_adapter` this returns the untouched base network. The PeftModel must
        not be used afterwards.
        """
        self._check_usable()
        if self._disabled or self._active is None:
            return self.unload()
        if not self._merged:
            self.merge_adapter()
        self._drop_empty_layers(keep=False)
        self._inplace.forget()
        return self._finish_unload()

    def unload(self) -> nn.Module:
        """The base network with every adapter removed and every in-place value restored."""
        self._check_usable()
        if self._merged:
            self.unmerge_adapter()
        self._inplace.restore_base(self.base_model)
        self._drop_empty_layers(keep=False)
        self._inplace.forget()
        return self._finish_unload()

    def _finish_unload(self) -> nn.Module:
        base = self.base_model
        for p in base.parameters():
            p.requires_grad_(False)
        self._unloaded = True
        return base

    def _check_usable(self) -> None:
        if self._unloaded:
            raise AdapterError("this PeftModel was unloaded (merge_and_unload/unload); use the returned module")

    # ------------------------------------------------------------------------------------------
    # parameters
    # ------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        """(number of trainable parameters, number of all parameters), shared tensors once."""
        seen: set[int] = set()
        trainable = total = 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    get_nb_trainable_parameters = trainable_parameters

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        pct = 100.0 * trainable / max(total, 1)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Exactly the tensors an adapter file holds for ``adapter_name`` (default: active).

        A tensor shared by several layers (e.g. FacT's factors) appears once, under its first key.
        Values are views of the live tensors (for the active adapter) or stored copies.
        """
        name = self._resolve_name(adapter_name)
        out: dict[str, torch.Tensor] = {}
        seen: set[tuple] = set()
        for path, layer in self.adapter_layers():
            if name not in layer.adapters:
                continue
            for k, v in layer.adapters[name].state_dict().items():
                ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
                if ident in seen:
                    continue
                seen.add(ident)
                key = f"adapter.{path}.{k}"
                if key in out:
                    raise CheckpointError(f"two adapter layers at {path} would both write {key}")
                out[key] = v
        for n, v in self._inplace.values(self.base_model, name).items():
            out[f"base.{n}"] = v
        return out

    def _resolve_name(self, adapter_name: str | None) -> str:
        name = adapter_name if adapter_name is not None else self._active
        if name is None or name not in self.peft_config:
            raise AdapterError(f"no adapter named {name!r}; adapters: {list(self.peft_config)}")
        return name

    # ------------------------------------------------------------------------------------------
    # saving and loading
    # ------------------------------------------------------------------------------------------
    def base_fingerprint(self, adapter_name: str | None = None) -> str:
        """Fingerprint of the base weights this adapter depends on (in-place tensors excluded)."""
        name = self._resolve_name(adapter_name)
        return combine_fingerprint(self._base_digests, self._inplace.owned.get(name, []))

    def save_adapter(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for one adapter.

        Only what the adapter trains is stored (plus BatchNorm running statistics when
        ``batchnorm_stats="save"``); a fingerprint of the remaining base weights lets
        :meth:`from_pretrained` refuse a different base.
        """
        self._check_usable()
        name = self._resolve_name(adapter_name)
        if self._merged and any(name in layer.adapters for _, layer in self.adapter_layers() if layer.mergeable):
            raise AdapterError("unmerge_adapter() before saving: merged weights would be saved as the base fingerprint")
        owned = self._inplace.owned.get(name, [])
        base_digests = {k: v for k, v in self._base_digests.items() if k not in set(owned)}
        base_info = {
            "class": model_class_name(self.base_model),
            "fingerprint": combine_fingerprint(self._base_digests, owned),
            "num_tensors": len(base_digests),
        }
        return write_adapter_folder(
            save_directory,
            self.peft_config[name].to_dict(),
            self.adapter_state_dict(name),
            base_info,
            base_digests,
            plan=self._plans.get(name) or None,
        )

    save_pretrained = save_adapter

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        verify_base: str = "strict",
    ) -> None:
        """Load an adapter folder written by :meth:`save_adapter` as a new adapter.

        Args:
            model_id: the adapter folder.
            adapter_name: name to give it in this model.
            is_trainable: keep training it (else its parameters are frozen, for inference).
            verify_base: ``"strict"`` raises if the base weights differ from the ones it was
                trained on, ``"warn"`` warns, ``"off"`` skips the check.
        """
        import warnings

        self._check_usable()
        if verify_base not in _VERIFY_CHOICES:
            raise ConfigError(f"verify_base must be one of {_VERIFY_CHOICES}, got {verify_base!r}")
        folder = load_adapter_folder(model_id)
        base_info, tensors, metadata = folder.base_model, folder.tensors, folder.metadata
        config = PeftConfig.from_dict(folder.config)
        tuner = get_method(config.method).tuner_cls(config)
        owned = self._owned_for(tuner, config)
        if verify_base != "off" and base_info.get("fingerprint"):
            actual = combine_fingerprint(self._base_digests, owned)
            if actual != base_info["fingerprint"]:
                try:
                    import json

                    expected = json.loads(metadata.get("base_tensors", "{}"))
                except ValueError:
                    expected = {}
                why = diagnose_base_mismatch(expected, self._base_digests, owned) if expected else "fingerprints differ"
                msg = (
                    f"adapter {model_id} was trained on a different base model (saved for {base_info.get('class')}, "
                    f"loading onto {model_class_name(self.base_model)}): {why}. Load the base weights it was trained "
                    "on, or pass verify_base='warn'/'off' if you know the difference is harmless"
                )
                if verify_base == "strict":
                    raise BaseModelMismatchError(msg)
                warnings.warn(msg, stacklevel=2)
        self.add_adapter(adapter_name, config, is_trainable=is_trainable)
        try:
            self._assign_adapter_tensors(adapter_name, tensors, str(model_id))
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def _assign_adapter_tensors(self, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = self.adapter_state_dict(name)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"adapter file {source} does not fit the adapter built from its config: "
                f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}"
            )
        bad = [
            f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if tensors[k].shape != v.shape
        ]
        if bad:
            raise CheckpointError(f"adapter file {source} has tensors of the wrong shape: {bad[:5]}")
        with torch.no_grad():
            for k, v in expected.items():
                if k.startswith("adapter."):
                    v.copy_(tensors[k])
        self._inplace.set_values(self.base_model, name, {k[5:]: v for k, v in tensors.items() if k.startswith("base.")})

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        verify_base: str = "strict",
    ) -> PeftModel:
        """Wrap a fresh base ``model`` and load the adapter folder ``model_id`` onto it."""
        peft_model = cls(model, None)
        peft_model.load_adapter(model_id, adapter_name, is_trainable=is_trainable, verify_base=verify_base)
        peft_model.set_adapter(adapter_name)
        return peft_model

    def extra_repr(self) -> str:
        return f"adapters={list(self.peft_config)}, active={self._active!r}"
