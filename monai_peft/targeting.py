"""Choose the modules a PEFT method adapts: by exact name, dotted suffix, regex and module type,
with an exclude list, plus per-network presets so that ``target_modules=None`` does the paper
default on MONAI's networks.

Names are *canonical*: the names of the original network. Once a module is wrapped by an adapter
layer (``blocks.0.attn.qkv`` -> ``blocks.0.attn.qkv.base_layer``), it keeps its canonical name and
the adapter's own sub-modules are invisible to targeting.

Matching rules for one entry of ``target_modules`` / ``exclude_modules``:

- ``"blocks.0.attn.qkv"`` matches that exact name;
- ``"attn.qkv"`` or ``"qkv"`` match every name ending with ``.attn.qkv`` / ``.qkv`` (dotted suffix);
- ``"re:blocks\\.[0-3]\\..*"`` is a regular expression matched against the whole name;
- a bare string (not a list) is a regular expression, as in Hugging Face peft.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from monai_peft.errors import TargetingError

__all__ = [
    "NetworkPreset",
    "TargetSpec",
    "canonical_named_modules",
    "canonical_named_tensors",
    "find_targets",
    "get_preset",
    "get_submodule",
    "list_presets",
    "name_matches",
    "register_preset",
    "set_submodule",
]


# ---------------------------------------------------------------------------------------------
# canonical naming (skips adapter internals)
# ---------------------------------------------------------------------------------------------
def _is_adapter_layer(module: nn.Module) -> bool:
    return getattr(module, "_is_monai_peft_adapter_layer", False)


def innermost(module: nn.Module) -> nn.Module:
    """The original module under any stack of adapter wrappers."""
    while _is_adapter_layer(module):
        module = module.base_layer
    return module


def canonical_named_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` with original names; a wrapped module is reported as its innermost module."""
    base = innermost(model)
    yield prefix, base
    for name, child in base.named_children():
        child_prefix = f"{prefix}.{name}" if prefix else name
        yield from canonical_named_modules(child, child_prefix)


def canonical_named_tensors(model: nn.Module, *, buffers: bool = True) -> dict[str, torch.Tensor]:
    """Parameters (and buffers) of the original network under their original names.

    Adapter tensors are excluded. Shared tensors are reported once, under their first name.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mod_name, module in canonical_named_modules(model):
        local: list[tuple[str, torch.Tensor]] = list(module.named_parameters(recurse=False))
        if buffers:
            local += [(n, b) for n, b in module.named_buffers(recurse=False) if b is not None]
        for name, tensor in local:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            out[f"{mod_name}.{name}" if mod_name else name] = tensor
    return out


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """Module at canonical ``name``, returning the outermost wrapper if it is wrapped."""
    module = model
    if not name:
        return module
    for part in name.split("."):
        inner = innermost(module)
        if not hasattr(inner, part):
            raise TargetingError(f"module {name!r} does not exist in {type(innermost(model)).__name__}")
        module = getattr(inner, part)
    return module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at canonical ``name`` (its parent is resolved through wrappers)."""
    if not name:
        raise TargetingError("cannot replace the root module; target one of its sub-modules")
    parent_name, _, child = name.rpartition(".")
    parent = innermost(get_submodule(model, parent_name))
    setattr(parent, child, new)


