"""timm / MAE ViT checkpoints as MONAI ViTs (and as timm models), with a verified key mapping.

Covers the ViT-B/16 weights used by the source papers: ImageNet-21k ViT-B/16 (timm
``vit_base_patch16_224.augreg_in21k``, ``.orig_in21k``, Ridnik et al.'s ``vit_base_patch16_224_miil.in21k``),
MAE ViT-B/16 (``mae_pretrain_vit_base.pth``) and the MAE-derived chest-radiograph foundation models MRM
(``MRM.pth``, Zhou et al. ICLR 2023) and CXR-MAE (Xiao et al. WACV 2023), which MED-PEFT fine-tunes with
LoRA. All share timm's key layout, possibly inside ``{"model": ...}``, possibly with an MAE decoder / text
branch, without a head, with ``fc_norm`` instead of ``norm`` when fine-tuned with global pooling.

timm -> MONAI key mapping (``monai.networks.nets.ViT``, ``spatial_dims=2``, ``proj_type="conv"``)::

    timm                                 MONAI ViT
    patch_embed.proj.{weight,bias}       patch_embedding.patch_embeddings.{weight,bias}
    pos_embed[:, 1:]   (1, N, C)         patch_embedding.position_embeddings  (1, N, C)
    cls_token + pos_embed[:, :1]         cls_token          (MONAI adds positions to patch tokens only,
                                                            then concatenates the CLS token: timm's CLS
                                                            position embedding is folded into it)
    blocks.i.norm1 / norm2               blocks.i.norm1 / norm2
    blocks.i.attn.qkv                    blocks.i.attn.qkv  (same [q | k | v] x heads layout)
    blocks.i.attn.proj                   blocks.i.attn.out_proj
    blocks.i.mlp.fc1 / fc2               blocks.i.mlp.linear1 / linear2
    norm                                 norm
    head                                 classification_head   (MonaiViTBackbone: head)
    fc_norm                              (MonaiViTBackbone: fc_norm; MONAI's ViT has no pooled norm)

Numerical details that make the outputs identical (verified to 1e-5 in ``tests/networks``):

* LayerNorm eps: timm ViTs use 1e-6, MONAI's ViT hard-codes PyTorch's 1e-5 -> every LayerNorm's ``eps`` is set
  to the checkpoint's value after construction.
* MONAI's classification head has an optional ``Tanh`` post-activation (default!) -> built with
  ``post_activation=None``.
* Pooling: timm ``global_pool="token"`` = CLS token after ``norm``; ``"avg"`` (MAE/MRM/CXR-MAE fine-tuning) =
  mean of the patch tokens, *no* final ``norm`` (Identity), then ``fc_norm``. MONAI's ViT only pools the
  CLS token, so :class:`MonaiViTBackbone` (a MONAI ViT plus the timm-style pooling and head) is the model that
  reproduces both; :func:`build_monai_vit` returns a plain MONAI ViT for CLS pooling.
* MONAI's ``TransformerBlock`` always creates a ``norm_cross_attn`` LayerNorm that its forward never uses
  (``with_cross_attention=False``); :class:`MonaiViTBackbone` replaces it by ``nn.Identity`` so that norm /
  bias tuning does not count dead parameters. A plain MONAI ViT from :func:`build_monai_vit` keeps it (reported
  as ``fresh``).
* MAE fine-tuning protocol (MAE, MRM, MED-PEFT): with global pooling the pretrained final ``norm`` is dropped
  and ``fc_norm`` starts fresh (ones/zeros); the head starts from ``trunc_normal(std=2e-5)``. Pass
  ``fc_norm_from_norm=True`` to initialise ``fc_norm`` from the pretrained ``norm`` instead (a deviation).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from monai_peft.errors import CheckpointError, ConfigError, require
from monai_peft.networks.adapt import adapt_input_channels, resample_patch_embed, resample_pos_embed
from monai_peft.networks.heads.init import init_new_head
from monai_peft.networks.reports import LoadReport, load_into
from monai_peft.networks.sources import SourceLike, describe_source, extract_state_dict, load_state_dict_from_source

__all__ = [
    "MonaiViTBackbone",
    "ViTSpec",
    "build_monai_vit",
    "create_timm_vit",
    "infer_vit_spec",
    "load_monai_vit",
    "load_vit_backbone",
    "monai_to_timm_vit_state_dict",
    "prepare_timm_vit_state_dict",
    "timm_to_monai_vit_state_dict",
]

#: Attention heads of the standard ViT widths (head dim 64); the checkpoint cannot tell the head count.
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

# Regex pairs for the per-block and stem keys; cls_token/pos_embed/norm/fc_norm/head are handled explicitly.
_TIMM_TO_MONAI: tuple[tuple[str, str], ...] = (
    (r"^patch_embed\.proj\.(weight|bias)$", r"patch_embedding.patch_embeddings.\1"),
    (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"blocks.\1.attn.out_proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"blocks.\1.mlp.linear1.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"blocks.\1.mlp.linear2.\2"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
    (r"^head\.(weight|bias)$", r"classification_head.\1"),
    (r"^fc_norm\.(weight|bias)$", r"fc_norm.\1"),
)
_MONAI_TO_TIMM: tuple[tuple[str, str], ...] = (
    (r"^patch_embedding\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^blocks\.(\d+)\.attn\.out_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.linear1\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (r"^blocks\.(\d+)\.mlp\.linear2\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
    (r"^(?:classification_head|head)\.(weight|bias)$", r"head.\1"),
    (r"^fc_norm\.(weight|bias)$", r"fc_norm.\1"),
)
# Encoder components a supported timm ViT may have; any other key under the encoder prefix is either a known
# pretraining-only part (ignored) or an unsupported variant (error).
_ENCODER_ROOTS = {"cls_token", "pos_embed", "patch_embed", "blocks", "norm", "fc_norm", "head"}
_PRETRAIN_ONLY = re.compile(r"^(mask_token|decoder[._]|decoder$|head_drop)")
_UNSUPPORTED = {
    "reg_token": "register tokens",
    "dist_token": "a distillation token (DeiT)",
    "norm_pre": "a pre-norm (CLIP-style ViT)",
    "attn_pool": "attention pooling (MAP head)",
    "head_dist": "a distillation head (DeiT)",
}
_UNSUPPORTED_BLOCK = re.compile(
    r"^blocks\.\d+\.(ls1|ls2|attn\.q_norm|attn\.k_norm|attn\.norm|norm\d?_post|mlp\.norm)\."
)


def _apply_rules(key: str, rules: Sequence[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        new, count = re.subn(pattern, repl, key)
        if count:
            return new
    return None


@dataclass(frozen=True)
class ViTSpec:
    """Architecture of a timm-style ViT (what :func:`infer_vit_spec` reads from a checkpoint).

    Attributes:
        img_size: input size ``(H, W)`` (an int means square). MONAI's ViT has a fixed position grid, so inputs
            must have exactly this size.
        patch_size: square patch size.
        in_channels: image channels.
        embed_dim: token width ``C``.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP.
        qkv_bias: whether the qkv projection has a bias (True for timm/MAE ViTs, False for ``miil`` in21k).
        global_pool: ``"token"`` (CLS token) or ``"avg"`` (mean of patch tokens).
        fc_norm: LayerNorm after pooling (default: ``global_pool == "avg"``, as timm and MAE).
        num_classes: classification outputs; 0 means the model returns pooled features.
        eps: LayerNorm epsilon (1e-6 for timm/MAE ViTs).
        no_embed_class: the checkpoint's position embeddings exclude the CLS token (timm ``no_embed_class``).
    """

    img_size: tuple[int, int] | int = 224
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    global_pool: str = "token"
    fc_norm: bool | None = None
    num_classes: int = 0
    eps: float = 1e-6
    no_embed_class: bool = False

    def __post_init__(self) -> None:
        size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
        object.__setattr__(self, "img_size", tuple(int(s) for s in size))
        if len(self.img_size) != 2:
            raise ConfigError(f"img_size must be an int or (H, W), got {self.img_size}")
        if self.global_pool not in ("token", "avg"):
            raise ConfigError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if any(s % self.patch_size for s in self.img_size):
            raise ConfigError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.num_classes < 0 or self.in_channels < 1 or self.depth < 1:
            raise ConfigError(f"invalid ViT spec {self}")

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(H / patch, W / patch)``."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size  # type: ignore[index]

    @property
    def use_fc_norm(self) -> bool:
        """Whether a LayerNorm follows the pooling (and the final ``norm`` is Identity)."""
        return self.global_pool == "avg" if self.fc_norm is None else bool(self.fc_norm)

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer``."""
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_channels,
            "num_classes": self.num_classes,
            "global_pool": self.global_pool,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_dim / self.embed_dim,
            "qkv_bias": self.qkv_bias,
            "fc_norm": self.use_fc_norm,
            "class_token": True,
            "no_embed_class": self.no_embed_class,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly representation."""
        out = asdict(self)
        out["img_size"] = list(self.img_size)  # type: ignore[arg-type]
        return out


def _find_encoder_prefix(keys: Iterable[str], anchor: str) -> str | None:
    prefixes = sorted((k[: -len(anchor)] for k in keys if k.endswith(anchor)), key=len)
    return prefixes[0] if prefixes else None


def _canonical_timm(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Bring a checkpoint to canonical timm ViT keys (no prefix). Returns (state, ignored, notes)."""
    state_dict = extract_state_dict(state_dict)  # {"model": ...} containers, DDP "module." prefix
    ignored: dict[str, str] = {}
    notes: list[str] = []
    keys = list(state_dict)
    prefix = _find_encoder_prefix(keys, "patch_embed.proj.weight")
    if prefix is None:
        monai_prefix = _find_encoder_prefix(keys, "patch_embedding.patch_embeddings.weight")
        if monai_prefix is None:
            raise CheckpointError(
                "not a ViT checkpoint: no 'patch_embed.proj.weight' (timm layout) or "
                f"'patch_embedding.patch_embeddings.weight' (MONAI layout) key; first keys: {keys[:8]}"
            )
        # a MonaiViTBackbone state dict keeps fc_norm/head next to "vit."
        base = monai_prefix[: -len("vit.")] if monai_prefix.endswith("vit.") else monai_prefix
        inner = {k[len(base) :]: v for k, v in state_dict.items() if k.startswith(base)}
        for k in state_dict:
            if not k.startswith(base):
                ignored[k] = "outside the ViT encoder"
        notes.append("checkpoint is in MONAI ViT layout; converted to timm layout first")
        return monai_to_timm_vit_state_dict(inner), ignored, notes
    state: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            ignored[key] = "outside the ViT encoder"
            continue
        inner = key[len(prefix) :]
        root = inner.split(".")[0]
        if root in _UNSUPPORTED:
            raise ConfigError(
                f"unsupported ViT variant: the checkpoint has {_UNSUPPORTED[root]} ('{key}'), which MONAI's ViT "
                "cannot represent"
            )
        if _UNSUPPORTED_BLOCK.match(inner):
            raise ConfigError(
                f"unsupported ViT variant: '{key}' (layer scale / qk-norm / post-norm blocks) has no counterpart "
                "in MONAI's TransformerBlock"
            )
        if _PRETRAIN_ONLY.match(inner):
            ignored[key] = "pretraining-only (MAE decoder / mask token)"
        elif root not in _ENCODER_ROOTS:
            ignored[key] = "not part of the ViT image encoder"
        else:
            state[inner] = value
    if prefix:
        notes.append(f"encoder keys found under the prefix '{prefix}'")
    if "cls_token" not in state:
        raise ConfigError("the checkpoint's ViT has no class token; MONAI's ViT needs one")
    return state, ignored, notes


