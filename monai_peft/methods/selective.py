"""Selective tuning: train a subset of the base network's own parameters (phi subset of theta,
phi <- phi - eta * grad_phi L), plus full fine-tuning as the baseline through the same API.

- BitFit / bias tuning (Ben Zaken et al. 2022; TinyTL for CNNs): every parameter named ``bias``.
- Norm tuning: LayerNorm (Basu et al. 2023), BatchNorm (Frankle et al. 2020) and GroupNorm /
  InstanceNorm affine parameters. With ``batchnorm_stats="save"`` (default) BatchNorm running
  statistics are saved with the adapter too.
- Attention tuning (Touvron et al. 2022; Dutt et al. 2024): every parameter of the attention
  modules (qkv, output projection, relative position tables) and the position embedding;
  the patch embedding stays frozen.
- Partial-k: the last k blocks (EPT paper's Partial-1 = last block + head).
- Linear probing: the task head only.
- Full fine-tuning: everything.

The task head is part of Partial-k and linear probing; for the other methods add it with
``modules_to_save`` (as in the papers, a new head is always trained). Modules the network never
calls (preset role ``unused``, e.g. MONAI ViT's ``norm_cross_attn`` without cross-attention) are
left out, so every trained parameter receives a gradient.

All of these are applied in place (no extra memory on the accelerator); see
:mod:`monai_peft.inplace` for how named adapters and ``disable_adapter`` still work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from monai_peft.config import PeftConfig
from monai_peft.errors import MethodNotApplicableError, TargetingError
from monai_peft.methods.base import BaseTuner
from monai_peft.registry import register_method
from monai_peft.targeting import (
    canonical_named_modules,
    find_targets,
    get_preset,
    innermost,
)

__all__ = [
    "AttentionTuningConfig",
    "BitFitConfig",
    "FullFinetuneConfig",
    "LinearProbeConfig",
    "NormTuningConfig",
    "PartialConfig",
]

_NORM_KINDS: dict[str, tuple[type, ...]] = {
    "layernorm": (nn.LayerNorm,),
    "batchnorm": (_BatchNorm,),
    "groupnorm": (nn.GroupNorm,),
    "instancenorm": (_InstanceNorm,),
}


def _unused_modules(model: nn.Module) -> list[str]:
    preset = get_preset(model)
    spec = preset.role("unused") if preset else None
    if spec is None:
        return []
    return [n for n, m in canonical_named_modules(model) if n and spec.matches(n, m)]


def _under(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


class SelectiveTuner(BaseTuner):
    """Owns base parameters chosen by :meth:`scope` (module names) and :meth:`keep` (filter)."""

    default_roles: tuple[str, ...] = ()

    def scope(self, model: nn.Module) -> list[str]:
        """Canonical names of the modules whose parameters are candidates ('' = whole model)."""
        cfg = self.config
        if cfg.target_modules is None and not cfg.target_types:
            if not self.default_roles:
                return [""]
            return find_targets(model, self.target_spec(model, *self.default_roles))
        return find_targets(model, self.target_spec(model))

    def keep(self, module: nn.Module, param_name: str) -> bool:
        return True

    def owned_tensors(self, model: nn.Module) -> list[str]:
        prefixes = self.scope(model)
        unused = _unused_modules(model)
        names: list[str] = []
        seen: set[int] = set()
        for mod_name, module in canonical_named_modules(model):
            if not _under(mod_name, prefixes) or _under(mod_name, unused):
                continue
            for p_name, p in module.named_parameters(recurse=False):
                if p is None or id(p) in seen or not self.keep(module, p_name):
                    continue
                seen.add(id(p))
                names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
        names += self.extra_tensors(model)
        if not names:
            raise MethodNotApplicableError(
                f"{self.method} selects no parameter of {type(innermost(model)).__name__} "
                f"(scope {prefixes[:5]}); check target_modules / the network's layers"
            )
        return list(dict.fromkeys(names))

    def extra_tensors(self, model: nn.Module) -> list[str]:
        return []


def _head_modules(tuner: BaseTuner, model: nn.Module) -> list[str]:
    return find_targets(model, tuner.preset_role(model, "head"))


# ---------------------------------------------------------------------------------------------
@dataclass
class BitFitConfig(PeftConfig):
    """Train every bias (within ``target_modules`` if given, else the whole network)."""


class BitFitTuner(SelectiveTuner):
    config_cls = BitFitConfig

    def keep(self, module: nn.Module, param_name: str) -> bool:
        return param_name == "bias"


@dataclass
class NormTuningConfig(PeftConfig):
    """Train the affine parameters of normalisation layers.

    Args:
        norm_types: any of ``"layernorm"``, ``"batchnorm"``, ``"groupnorm"``, ``"instancenorm"``.
    """

    norm_types: list[str] = field(default_factory=lambda: ["layernorm", "batchnorm", "groupnorm", "instancenorm"])

    def validate(self) -> None:
        bad = sorted(set(self.norm_types) - set(_NORM_KINDS))
        self._require(
            not bad and bool(self.norm_types),
            f"norm_types must be a non-empty subset of {sorted(_NORM_KINDS)}, got {self.norm_types}",
        )


class NormTuningTuner(SelectiveTuner):
    config_cls = NormTuningConfig
    config: NormTuningConfig

    def keep(self, module: nn.Module, param_name: str) -> bool:
        kinds = tuple(t for k in self.config.norm_types for t in _NORM_KINDS[k])
        return isinstance(module, kinds) and param_name in ("weight", "bias")


@dataclass
class AttentionTuningConfig(PeftConfig):
    """Train the attention modules (qkv, output projection, position tables) + position embedding.

    Args:
        include_pos_embed: also train the position embedding (Dutt et al.: yes).
    """

    include_pos_embed: bool = True


class AttentionTuningTuner(SelectiveTuner):
    config_cls = AttentionTuningConfig
    default_roles = ("attention",)
    config: AttentionTuningConfig

    def scope(self, model: nn.Module) -> list[str]:
        try:
            return super().scope(model)
        except TargetingError as exc:
            raise MethodNotApplicableError(
                f"attention tuning needs attention modules; {type(innermost(model)).__name__} has none known ({exc})"
            ) from exc

    def extra_tensors(self, model: nn.Module) -> list[str]:
        preset = get_preset(model)
        if not self.config.include_pos_embed or preset is None:
            return []
        return list(preset.param_roles.get("pos_embed", []))


@dataclass
class PartialConfig(PeftConfig):
    """Train the last ``k`` blocks (preset role ``blocks``, or ``target_modules`` in depth order)
    and, with ``include_head``, the task head."""

    k: int = 1
    include_head: bool = True

    def validate(self) -> None:
        self._require(isinstance(self.k, int) and self.k >= 0, f"k must be an int >= 0, got {self.k!r}")


class PartialTuner(SelectiveTuner):
    config_cls = PartialConfig
    default_roles = ("blocks",)
    config: PartialConfig

    def scope(self, model: nn.Module) -> list[str]:
        blocks = super().scope(model)
        if self.config.k > len(blocks):
            raise MethodNotApplicableError(f"partial k={self.config.k} but the network has only {len(blocks)} blocks")
        chosen = blocks[len(blocks) - self.config.k :] if self.config.k else []
        if self.config.include_head:
            chosen += _head_modules(self, model)
        return chosen


@dataclass
class LinearProbeConfig(PeftConfig):
    """Train the task head only (preset role ``head``, or ``target_modules``)."""


class LinearProbeTuner(SelectiveTuner):
    config_cls = LinearProbeConfig
    default_roles = ("head",)


@dataclass
class FullFinetuneConfig(PeftConfig):
    """Train every parameter (the baseline), through the same API as the PEFT methods."""


class FullFinetuneTuner(SelectiveTuner):
    config_cls = FullFinetuneConfig


register_method("bitfit", BitFitConfig, BitFitTuner)
register_method("norm_tuning", NormTuningConfig, NormTuningTuner)
register_method("attention_tuning", AttentionTuningConfig, AttentionTuningTuner)
register_method("partial", PartialConfig, PartialTuner)
register_method("linear_probe", LinearProbeConfig, LinearProbeTuner)
register_method("full_finetune", FullFinetuneConfig, FullFinetuneTuner)