# ---------------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------------
def name_matches(name: str, patterns: Sequence[str] | str | None) -> bool:
    """Whether canonical module ``name`` matches any entry (see module docstring for the rules)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def _type_matches(module: nn.Module, types: Sequence[str | type] | None) -> bool:
    if not types:
        return True
    names = {cls.__name__ for cls in type(module).__mro__} | {
        f"{cls.__module__}.{cls.__qualname__}" for cls in type(module).__mro__
    }
    for t in types:
        if isinstance(t, type):
            if isinstance(module, t):
                return True
        elif t in names:
            return True
    return False


@dataclass
class TargetSpec:
    """A selection of modules: names/regexes (``modules``), classes (``types``), exclusions."""

    modules: list[str] | str | None = None
    types: list[str | type] | None = None
    exclude: list[str] | str | None = None

    def matches(self, name: str, module: nn.Module) -> bool:
        if self.modules is not None and not name_matches(name, self.modules):
            return False
        if name_matches(name, self.exclude):
            return False
        return _type_matches(module, self.types)

    def describe(self) -> str:
        parts = []
        if self.modules is not None:
            parts.append(f"modules={self.modules!r}")
        if self.types:
            parts.append(f"types={[t if isinstance(t, str) else t.__name__ for t in self.types]}")
        if self.exclude:
            parts.append(f"exclude={self.exclude!r}")
        return ", ".join(parts) or "everything"


def find_targets(model: nn.Module, spec: TargetSpec, *, allow_root: bool = False) -> list[str]:
    """Canonical names of the modules selected by ``spec``, in registration order.

    Raises:
        TargetingError: when nothing matches, with the closest available names to help.
    """
    names = [
        name for name, module in canonical_named_modules(model) if (name or allow_root) and spec.matches(name, module)
    ]
    if not names:
        available = [n for n, _ in canonical_named_modules(model) if n]
        hint = ", ".join(available[:12]) + (" ..." if len(available) > 12 else "")
        raise TargetingError(f"no module of {type(innermost(model)).__name__} matches {spec.describe()}; module names look like: {hint}")
    return names


# ---------------------------------------------------------------------------------------------
# network presets
# ---------------------------------------------------------------------------------------------
@dataclass
class NetworkPreset:
    """Where things are in one network family, as :class:`TargetSpec` per role.

    Roles used by the built-in methods:

    - ``qkv``: fused attention input projections (LoRA's default, q and v slices);
    - ``attention``: attention modules (attention tuning; Houlsby adapters after them);
    - ``mlp``: transformer MLP modules (AdaptFormer; Houlsby adapters after them);
    - ``blocks``: the backbone's blocks in depth order (partial-k, sequential adapters on CNNs);
    - ``ssf``: the operations after which SSF scales and shifts;
    - ``convs``: convolutions of the backbone (LoRA / TSA on CNNs);
    - ``head``: the task-specific output modules (linear probing, partial-k);
    - ``norms``: normalisation layers of the backbone;
    - ``pos_embed``: position-embedding parameter names (attention tuning);
    - ``unused``: modules that never take part in the forward pass (excluded from tuning).
    """

    name: str
    network_types: tuple[type, ...]
    roles: dict[str, TargetSpec] = field(default_factory=dict)
    param_roles: dict[str, list[str]] = field(default_factory=dict)
    method_defaults: dict[str, dict] = field(default_factory=dict)
    """Per-method config values that apply with ``target_modules=None`` on this network, e.g.
    ``{"lora": {"qkv_slices": "qkv"}}`` (diffusion U-Nets adapt all of q, k, v)."""

    def role(self, role: str) -> TargetSpec | None:
        return self.roles.get(role)


_PRESETS: list[NetworkPreset] = []


def register_preset(preset: NetworkPreset) -> None:
    """Add (or replace, by name) a network preset; later registrations take precedence."""
    global _PRESETS
    _PRESETS = [p for p in _PRESETS if p.name != preset.name] + [preset]


def list_presets() -> list[str]:
    _ensure_builtin_presets()
    return [p.name for p in _PRESETS]


def get_preset(model: nn.Module) -> NetworkPreset | None:
    """The preset of the network family ``model`` belongs to, or None for other networks."""
    _ensure_builtin_presets()
    base = innermost(model)
    for preset in reversed(_PRESETS):
        if isinstance(base, preset.network_types):
            return preset
    return None


def _vit_roles(prefix: str, *, block_types: Sequence[str] = ("TransformerBlock",)) -> dict[str, TargetSpec]:
    p = re.escape(prefix)
    blk = rf"{p}blocks\.\d+"
    return {
        "blocks": TargetSpec(modules=rf"{blk}", types=list(block_types)),
        "qkv": TargetSpec(modules=rf"{blk}\.attn\.qkv", types=["Linear"]),
        "attention": TargetSpec(modules=rf"{blk}\.attn"),
        "attn_out": TargetSpec(modules=rf"{blk}\.attn\.out_proj", types=["Linear"]),
        "mlp": TargetSpec(modules=rf"{blk}\.mlp"),
        "sublayers": TargetSpec(modules=rf"{blk}\.(attn|mlp)"),
        "linears": TargetSpec(modules=rf"{blk}\.(attn\.(qkv|out_proj)|mlp\.linear[12])", types=["Linear"]),
        "ssf": TargetSpec(
            modules=rf"{blk}\.(attn\.(qkv|out_proj)|mlp\.linear[12]|norm[12])|{p}patch_embedding\.patch_embeddings|{p}norm"
        ),
        "norms": TargetSpec(modules=rf"{blk}\.norm[12]|{p}norm", types=["LayerNorm"]),
        "unused": TargetSpec(modules=rf"{blk}\.norm_cross_attn"),
    }


def _ensure_builtin_presets() -> None:
    if any(p.name == "monai.ViT" for p in _PRESETS):
        return
    from monai.networks import nets

    conv_types = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]
    norm_types = ["_BatchNorm", "GroupNorm", "_InstanceNorm", "LayerNorm"]

    vit = _vit_roles("")
    vit["head"] = TargetSpec(modules=["classification_head"])
    register_preset(NetworkPreset("monai.ViT", (nets.ViT,), vit, {"pos_embed": ["patch_embedding.position_embeddings"]}))

    unetr = _vit_roles("vit.")
    unetr["head"] = TargetSpec(modules=r"encoder[1-4]|decoder[2-5]|out")
    register_preset(
        NetworkPreset("monai.UNETR", (nets.UNETR,), unetr, {"pos_embed": ["vit.patch_embedding.position_embeddings"]})
    )

    mae = _vit_roles("")
    mae["head"] = TargetSpec(modules=r"decoder_embed|decoder_blocks|decoder_pred")
    mae["norms"] = TargetSpec(modules=r"blocks\.\d+(\.norm[12])?", types=["LayerNorm"])
    mae["ssf"] = TargetSpec(
        modules=r"blocks\.\d+\.(attn\.(qkv|out_proj)|mlp\.linear[12]|norm[12])|patch_embedding\.patch_embeddings"
    )
    register_preset(
        NetworkPreset(
            "monai.MaskedAutoEncoderViT",
            (nets.MaskedAutoEncoderViT,),
            mae,
            {"pos_embed": ["patch_embedding.position_embeddings"]},
        )
    )

    sblk = r"swinViT\.layers[1-4]\.0\.blocks\.\d+"
    swin = {
        "blocks": TargetSpec(modules=sblk, types=["SwinTransformerBlock"]),
        "qkv": TargetSpec(modules=rf"{sblk}\.attn\.qkv", types=["Linear"]),
        "attention": TargetSpec(modules=rf"{sblk}\.attn"),
        "attn_out": TargetSpec(modules=rf"{sblk}\.attn\.proj", types=["Linear"]),
        "mlp": TargetSpec(modules=rf"{sblk}\.mlp"),
        "sublayers": TargetSpec(modules=rf"{sblk}\.(attn|mlp)"),
        "linears": TargetSpec(modules=rf"{sblk}\.(attn\.(qkv|proj)|mlp\.linear[12])", types=["Linear"]),
        "ssf": TargetSpec(modules=rf"{sblk}\.(attn\.(qkv|proj)|mlp\.linear[12]|norm[12])|swinViT\.patch_embed\.proj"),
        "norms": TargetSpec(modules=r"swinViT\..*", types=norm_types),
        "convs": TargetSpec(modules=r"swinViT\..*", types=conv_types),
        "head": TargetSpec(modules=r"encoder(1|2|3|4|10)|decoder[1-5]|out"),
    }
    register_preset(NetworkPreset("monai.SwinUNETR", (nets.SwinUNETR,), swin))

    def cnn(blocks: str, head: str, encoder_exclude: str | None = None) -> dict[str, TargetSpec]:
        exclude = head if encoder_exclude is None else f"{head}|{encoder_exclude}"
        return {
            "blocks": TargetSpec(modules=blocks),
            "convs": TargetSpec(types=conv_types, exclude=rf"({exclude})(\..*)?"),
            "ssf": TargetSpec(types=conv_types + norm_types, exclude=rf"({exclude})(\..*)?"),
            "norms": TargetSpec(types=norm_types, exclude=rf"({exclude})(\..*)?"),
            "head": TargetSpec(modules=head),
        }

    register_preset(
        NetworkPreset("monai.DenseNet", (nets.DenseNet,), cnn(r"features\.denseblock\d+\.denselayer\d+", "class_layers"))
    )
    register_preset(NetworkPreset("monai.ResNet", (nets.ResNet,), cnn(r"layer[1-4]\.\d+", "fc")))
    segresnet = cnn(r"(down_layers|up_layers)\.\d+\.\d+", "conv_final")
    segresnet["blocks"] = TargetSpec(modules=r"(down_layers|up_layers)\.\d+\.\d+", types=["ResBlock"])
    register_preset(NetworkPreset("monai.SegResNet", (nets.SegResNet,), segresnet))
    register_preset(
        NetworkPreset(
            "monai.BasicUNet", (nets.BasicUNet,), cnn(r"conv_0|down_[1-4]|upcat_[1-4]", "final_conv")
        )
    )
    effnet = cnn(r"_blocks\.\d+\.\d+", "_fc")
    effnet["blocks"] = TargetSpec(modules=r"_blocks\.\d+\.\d+", types=["MBConvBlock"])
    register_preset(NetworkPreset("monai.EfficientNet", (nets.EfficientNet,), effnet))