def infer_vit_spec(state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None) -> ViTSpec:
    """Read the architecture of a ViT from its (timm- or MONAI-layout, possibly wrapped/prefixed) state dict.

    The head count is not visible in the weights: it is taken from ``num_heads`` or, for the standard widths
    192/384/768/1024/1280, from the usual 64-dim heads (3/6/12/16/16).

    Raises:
        CheckpointError: not a ViT checkpoint / inconsistent shapes.
        ConfigError: unsupported variant, or unknown width without ``num_heads``.
    """
    state, _, _ = _canonical_timm(state_dict)
    return _spec_from_canonical(state, num_heads=num_heads)


def _spec_from_canonical(state: Mapping[str, torch.Tensor], *, num_heads: int | None) -> ViTSpec:
    try:
        proj = state["patch_embed.proj.weight"]
        pos = state["pos_embed"]
        fc1 = state["blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CheckpointError(f"incomplete ViT checkpoint: key {exc} is missing") from exc
    embed_dim, in_channels, ph, pw = (int(s) for s in proj.shape)
    if ph != pw:
        raise ConfigError(f"non-square patches {ph}x{pw} are not supported")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    n_pos = int(pos.shape[1])
    side = math.isqrt(n_pos)
    if side * side == n_pos:
        no_embed_class = True  # positions exclude the class token
    else:
        side = math.isqrt(n_pos - 1)
        if side * side != n_pos - 1:
            raise CheckpointError(f"pos_embed has {n_pos} tokens: neither a square grid nor 1 + a square grid")
        no_embed_class = False
    if num_heads is None:
        if embed_dim not in _HEADS_BY_WIDTH:
            raise ConfigError(f"cannot infer the head count for width {embed_dim}; pass num_heads=")
        num_heads = _HEADS_BY_WIDTH[embed_dim]
    head = state.get("head.weight")
    return ViTSpec(
        img_size=side * ph,
        patch_size=ph,
        in_channels=in_channels,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_dim=int(fc1.shape[0]),
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        global_pool="avg" if "fc_norm.weight" in state else "token",
        num_classes=int(head.shape[0]) if head is not None and head.ndim == 2 else 0,
        no_embed_class=no_embed_class,
    )


def timm_to_monai_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, no_embed_class: bool = False
) -> dict[str, torch.Tensor]:
    """Convert canonical timm ViT keys to MONAI ViT keys (``fc_norm.*`` kept, ``head.*`` -> ``classification_head.*``).

    ``cls_token`` becomes ``cls_token + pos_embed[:, :1]`` and ``position_embeddings`` = ``pos_embed[:, 1:]``
    (with ``no_embed_class`` the positions already exclude the class token). Keys without a MONAI counterpart
    are returned unchanged so that loading reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in ("cls_token", "pos_embed"):
            continue
        mapped = _apply_rules(key, _TIMM_TO_MONAI)
        out[mapped if mapped is not None else key] = value
    if "pos_embed" in state_dict:
        pos = state_dict["pos_embed"]
        if no_embed_class:
            out["patch_embedding.position_embeddings"] = pos.clone()
            if "cls_token" in state_dict:
                out["cls_token"] = state_dict["cls_token"].clone()
        else:
            out["patch_embedding.position_embeddings"] = pos[:, 1:].clone()
            if "cls_token" in state_dict:
                out["cls_token"] = state_dict["cls_token"] + pos[:, :1]
    elif "cls_token" in state_dict:
        out["cls_token"] = state_dict["cls_token"].clone()
    return out


def monai_to_timm_vit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`timm_to_monai_vit_state_dict` (accepts plain MONAI ViT or :class:`MonaiViTBackbone` keys).

    timm's ``cls_token`` is MONAI's (which already contains the CLS position) and ``pos_embed`` gets a zero
    CLS position, so the timm model computes exactly what the MONAI model computes. MONAI's unused
    ``norm_cross_attn`` parameters are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        inner = key[len("vit.") :] if key.startswith("vit.") else key
        if ".norm_cross_attn." in inner or inner in ("cls_token", "patch_embedding.position_embeddings"):
            continue
        mapped = _apply_rules(inner, _MONAI_TO_TIMM)
        out[mapped if mapped is not None else inner] = value
    cls = state_dict.get("vit.cls_token", state_dict.get("cls_token"))
    pos = state_dict.get(
        "vit.patch_embedding.position_embeddings", state_dict.get("patch_embedding.position_embeddings")
    )
    if cls is not None:
        out["cls_token"] = cls.clone()
    if pos is not None:
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    return out


def prepare_timm_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "",
    fc_norm_from_norm: bool = False,
    pos_antialias: bool = True,
    **overrides: Any,
) -> tuple[ViTSpec, dict[str, torch.Tensor], LoadReport, list[str]]:
    """Canonicalise a ViT checkpoint and adapt it to the requested architecture (shared by all ViT loaders).

    Steps: find the encoder (prefix / MONAI layout), drop pretraining-only keys, infer the
    :class:`ViTSpec`, apply ``overrides`` (``img_size``, ``patch_size``, ``in_channels``, ``num_classes``,
    ``global_pool``, ``fc_norm``, ``num_heads``), then resample position embeddings / patch kernels, adapt the
    input channels, decide head / ``norm`` / ``fc_norm`` handling.

    Returns:
        ``(spec, timm_state, report, fresh)``: the final spec, the state dict in canonical timm keys, a report
        with ``ignored``/``adapted``/``notes`` filled in, and the timm keys that must stay fresh.
    """
    canonical, ignored, notes = _canonical_timm(state_dict)
    report = LoadReport(source=source, ignored=dict(ignored), notes=list(notes))
    known = {f.name for f in fields(ViTSpec)}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown ViT options {sorted(unknown)}; valid: {sorted(known)}")
    ckpt_spec = _spec_from_canonical(canonical, num_heads=overrides.get("num_heads"))
    spec = replace(ckpt_spec, **overrides)
    state = dict(canonical)
    fresh: list[str] = []
    # -- patch size and input channels -------------------------------------------------------------------
    proj = state["patch_embed.proj.weight"]
    if spec.patch_size != ckpt_spec.patch_size:
        state["patch_embed.proj.weight"] = resample_patch_embed(proj, spec.patch_size)
        report.adapted["patch_embed.proj.weight"] = (
            f"patch kernel resampled {ckpt_spec.patch_size} -> {spec.patch_size} (FlexiViT pseudo-inverse)"
        )
    if spec.in_channels != ckpt_spec.in_channels:
        state["patch_embed.proj.weight"] = adapt_input_channels(state["patch_embed.proj.weight"], spec.in_channels)
        how = "summed over RGB" if spec.in_channels == 1 else "tiled and rescaled"
        report.adapted["patch_embed.proj.weight"] = (
            report.adapted.get("patch_embed.proj.weight", "") + f"; in-channels {ckpt_spec.in_channels} -> "
            f"{spec.in_channels} ({how})"
        ).lstrip("; ")
    # -- position embeddings -------------------------------------------------------------------------------
    if spec.grid != ckpt_spec.grid:
        prefix_tokens = 0 if ckpt_spec.no_embed_class else 1
        state["pos_embed"] = resample_pos_embed(
            state["pos_embed"], spec.grid, ckpt_spec.grid, num_prefix_tokens=prefix_tokens, antialias=pos_antialias
        )
        report.adapted["pos_embed"] = f"grid {ckpt_spec.grid} -> {spec.grid} (bicubic)"
    # -- head --------------------------------------------------------------------------------------------------
    if "head.weight" in state and spec.num_classes != ckpt_spec.num_classes:
        why = (
            "no classification head requested"
            if spec.num_classes == 0
            else (f"checkpoint head has {ckpt_spec.num_classes} classes, model has {spec.num_classes}")
        )
        for k in ("head.weight", "head.bias"):
            if k in state:
                report.ignored[k] = why
                del state[k]
    if spec.num_classes > 0 and "head.weight" not in state:
        fresh += ["head.weight", "head.bias"]
    # -- final norm / pooled norm ------------------------------------------------------------------------------
    if spec.use_fc_norm:
        if "fc_norm.weight" not in state:
            if fc_norm_from_norm and "norm.weight" in state:
                state["fc_norm.weight"] = state["norm.weight"]
                state["fc_norm.bias"] = state["norm.bias"]
                report.adapted["fc_norm.weight"] = "initialised from the pretrained final norm"
            else:
                fresh += ["fc_norm.weight", "fc_norm.bias"]
                report.notes.append(
                    "MAE fine-tuning protocol: global average pooling with a freshly initialised fc_norm"
                )
        for k in ("norm.weight", "norm.bias"):
            if k in state:
                report.ignored[k] = "pooled model has no final norm (fc_norm after pooling instead)"
                del state[k]
    else:
        for k in ("fc_norm.weight", "fc_norm.bias"):
            if k in state:
                report.ignored[k] = "model pools the CLS token after the final norm (no fc_norm)"
                del state[k]
    return spec, state, report, fresh


def _set_layernorm_eps(module: nn.Module, eps: float) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            sub.eps = eps


def _make_monai_vit(spec: ViTSpec, *, num_classes: int, dropout_rate: float) -> nn.Module:
    from monai.networks.nets import ViT

    vit = ViT(
        in_channels=spec.in_channels,
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        hidden_size=spec.embed_dim,
        mlp_dim=spec.mlp_dim,
        num_layers=spec.depth,
        num_heads=spec.num_heads,
        proj_type="conv",
        pos_embed_type="learnable",
        classification=True,  # creates the CLS token
        num_classes=max(num_classes, 1),
        dropout_rate=dropout_rate,
        spatial_dims=2,
        post_activation=None,  # MONAI would add Tanh after the head otherwise
        qkv_bias=spec.qkv_bias,
    )
    _set_layernorm_eps(vit, spec.eps)
    return vit


def build_monai_vit(spec: ViTSpec | None = None, *, dropout_rate: float = 0.0, **overrides: Any) -> nn.Module:
    """A plain ``monai.networks.nets.ViT`` that computes what the timm ViT of ``spec`` computes (CLS pooling).

    ``ViT(x)`` returns ``(out, hidden_states)``: ``out`` is ``(B, num_classes)`` logits, or the ``(B, C)`` CLS
    feature after the final norm when ``num_classes == 0`` (the head is then ``nn.Identity``);
    ``hidden_states`` are the ``depth`` block outputs ``(B, 1 + N, C)`` before the final norm.

    Raises:
        ConfigError: the spec uses global average pooling / ``fc_norm``, which MONAI's ViT cannot express -
            use :class:`MonaiViTBackbone`.
    """
    spec = replace(spec or ViTSpec(), **overrides)
    if spec.global_pool != "token" or spec.use_fc_norm:
        raise ConfigError(
            "MONAI's ViT only pools the CLS token after its final norm; a global-average-pooled / fc_norm ViT "
            "(MAE, MRM, CXR-MAE fine-tuning) needs MonaiViTBackbone"
        )
    vit = _make_monai_vit(spec, num_classes=spec.num_classes, dropout_rate=dropout_rate)
    if spec.num_classes == 0:
        vit.classification_head = nn.Identity()
    return vit


class MonaiViTBackbone(nn.Module):
    """A MONAI ViT with timm-style pooling (CLS token or global average + ``fc_norm``) and a linear head.

    Submodules (names used by PEFT target selection): ``vit`` (``monai.networks.nets.ViT``:
    ``vit.patch_embedding``, ``vit.blocks[i].attn.qkv`` / ``.out_proj``, ``vit.blocks[i].mlp.linear1`` /
    ``.linear2``, ``vit.blocks[i].norm1`` / ``.norm2``, ``vit.norm``, ``vit.cls_token``), ``fc_norm``, ``head``.

    Input ``x``: ``(B, in_channels, H, W)`` with ``(H, W) == spec.img_size``.
    ``forward(x)``: ``(B, num_classes)`` logits, or ``(B, C)`` pooled features when ``num_classes == 0``.

    Example::

        net, report = load_vit_backbone("/data/MRM.pth", num_classes=14, global_pool="avg")
        feats = net.forward_features(torch.rand(2, 3, 224, 224))
        feats["pooled"].shape       # (2, 768)
        feats["feature_map"].shape  # (2, 768, 14, 14)
    """

    def __init__(self, spec: ViTSpec | None = None, *, dropout_rate: float = 0.0, **overrides: Any) -> None:
        super().__init__()
        self.spec = replace(spec or ViTSpec(), **overrides)
        vit = _make_monai_vit(self.spec, num_classes=1, dropout_rate=dropout_rate)
        del vit.classification_head  # ViT.forward then returns all normalised tokens
        if self.spec.use_fc_norm:
            vit.norm = nn.Identity()
        for block in vit.blocks:
            block.norm_cross_attn = nn.Identity()  # never used without cross-attention
        self.vit = vit
        c = self.spec.embed_dim
        self.fc_norm: nn.Module = nn.LayerNorm(c, eps=self.spec.eps) if self.spec.use_fc_norm else nn.Identity()
        self.head: nn.Module = nn.Linear(c, self.spec.num_classes) if self.spec.num_classes else nn.Identity()
        if isinstance(self.head, nn.Linear):
            reset_head(self.head)

    @property
    def num_features(self) -> int:
        """Width ``C`` of the pooled features."""
        return self.spec.embed_dim

    def forward_features(self, x: torch.Tensor) -> dict[str, Any]:
        """All features of one pass.

        Returns:
            dict with
            ``tokens`` ``(B, 1 + N, C)`` final tokens (after ``norm``; Identity for avg pooling),
            ``cls_token`` ``(B, C)``, ``patch_tokens`` ``(B, N, C)``,
            ``feature_map`` ``(B, C, H/p, W/p)`` patch tokens as a map (for segmentation heads),
            ``pooled`` ``(B, C)`` pooled (+ ``fc_norm``) features = the head's input,
            ``hidden_states`` list of ``depth`` block outputs ``(B, 1 + N, C)`` (before the final norm).
        """
        tokens, hidden = self.vit(x)
        patch = tokens[:, 1:]
        pooled = tokens[:, 0] if self.spec.global_pool == "token" else patch.mean(dim=1)
        gh, gw = self.spec.grid
        return {
            "tokens": tokens,
            "cls_token": tokens[:, 0],
            "patch_tokens": patch,
            "feature_map": patch.transpose(1, 2).reshape(x.shape[0], -1, gh, gw),
            "pooled": self.fc_norm(pooled),
            "hidden_states": hidden,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)["pooled"])

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a fresh ``Linear(C, num_classes)`` (``Identity`` for 0)."""
        self.spec = replace(self.spec, num_classes=num_classes)
        self.head = nn.Linear(self.spec.embed_dim, num_classes) if num_classes else nn.Identity()
        if isinstance(self.head, nn.Linear):
            reset_head(self.head)


