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
    "ROLES",
    "ROLE_ALIASES",
    "NetworkPreset",
    "TargetSpec",
    "canonical_named_modules",
    "canonical_role",
    "exact_patterns",
    "canonical_named_tensors",
    "find_targets",
    "get_preset",
    "get_submodule",
    "list_presets",
    "name_matches",
    "qualified_type",
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


def exact_patterns(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``target_modules`` entries that select exactly the canonical ``names``, in registration order: the plain
    name where no other module's name ends with it, else an anchored ``"re:"`` pattern (``conv1`` on a ResNet
    would also match ``layer1.0.conv1``)."""
    order = {n: i for i, (n, _) in enumerate(canonical_named_modules(model))}
    out = []
    for name in sorted(names, key=lambda n: order.get(n, len(order))):
        clash = any(other != name and other.endswith("." + name) for other in order)
        out.append(f"re:{re.escape(name)}" if clash else name)
    return out


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
        raise TargetingError(
            f"no module of {type(innermost(model)).__name__} matches {spec.describe()}; module names look like: {hint}"
        )
    return names


# ---------------------------------------------------------------------------------------------
# network presets: every built-in one lives here
# ---------------------------------------------------------------------------------------------
#: Structural role names. A method picks its default targets by role (LoRA: ``qkv`` then ``conv``; DKA:
#: ``block``; AdaptFormer: ``mlp`` ...), so a preset says where things are, never what a method does.
ROLES: dict[str, str] = {
    "block": "the backbone's blocks in depth order",
    "attention": "attention modules",
    "qkv": "attention input projections (fused qkv, or separate q/k/v, and on diffusion U-Nets the output projection)",
    "attn_out": "attention output projections",
    "mlp": "transformer MLP modules",
    "sublayer": "the attention and MLP sub-layers of every transformer block",
    "linear": "the Linear layers of the transformer blocks",
    "conv": "convolutions of the backbone",
    "norm": "normalisation layers of the backbone",
    "ops": "every operation with per-channel outputs of the backbone (Linear, convolution, normalisation)",
    "weights": "every weight matrix (Linear and convolution) of the network",
    "residual_out": "the last layer of every residual branch",
    "head": "the task-specific output modules",
    "image_input": "the module(s) that receive the input image (exact names)",
    "unused": "modules that never take part in the forward pass",
}
#: Older (method-named or plural) role names, still accepted everywhere a role is named.
ROLE_ALIASES: dict[str, str] = {
    "blocks": "block",
    "sublayers": "sublayer",
    "linears": "linear",
    "convs": "conv",
    "norms": "norm",
    "ssf": "ops",
    "svdiff": "weights",
    "difffit": "residual_out",
}


def canonical_role(role: str) -> str:
    """The structural name of ``role`` (old names such as ``"convs"`` or ``"ssf"`` map to ``"conv"`` / ``"ops"``)."""
    return ROLE_ALIASES.get(role, role)


class _MatchesQualifiedName(type):
    """Metaclass: ``isinstance(obj, cls)`` is true when a class in ``type(obj).__mro__`` has one
    of ``cls.qualified_names``; lets a preset name a class without importing its module."""

    qualified_names: tuple[str, ...]

    def __instancecheck__(cls, obj: object) -> bool:
        return any(f"{c.__module__}.{c.__qualname__}" in cls.qualified_names for c in type(obj).__mro__)


def qualified_type(name: str, *qualified_names: str) -> type:
    """A stand-in type for presets: ``isinstance(net, qualified_type("X", "pkg.mod.X"))`` is true for
    instances of ``pkg.mod.X`` and its subclasses, without importing ``pkg.mod``. Never instantiated."""
    return _MatchesQualifiedName(
        name, (), {"qualified_names": tuple(qualified_names), "__doc__": qualified_type.__doc__}
    )


@dataclass
class NetworkPreset:
    """Where things are in one network family, as one :class:`TargetSpec` per structural role.

    Attributes:
        name: preset name (``"monai.ViT"``).
        network_types: the classes it applies to (``isinstance``).
        roles: role name -> :class:`TargetSpec`; see :data:`ROLES` (old names in :data:`ROLE_ALIASES` are
            accepted and stored under the structural name).
        param_roles: role -> parameter names (``pos_embed``: position embeddings; ``class_embed``: class
            embeddings).
        qkv_slices: which slices of a fused qkv projection the paper default of this family adapts
            (``"qv"``: MED-PEFT / Hu et al. on ViTs; ``"qkv"``: diffusion U-Nets, as diffusers).
    """

    name: str
    network_types: tuple[type, ...]
    roles: dict[str, TargetSpec] = field(default_factory=dict)
    param_roles: dict[str, list[str]] = field(default_factory=dict)
    qkv_slices: str = "qv"

    def __post_init__(self) -> None:
        self.roles = {canonical_role(k): v for k, v in self.roles.items()}

    def role(self, role: str) -> TargetSpec | None:
        return self.roles.get(canonical_role(role))


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


_CONV_TYPES = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]
_NORM_TYPES = ["_BatchNorm", "GroupNorm", "_InstanceNorm", "LayerNorm"]


def _exact(*names: str) -> TargetSpec:
    """Exactly these module names (no dotted-suffix matching: ``conv1`` is not ``layer1.0.conv1``)."""
    return TargetSpec(modules="|".join(re.escape(n) for n in names))


def _vit_roles(prefix: str, *, block_types: Sequence[str] = ("TransformerBlock",)) -> dict[str, TargetSpec]:
    p = re.escape(prefix)
    blk = rf"{p}blocks\.\d+"
    return {
        "block": TargetSpec(modules=rf"{blk}", types=list(block_types)),
        "qkv": TargetSpec(modules=rf"{blk}\.attn\.qkv", types=["Linear"]),
        "attention": TargetSpec(modules=rf"{blk}\.attn"),
        "attn_out": TargetSpec(modules=rf"{blk}\.attn\.out_proj", types=["Linear"]),
        "mlp": TargetSpec(modules=rf"{blk}\.mlp"),
        "sublayer": TargetSpec(modules=rf"{blk}\.(attn|mlp)"),
        "linear": TargetSpec(modules=rf"{blk}\.(attn\.(qkv|out_proj)|mlp\.linear[12])", types=["Linear"]),
        "ops": TargetSpec(
            modules=rf"{blk}\.(attn\.(qkv|out_proj)|mlp\.linear[12]|norm[12])|{p}patch_embedding\.patch_embeddings|{p}norm"
        ),
        "norm": TargetSpec(modules=rf"{blk}\.norm[12]|{p}norm", types=["LayerNorm"]),
        "image_input": _exact(f"{prefix}patch_embedding"),
        "unused": TargetSpec(modules=rf"{blk}\.norm_cross_attn"),
    }


def _cnn_roles(blocks: str, head: str, image_input: str) -> dict[str, TargetSpec]:
    exclude = rf"({head})(\..*)?"
    return {
        "block": TargetSpec(modules=blocks),
        "conv": TargetSpec(types=_CONV_TYPES, exclude=exclude),
        "ops": TargetSpec(types=_CONV_TYPES + _NORM_TYPES, exclude=exclude),
        "norm": TargetSpec(types=_NORM_TYPES, exclude=exclude),
        "head": TargetSpec(modules=head),
        "image_input": _exact(image_input),
    }


def _tinyvit_roles(prefix: str) -> dict[str, TargetSpec]:
    """TinyViT (LiteMedSAM's image encoder): stage 0 is convolutional, stages 1-3 are attention blocks."""
    p = re.escape(prefix)
    blk = rf"{p}layers\.[1-3]\.blocks\.\d+"
    return {
        "block": TargetSpec(modules=rf"{p}layers\.\d+\.blocks\.\d+"),
        "qkv": TargetSpec(modules=rf"{blk}\.attn\.qkv", types=["Linear"]),
        "attention": TargetSpec(modules=rf"{blk}\.attn"),
        "attn_out": TargetSpec(modules=rf"{blk}\.attn\.proj", types=["Linear"]),
        "mlp": TargetSpec(modules=rf"{blk}\.mlp"),
        "sublayer": TargetSpec(modules=rf"{blk}\.(attn|mlp)"),
        "linear": TargetSpec(modules=rf"{blk}\.(attn\.(qkv|proj)|mlp\.fc[12])", types=["Linear"]),
        "conv": TargetSpec(modules=rf"{p}.*", types=["Conv1d", "Conv2d", "Conv3d"]),
        "norm": TargetSpec(modules=rf"{p}.*", types=["LayerNorm", "_BatchNorm", "LayerNorm2d"]),
        "ops": TargetSpec(modules=rf"{blk}\.(attn\.(qkv|proj)|mlp\.fc[12]|attn\.norm|mlp\.norm)"),
    }


# DiffusionModelUNet: attention blocks (SpatialAttentionBlock without conditioning, SpatialTransformer with
# cross-attention), their attention modules (SABlock ``attn``; ``attn1`` self / ``attn2`` cross of every
# DiffusionUNetTransformerBlock), and residual blocks wherever they sit (resblock_updown=True makes the
# down/upsamplers resnets too).
_UNET_ATTN = r"(?:(?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|middle_block\.attention)"
_UNET_ATTN_MODULES = rf"{_UNET_ATTN}\.(?:attn|transformer_blocks\.\d+\.attn[12])"
_UNET_RESNETS = r"(?:(?:down_blocks|up_blocks)\.\d+\.(?:resnets\.\d+|downsampler|upsampler)|middle_block\.resnet_[12])"


#: Stand-in type for ``monai.networks.nets.DiffusionModelUNet`` (and subclasses) in presets.
DiffusionUNetType = qualified_type("DiffusionUNetType", "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet")


def _diffusion_unet_preset() -> NetworkPreset:
    roles = {
        # Dutt et al.'s SD attention tuning ("attentions" in the name), trained in full
        "attention": TargetSpec(modules=_UNET_ATTN),
        # the attention projections (SD / diffusers LoRA: to_q, to_k, to_v, to_out.0)
        "qkv": TargetSpec(modules=rf"{_UNET_ATTN_MODULES}\.(?:to_q|to_k|to_v|qkv|out_proj)", types=["Linear"]),
        "attn_out": TargetSpec(modules=rf"{_UNET_ATTN_MODULES}\.out_proj", types=["Linear"]),
        # every normalisation layer (SD: "norm" in the name)
        "norm": TargetSpec(types=["GroupNorm", "LayerNorm"]),
        "conv": TargetSpec(types=list(_CONV_TYPES)),
        # every weight matrix of the U-Net (SV-Diff's default)
        "weights": TargetSpec(types=["Linear", *_CONV_TYPES]),
        # the last layer of every residual branch (DiffFit's gamma scales its output)
        "residual_out": TargetSpec(
            modules=(
                rf"{_UNET_RESNETS}\.conv2\.conv"
                rf"|{_UNET_ATTN}\.attn\.out_proj"
                rf"|{_UNET_ATTN}\.transformer_blocks\.\d+\.(?:attn1\.out_proj|attn2\.out_proj|ff\.linear2)"
            ),
            types=["Linear", "Conv1d", "Conv2d", "Conv3d"],
        ),
        # output block (final GroupNorm + convolution)
        "head": TargetSpec(modules=["out"]),
    }
    # the diffusion LoRA recipe (diffusers / Dutt et al.) adapts all of q, k and v
    return NetworkPreset(
        "monai.DiffusionModelUNet",
        (DiffusionUNetType,),
        roles,
        {"class_embed": ["class_embedding.weight"]},
        qkv_slices="qkv",
    )


DIFFUSION_UNET_PRESET = _diffusion_unet_preset()


def _ensure_builtin_presets() -> None:
    global _PRESETS
    if any(p.name == "monai.ViT" for p in _PRESETS):
        return
    from monai.networks import nets

    builtin: list[NetworkPreset] = []
    vit = _vit_roles("")
    vit["head"] = TargetSpec(modules=["classification_head"])
    builtin.append(NetworkPreset("monai.ViT", (nets.ViT,), vit, {"pos_embed": ["patch_embedding.position_embeddings"]}))

    unetr = _vit_roles("vit.")
    unetr["head"] = TargetSpec(modules=r"encoder[1-4]|decoder[2-5]|out")
    unetr["image_input"] = _exact("vit", "encoder1")
    builtin.append(
        NetworkPreset("monai.UNETR", (nets.UNETR,), unetr, {"pos_embed": ["vit.patch_embedding.position_embeddings"]})
    )

    mae = _vit_roles("")
    mae["head"] = TargetSpec(modules=r"decoder_embed|decoder_blocks|decoder_pred")
    mae["norm"] = TargetSpec(modules=r"blocks\.\d+(\.norm[12])?", types=["LayerNorm"])
    mae["ops"] = TargetSpec(
        modules=r"blocks\.\d+\.(attn\.(qkv|out_proj)|mlp\.linear[12]|norm[12])|patch_embedding\.patch_embeddings"
    )
    builtin.append(
        NetworkPreset(
            "monai.MaskedAutoEncoderViT",
            (nets.MaskedAutoEncoderViT,),
            mae,
            {"pos_embed": ["patch_embedding.position_embeddings"]},
        )
    )

    sblk = r"swinViT\.layers[1-4]\.0\.blocks\.\d+"
    swin = {
        "block": TargetSpec(modules=sblk, types=["SwinTransformerBlock"]),
        "qkv": TargetSpec(modules=rf"{sblk}\.attn\.qkv", types=["Linear"]),
        "attention": TargetSpec(modules=rf"{sblk}\.attn"),
        "attn_out": TargetSpec(modules=rf"{sblk}\.attn\.proj", types=["Linear"]),
        "mlp": TargetSpec(modules=rf"{sblk}\.mlp"),
        "sublayer": TargetSpec(modules=rf"{sblk}\.(attn|mlp)"),
        "linear": TargetSpec(modules=rf"{sblk}\.(attn\.(qkv|proj)|mlp\.linear[12])", types=["Linear"]),
        "ops": TargetSpec(modules=rf"{sblk}\.(attn\.(qkv|proj)|mlp\.linear[12]|norm[12])|swinViT\.patch_embed\.proj"),
        "norm": TargetSpec(modules=r"swinViT\..*", types=_NORM_TYPES),
        "conv": TargetSpec(modules=r"swinViT\..*", types=_CONV_TYPES),
        "head": TargetSpec(modules=r"encoder(1|2|3|4|10)|decoder[1-5]|out"),
        "image_input": _exact("swinViT", "encoder1"),
    }
    builtin.append(NetworkPreset("monai.SwinUNETR", (nets.SwinUNETR,), swin))

    builtin.append(
        NetworkPreset(
            "monai.DenseNet",
            (nets.DenseNet,),
            _cnn_roles(r"features\.denseblock\d+\.denselayer\d+", "class_layers", "features"),
        )
    )
    builtin.append(NetworkPreset("monai.ResNet", (nets.ResNet,), _cnn_roles(r"layer[1-4]\.\d+", "fc", "conv1")))
    segresnet = _cnn_roles(r"(down_layers|up_layers)\.\d+\.\d+", "conv_final", "convInit")
    segresnet["block"] = TargetSpec(modules=r"(down_layers|up_layers)\.\d+\.\d+", types=["ResBlock"])
    builtin.append(NetworkPreset("monai.SegResNet", (nets.SegResNet,), segresnet))
    builtin.append(
        NetworkPreset(
            "monai.BasicUNet", (nets.BasicUNet,), _cnn_roles(r"conv_0|down_[1-4]|upcat_[1-4]", "final_conv", "conv_0")
        )
    )
    effnet = _cnn_roles(r"_blocks\.\d+\.\d+", "_fc", "_conv_stem_padding")
    effnet["block"] = TargetSpec(modules=r"_blocks\.\d+\.\d+", types=["MBConvBlock"])
    builtin.append(NetworkPreset("monai.EfficientNet", (nets.EfficientNet,), effnet))

    builtin.append(DIFFUSION_UNET_PRESET)
    lite = "monai_peft.networks.litemedsam"
    builtin.append(
        NetworkPreset(
            "monai_peft.LiteMedSAMEncoder",
            (qualified_type("LiteMedSAMEncoderType", f"{lite}.LiteMedSAMEncoder"),),
            _tinyvit_roles(""),
        )
    )
    sam = _tinyvit_roles("image_encoder.")
    sam["head"] = TargetSpec(modules=["mask_decoder"])
    builtin.append(
        NetworkPreset("monai_peft.LiteMedSAM", (qualified_type("LiteMedSAMType", f"{lite}.LiteMedSAM"),), sam)
    )
    # monai_peft.networks' ViT backbones (the ViT-B/16 checkpoints, MRM, mae_vit): a MONAI ViT under ``vit.``
    vit_backbone = _vit_roles("vit.")
    vit_backbone["norm"] = TargetSpec(modules=r"vit\.blocks\.\d+\.norm[12]|vit\.norm|fc_norm", types=["LayerNorm"])
    vit_backbone["head"] = TargetSpec(modules=["head"])
    builtin.append(
        NetworkPreset(
            "monai_peft.MonaiViTBackbone",
            (qualified_type("MonaiViTBackboneType", "monai_peft.networks.vit.MonaiViTBackbone"),),
            vit_backbone,
            {"pos_embed": ["vit.patch_embedding.position_embeddings"]},
        )
    )
    # built-ins go first: presets registered by users (or earlier, by name) take precedence
    names = {p.name for p in _PRESETS}
    _PRESETS = [p for p in builtin if p.name not in names] + _PRESETS