def reset_head(head: nn.Linear) -> None:
    """MAE / MED-PEFT head initialisation: weights ``trunc_normal(std=2e-5)``, bias 0 (the library-wide
    :func:`~monai_peft.networks.heads.init.init_new_head`)."""
    init_new_head(head)


def _backbone_keys(monai_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in monai_state.items():
        if key.startswith("classification_head."):
            out["head." + key[len("classification_head.") :]] = value
        elif key.startswith("fc_norm."):
            out[key] = value
        else:
            out["vit." + key] = value
    return out


def _state_from(source: SourceLike | None, state_dict: Mapping[str, torch.Tensor] | None, **kw: Any) -> dict:
    if (source is None) == (state_dict is None):
        raise ConfigError("pass exactly one of source= (path/URL/hub id) or state_dict=")
    if state_dict is not None:
        return dict(state_dict)
    return load_state_dict_from_source(source, **kw)  # type: ignore[arg-type]


def _expect(spec: ViTSpec, expect: Mapping[str, Any] | None, source: str) -> None:
    for name, value in (expect or {}).items():
        actual = getattr(spec, name)
        if actual != value:
            raise ConfigError(f"{source} holds a ViT with {name}={actual}, expected {value} for this backbone")


def load_vit_backbone(
    source: SourceLike | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    strict: bool = True,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
    fc_norm_from_norm: bool = False,
    dropout_rate: float = 0.0,
    expect: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> tuple[MonaiViTBackbone, LoadReport]:
    """Build a :class:`MonaiViTBackbone` from a timm/MAE/MRM/CXR-MAE checkpoint.

    Args:
        source: path, URL (with ``sha256``), ``hf://`` or ``pkg://`` source of the checkpoint.
        state_dict: an in-memory state dict instead of ``source``.
        strict: raise :class:`~monai_peft.errors.StateDictKeyError` for missing/unexpected keys.
        sha256: expected digest of the file.
        cache_dir: download cache root.
        fc_norm_from_norm: initialise ``fc_norm`` from the pretrained ``norm`` (default: fresh, MAE protocol).
        dropout_rate: MONAI ViT dropout.
        expect: attributes the inferred spec must have (``{"embed_dim": 768, "patch_size": 16}``).
        **overrides: :class:`ViTSpec` fields (``img_size``, ``in_channels``, ``patch_size``, ``num_classes``,
            ``global_pool``, ``fc_norm``, ``num_heads``).

    Returns:
        ``(backbone, report)``; the backbone is in eval mode.
    """
    raw = _state_from(source, state_dict, sha256=sha256, cache_dir=cache_dir)
    origin = describe_source(source)
    spec, timm_state, report, fresh = prepare_timm_vit_state_dict(
        raw, source=origin, fc_norm_from_norm=fc_norm_from_norm, **overrides
    )
    _expect(spec, expect, origin)
    model = MonaiViTBackbone(spec, dropout_rate=dropout_rate)
    monai_state = _backbone_keys(timm_to_monai_vit_state_dict(timm_state, no_embed_class=spec.no_embed_class))
    if not spec.no_embed_class:
        report.adapted["vit.cls_token"] = "timm cls_token + pos_embed[:, :1] (CLS position folded in)"
    load_into(model, monai_state, strict=strict, fresh=fresh, report=report, context="MonaiViTBackbone")
    return model.eval(), report


def load_monai_vit(
    source: SourceLike | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    strict: bool = True,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
    dropout_rate: float = 0.0,
    **overrides: Any,
) -> tuple[nn.Module, LoadReport]:
    """Load a CLS-pooled timm ViT checkpoint into a plain ``monai.networks.nets.ViT`` (see :func:`build_monai_vit`).

    ``global_pool`` defaults to ``"token"`` here; MONAI's unused ``norm_cross_attn`` parameters are reported as
    fresh.
    """
    overrides.setdefault("global_pool", "token")
    overrides.setdefault("fc_norm", False)
    raw = _state_from(source, state_dict, sha256=sha256, cache_dir=cache_dir)
    origin = describe_source(source)
    spec, timm_state, report, fresh = prepare_timm_vit_state_dict(raw, source=origin, **overrides)
    vit = build_monai_vit(spec, dropout_rate=dropout_rate)
    monai_state = timm_to_monai_vit_state_dict(timm_state, no_embed_class=spec.no_embed_class)
    patterns = ["blocks.*.norm_cross_attn.*"] + [k.replace("head.", "classification_head.", 1) for k in fresh]
    load_into(vit, monai_state, strict=strict, fresh=patterns, report=report, context="monai.networks.nets.ViT")
    if spec.num_classes and "classification_head.weight" in report.fresh:
        reset_head(vit.classification_head)
    return vit.eval(), report


def create_timm_vit(
    source: SourceLike | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    model_name: str | None = None,
    strict: bool = True,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
    fc_norm_from_norm: bool = False,
    **overrides: Any,
) -> tuple[nn.Module, LoadReport]:
    """Use the same checkpoints directly as timm models.

    Builds ``timm.create_model(model_name, pretrained=False, ...)`` (or a ``VisionTransformer`` from the
    inferred spec when ``model_name`` is None) with the checkpoint's architecture and loads the weights with
    the same unwrapping, head / ``fc_norm`` policy and adaptations as :func:`load_vit_backbone`.

    Raises:
        MissingDependencyError: timm is not installed.
    """
    timm = require("timm", feature="Building timm ViT models", install="timm>=1.0")
    raw = _state_from(source, state_dict, sha256=sha256, cache_dir=cache_dir)
    origin = describe_source(source)
    spec, timm_state, report, fresh = prepare_timm_vit_state_dict(
        raw, source=origin, fc_norm_from_norm=fc_norm_from_norm, **overrides
    )
    kwargs = spec.timm_kwargs()
    if model_name is None:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**kwargs)
    else:
        model = timm.create_model(model_name, pretrained=False, **kwargs)  # type: ignore[attr-defined]
    load_into(model, timm_state, strict=strict, fresh=fresh, report=report, context=f"timm {model_name or 'ViT'}")
    if spec.num_classes and "head.weight" in report.fresh:
        reset_head(model.head)
    return model.eval(), report
