"""Prompt tuning of vision transformers: VPT (shallow / deep) and VP (additive token prompts, and
the pixel-padding prompts of Bahng et al.).

**VPT** (Jia et al., ECCV 2022, "Visual Prompt Tuning"). With ``E`` the patch tokens of a block's
input and ``P`` ``L`` learnable prompt tokens of width ``d``, the blocks see ``[prefix, P, E]``
(``prefix`` = CLS and register tokens, none for encoders without CLS such as UNETR's)::

    shallow: [x_1, Z_1, E_1] = L_1([x_0, P, E_0]);   [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}])
    deep:    [x_i, _,   E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])          (fresh P_{i-1} at every layer)

Init ``uniform(-v, v)``, ``v = sqrt(6 / (3 p^2 + d))`` (xavier-uniform of the RGB patch projection:
``3 p^2`` is its fan-in, 3 colour channels times p x p pixels). Here ``3 p^2`` is generalised to the
fan-in of the network's own patch projection, ``C_in * prod(patch)``: a 2D RGB ViT-B/16 gives the
paper's value; a 1-channel 2D ViT-B/16 uses ``1 * 16 * 16``; a 3D ViT with 16^3 patches uses
``C_in * 16^3``. Optional dropout on the prompts (VPT's ``prompt_dropout``).

Token bookkeeping: every prompted block is wrapped. The wrapper inserts the prompts after the
prefix tokens, runs the block and removes them again, so **every block output keeps the
original token count** (MONAI ``ViT.hidden_states_out``, which UNETR's decoder reshapes to the
patch grid, the final norm, the CLS head and any pooling see exactly the tokens of the base
network). The outputs at the prompt positions are what shallow VPT carries to the next layer:
they travel attached to the block's output tensor (an attribute read by the next wrapper of the
same adapter), so no module holds per-call state. Deep VPT overwrites them (they are never
needed). Prompted layers can be any subset (``layers``); a block without its own prompt after a
prompted one carries the previous prompt outputs, as in the VPT code.

**VP** (token mode; the "VP" baseline of EPT / MedFMC): ``L`` prompt vectors per prompted layer are
*added* to the patch tokens before the block: patch token ``t`` gets ``P_i[t mod L]`` for
``t < floor(n / L) * L`` (the MedFMC code leaves the last ``n mod L`` tokens unchanged;
``cover_remainder=True`` adds to them too); prefix tokens are untouched; deep by default. A zero
prompt is exactly the base network.

**VP** (pixel mode; Bahng et al. 2022, "Exploring Visual Prompts for Adapting Large-Scale Models"):
``x' = x + M * phi``: a learnable frame of width ``pad_size`` around the image border (``phi`` is
stored as the ``2 * spatial_dims`` border slabs only, so the parameter count is exact), added to
the network input. In 3D the frame covers the six faces of the volume. It applies to any network
(CNNs too): the prompt is added to the input of the module(s) that receive the image.

Supported networks: MONAI ``ViT`` (with or without CLS), ``UNETR``, ``MaskedAutoEncoderViT`` (2D
and 3D) and timm ``VisionTransformer`` blocks (``Block`` with ``timm.layers.Attention``), found
through the network presets or, for networks without a preset, modules named ``blocks.<i>``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monai_peft.config import PeftConfig
from monai_peft.errors import ConfigError, InputDataError, MethodNotApplicableError, TargetingError
from monai_peft.methods.base import AdapterLayer, PlanItem, WrappingTuner
from monai_peft.methods.common import CONV
from monai_peft.methods.token_geometry import TokenGeometry, token_geometry
from monai_peft.registry import register_method
from monai_peft.targeting import (
    TargetSpec,
    canonical_named_modules,
    exact_patterns,
    find_targets,
    get_preset,
    get_submodule,
    innermost,
)

__all__ = [
    "AdditivePromptLayer",
    "AdditiveTokenPrompt",
    "PixelPadPrompt",
    "PixelPromptLayer",
    "PromptTuner",
    "TokenPromptLayer",
    "VPConfig",
    "VPTConfig",
    "VPTPrompt",
    "VPTuner",
    "VPTTuner",
    "attention_kind",
    "find_attention_modules",
    "find_transformer_blocks",
    "prompted_indices",
    "token_dim",
]

_CARRY_ATTR = "_monai_peft_prompt_carry"
_BLOCK_RE = re.compile(r"(.+\.)?blocks\.\d+")
_ATTN_RE = re.compile(r"(.+\.)?blocks\.\d+\.attn")


# ---------------------------------------------------------------------------------------------
# finding the transformer structure (shared with monai_peft.methods.ept)
# ---------------------------------------------------------------------------------------------
def attention_kind(module: nn.Module | None) -> str | None:
    """``"monai"`` for a MONAI ``SABlock``, ``"timm"`` for a timm ``Attention``, else None.

    These are the global multi-head self-attention layers over a token sequence ``(B, N, C)``
    whose computation the prompt methods know. Window attention (Swin), rotary attention (EVA)
    and cross-attention are not.
    """
    if module is None:
        return None
    module = innermost(module)
    from monai.networks.blocks import SABlock

    if isinstance(module, SABlock):
        return "monai"
    if type(module).__module__.startswith("timm."):
        try:
            from timm.layers import Attention
        except ImportError:  # pragma: no cover - timm without layers.Attention
            return None
        if isinstance(module, Attention):
            return "timm"
    return None


def _describe(model: nn.Module) -> str:
    net = innermost(model)
    known = [n for n, m in canonical_named_modules(model) if n and attention_kind(m)]
    if known:
        return (
            f"{type(net).__name__} (it has supported attention layers, e.g. {known[:3]}, but not where this method looks: "
            "pass target_modules naming them, or their blocks for vpt/vp)"
        )
    kinds = sorted(
        {type(m).__name__ for _, m in canonical_named_modules(net) if "attention" in type(m).__name__.lower()}
    )
    if kinds:
        return (
            f"{type(net).__name__} (its attention layers are {kinds}; supported are MONAI SABlock and timm.layers.Attention, "
            "global self-attention over a token sequence)"
        )
    return f"{type(net).__name__} (it has no transformer attention layers: a CNN or another non-token network)"


def _explicit(config: PeftConfig) -> bool:
    return config.target_modules is not None or bool(config.target_types)


def _explicit_targets(model: nn.Module, config: PeftConfig) -> list[str]:
    return find_targets(model, TargetSpec(config.target_modules, config.target_types, config.exclude_modules))


def _preset_or_duck(model: nn.Module, config: PeftConfig, role: str, pattern: re.Pattern) -> list[str]:
    preset = get_preset(model)
    spec = preset.role(role) if preset is not None else None
    if spec is not None:
        exclude: Any = spec.exclude
        if config.exclude_modules is not None:
            extra = config.exclude_modules
            exclude = (
                [] if exclude is None else ([f"re:{exclude}"] if isinstance(exclude, str) else list(exclude))
            ) + ([f"re:{extra}"] if isinstance(extra, str) else list(extra))
        try:
            return find_targets(model, TargetSpec(spec.modules, spec.types, exclude))
        except TargetingError:
            return []
    spec = TargetSpec(modules=None, exclude=config.exclude_modules)
    return [n for n, m in canonical_named_modules(model) if n and pattern.fullmatch(n) and spec.matches(n, m)]


def find_transformer_blocks(model: nn.Module, config: PeftConfig, method: str) -> list[str]:
    """Canonical names of the transformer blocks (global self-attention over tokens), in depth order.

    Explicit ``target_modules`` / ``target_types`` name the blocks; otherwise the preset's
    ``blocks`` role, or modules named ``blocks.<i>`` for networks without a preset (timm ViTs).

    Raises:
        MethodNotApplicableError: no (or, with explicit targets, a non-) transformer block.
    """
    explicit = _explicit(config)
    names = _explicit_targets(model, config) if explicit else _preset_or_duck(model, config, "blocks", _BLOCK_RE)
    good = [n for n in names if attention_kind(getattr(innermost(get_submodule(model, n)), "attn", None))]
    bad = [f"{n} ({type(innermost(get_submodule(model, n))).__name__})" for n in names if n not in good]
    needs = (
        "transformer blocks whose `attn` is a global self-attention over a token sequence (MONAI TransformerBlock "
        "with SABlock, timm Block with timm.layers.Attention)"
    )
    if explicit and bad:
        raise MethodNotApplicableError(f"{method} cannot prompt {', '.join(bad[:6])}: it needs {needs}")
    if not good:
        raise MethodNotApplicableError(
            f"{method} found no transformer block to prompt in {_describe(model)}; it needs {needs}"
        )
    return good


def find_attention_modules(model: nn.Module, config: PeftConfig, method: str) -> list[str]:
    """Canonical names of the global self-attention modules (MONAI SABlock, timm Attention), in order."""
    explicit = _explicit(config)
    names = _explicit_targets(model, config) if explicit else _preset_or_duck(model, config, "attention", _ATTN_RE)
    good = [n for n in names if attention_kind(get_submodule(model, n))]
    bad = [f"{n} ({type(innermost(get_submodule(model, n))).__name__})" for n in names if n not in good]
    needs = "global multi-head self-attention layers over a token sequence (MONAI SABlock, timm.layers.Attention)"
    if explicit and bad:
        raise MethodNotApplicableError(f"{method} cannot adapt {', '.join(bad[:6])}: it needs {needs}")
    if not good:
        raise MethodNotApplicableError(
            f"{method} found no attention layer to prompt in {_describe(model)}; it needs {needs}"
        )
    return good


def prompted_indices(layers: list[int] | None, deep: bool, n: int, method: str) -> list[int]:
    """Sorted indices (into ``n`` targets) that get a prompt: all (deep), the first (shallow) or ``layers``."""
    if layers is None:
        return list(range(n)) if deep else [0]
    out = set()
    for i in layers:
        if not -n <= i < n:
            raise ConfigError(f"{method}: layer index {i} is out of range for {n} targeted layers")
        out.add(i % n)
    return sorted(out)


def token_dim(block: nn.Module) -> int:
    """Token width ``d`` of a transformer block (its first LayerNorm, else its attention input)."""
    block = innermost(block)
    for _, m in canonical_named_modules(block):
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
    attn = innermost(block.attn)
    for attr in ("qkv", "to_q"):
        lin = innermost(getattr(attn, attr, nn.Identity()))
        if isinstance(lin, nn.Linear):
            return lin.in_features
    raise TargetingError(f"cannot tell the token width of {type(block).__name__}")


def _init_prompt(t: torch.Tensor, how: str, std: float, bound: float) -> None:
    if how == "uniform":
        nn.init.uniform_(t, -bound, bound)
    elif how == "normal":
        nn.init.normal_(t, std=std)
    elif how == "zeros":
        nn.init.zeros_(t)
    else:  # pragma: no cover - validated by the configs
        raise ConfigError(f"unknown prompt_init {how!r}")


def _extend_key_mask(kwargs: dict[str, Any], prefix: int, length: int, method: str) -> dict[str, Any]:
    """Pad a MONAI-style key mask ``(B, N)`` (1 = attend) with ones at the inserted prompt positions."""
    mask = kwargs.get("attn_mask")
    if mask is None:
        return kwargs
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        raise InputDataError(
            f"{method} inserts prompt tokens; it can extend a (batch, tokens) key mask but not an attention mask of "
            f"shape {tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        )
    ones = mask.new_ones(mask.shape[0], length)
    return {**kwargs, "attn_mask": torch.cat([mask[:, :prefix], ones, mask[:, prefix:]], dim=1)}


# ---------------------------------------------------------------------------------------------
# VPT
# ---------------------------------------------------------------------------------------------
class _Chain:
    """Identity of one VPT adapter's chain of wrapped blocks (marks the carried prompt outputs)."""


class VPTPrompt(nn.Module):
    """The prompt tokens of one block (``prompt``: ``(L, d)``) or, without its own prompt, a pass-through
    that carries the previous block's prompt outputs (shallow VPT, un-prompted layers in between).

    Args:
        dim: token width d, or None for a carry-only block.
        length: L.
        num_prefix_tokens: tokens kept before the prompts (CLS, registers).
        emit_carry: attach this block's prompt outputs to its output for the next block.
    """

    def __init__(
        self,
        dim: int | None,
        length: int,
        num_prefix_tokens: int,
        chain: _Chain,
        *,
        emit_carry: bool,
        dropout: float = 0.0,
        init: str = "uniform",
        bound: float = 0.0,
        std: float = 0.02,
    ) -> None:
        super().__init__()
        self.length = length
        self.num_prefix_tokens = num_prefix_tokens
        self.chain = chain
        self.emit_carry = emit_carry
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if dim is not None:
            self.prompt: nn.Parameter | None = nn.Parameter(torch.empty(length, dim))
            _init_prompt(self.prompt, init, std, bound)
        else:
            self.prompt = None

    def run(self, block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        if not (isinstance(x, torch.Tensor) and x.dim() == 3):
            raise InputDataError(
                f"vpt expects block inputs of shape (batch, tokens, channels), got {getattr(x, 'shape', type(x))}"
            )
        carry = getattr(x, _CARRY_ATTR, None)
        carried = carry[1] if carry is not None and carry[0] is self.chain else None
        if self.prompt is not None:
            prompts = self.dropout(self.prompt).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        elif carried is not None:
            prompts = carried
        else:  # the chain was interrupted (a block in between is not targeted): nothing to carry
            return block(x, *args, **kwargs)
        k, n = self.num_prefix_tokens, prompts.shape[1]
        xin = torch.cat([x[:, :k], prompts, x[:, k:]], dim=1)
        y = block(xin, *args, **_extend_key_mask(kwargs, k, n, "vpt"))
        if not (isinstance(y, torch.Tensor) and y.shape[:2] == xin.shape[:2]):
            raise InputDataError(
                f"vpt: the block returned {getattr(y, 'shape', type(y))} for an input of shape {tuple(xin.shape)}"
            )
        out = torch.cat([y[:, :k], y[:, k + n :]], dim=1)
        if self.emit_carry:
            setattr(out, _CARRY_ATTR, (self.chain, y[:, k : k + n]))
        return out

    def extra_repr(self) -> str:
        return f"length={self.length}, prefix={self.num_prefix_tokens}, own_prompt={self.prompt is not None}, emit_carry={self.emit_carry}"


class TokenPromptLayer(AdapterLayer):
    """Wraps a transformer block for VPT: the active :class:`VPTPrompt` inserts its prompt tokens
    before the block and removes them after it."""

    method_name = "vpt"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self.active()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        return adapter.run(self.base_layer, x, args, kwargs)


@dataclass
class VPTConfig(PeftConfig):
    """Visual Prompt Tuning (Jia et al. 2022).

    Args:
        prompt_length: number of prompt tokens L (VPT paper grid: 1, 5, 10, 50, 100, 200).
        deep: a fresh prompt at every block (VPT-deep, the paper's main variant and the default
            here) or one prompt inserted before the first block and carried (VPT-shallow).
        layers: indices (into the targeted blocks, negatives allowed, any subset) of the blocks
            that get a fresh prompt; default all (deep) or ``[0]`` (shallow). Blocks after the
            first prompted one without their own prompt carry the previous prompt outputs.
        dropout: dropout on the prompt tokens (VPT's ``prompt_dropout``).
        prompt_init: ``"uniform"`` (VPT: +-sqrt(6 / (fan_in + d)), fan_in = the patch projection's
            ``C_in * prod(patch)``, i.e. ``3 p^2`` for RGB 2D), ``"normal"`` (N(0, init_std)) or
            ``"zeros"``.
        init_std: std of the ``"normal"`` init.
        init_fan_in: override the fan-in of the ``"uniform"`` init (e.g. ``3 * 16 * 16`` to use the
            RGB value on a 1-channel network); default: measured on the patch embedding, or d
            when the network has none.
        num_prefix_tokens: tokens before the prompts; default: the network's (CLS + registers;
            0 without CLS).
    """

    prompt_length: int = 10
    deep: bool = True
    layers: list[int] | None = None
    dropout: float = 0.0
    prompt_init: str = "uniform"
    init_std: float = 0.02
    init_fan_in: int | None = None
    num_prefix_tokens: int | None = None

    def validate(self) -> None:
        _validate_common(self, ("uniform", "normal", "zeros"))
        self._require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        self._require(
            self.init_fan_in is None or (isinstance(self.init_fan_in, int) and self.init_fan_in > 0),
            "init_fan_in must be a positive int",
        )


def _validate_common(cfg: Any, inits: tuple[str, ...]) -> None:
    cfg._require(
        isinstance(cfg.prompt_length, int) and cfg.prompt_length > 0,
        f"prompt_length must be a positive int, got {cfg.prompt_length!r}",
    )
    cfg._require(isinstance(cfg.deep, bool), f"deep must be True or False, got {cfg.deep!r}")
    if cfg.layers is not None:
        cfg._require(
            isinstance(cfg.layers, (list, tuple))
            and len(cfg.layers) > 0
            and all(isinstance(i, int) for i in cfg.layers),
            f"layers must be a non-empty list of layer indices, got {cfg.layers!r}",
        )
        cfg.layers = list(cfg.layers)
        cfg._require(
            cfg.deep or len(set(cfg.layers)) == 1,
            "shallow prompting (deep=False) uses exactly one layer; set deep=True for several",
        )
    cfg._require(cfg.prompt_init in inits, f"prompt_init must be one of {inits}, got {cfg.prompt_init!r}")
    cfg._require(cfg.init_std >= 0, "init_std must be >= 0")
    cfg._require(
        cfg.num_prefix_tokens is None or (isinstance(cfg.num_prefix_tokens, int) and cfg.num_prefix_tokens >= 0),
        "num_prefix_tokens must be None or an int >= 0",
    )


class PromptTuner(WrappingTuner):
    """Shared shape of the prompt tuners (VPT, VP, EPT): :meth:`targets` finds the transformer modules the method
    works on, :meth:`plan` picks the ones it wraps (:class:`~monai_peft.methods.base.PlanItem` s with their
    context), :meth:`prepare` / :meth:`build` make the adapters, and the inherited ``inject`` wraps them.

    The resolved plan names every target (not only the wrapped ones, so that ``layers`` keeps its meaning) and
    records the network's prefix-token count.
    """

    def targets(self, model: nn.Module) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def geometry(self, model: nn.Module, targets: list[str]) -> TokenGeometry:
        """Token geometry around the first target, with the config's prefix count."""
        return token_geometry(model, targets[0], num_prefix_tokens=self.config.num_prefix_tokens)

    def resolve_plan(self, model: nn.Module) -> tuple[PeftConfig, dict[str, Any]]:
        plan = self.plan(model)
        targets = self.targets(model)
        fields = {
            "target_modules": exact_patterns(model, targets),
            "target_types": None,
            "exclude_modules": None,
            **self.resolved_fields(model, plan),
        }
        return self.config.replace(**fields), {"modules": {i.name: self.item_info(i) for i in plan}}

    def resolved_fields(self, model: nn.Module, plan: list[PlanItem]) -> dict[str, Any]:
        return {"num_prefix_tokens": self.geometry(model, self.targets(model)).num_prefix_tokens}


@dataclass(frozen=True)
class _Prompted:
    """Plan context of one prompted (or carrying) block."""

    dim: int | None
    prefix: int
    fan_in: int
    emit_carry: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "num_prefix_tokens": self.prefix, "own_prompt": self.dim is not None}


class VPTTuner(PromptTuner):
    """Wraps the transformer blocks from the first prompted one on with :class:`TokenPromptLayer`."""

    config_cls = VPTConfig
    config: VPTConfig

    def targets(self, model: nn.Module) -> list[str]:
        return find_transformer_blocks(model, self.config, self.method)

    def plan(self, model: nn.Module) -> list[PlanItem]:
        cfg = self.config
        blocks = self.targets(model)
        prompted = prompted_indices(cfg.layers, cfg.deep, len(blocks), self.method)
        geo = self.geometry(model, blocks)
        items = []
        for i in range(prompted[0], len(blocks)):
            block = innermost(get_submodule(model, blocks[i]))
            d = token_dim(block)
            ctx = _Prompted(
                d if i in prompted else None,
                geo.num_prefix_tokens,
                cfg.init_fan_in or geo.fan_in or d,
                emit_carry=i + 1 < len(blocks) and (i + 1) not in prompted,
            )
            items.append(PlanItem(blocks[i], block, TokenPromptLayer, ctx))
        return items

    def prepare(self, model: nn.Module, plan: list[PlanItem], adapter_name: str) -> _Chain:
        return _Chain()

    def build(self, item: PlanItem, shared: _Chain) -> nn.Module:
        cfg = self.config
        t: _Prompted = item.context
        d = t.dim if t.dim is not None else token_dim(item.module)
        return VPTPrompt(
            t.dim,
            cfg.prompt_length,
            t.prefix,
            shared,
            emit_carry=t.emit_carry,
            dropout=cfg.dropout,
            init=cfg.prompt_init,
            bound=math.sqrt(6.0 / (t.fan_in + d)),
            std=cfg.init_std,
        )


# ---------------------------------------------------------------------------------------------
# VP: additive token prompts
# ---------------------------------------------------------------------------------------------
class AdditiveTokenPrompt(nn.Module):
    """``L`` prompt vectors ``(L, d)`` added, tiled, to the patch tokens of a block's input."""

    def __init__(
        self,
        dim: int,
        length: int,
        num_prefix_tokens: int,
        *,
        cover_remainder: bool,
        init: str,
        std: float,
        bound: float,
    ) -> None:
        super().__init__()
        self.length = length
        self.num_prefix_tokens = num_prefix_tokens
        self.cover_remainder = cover_remainder
        self.prompt = nn.Parameter(torch.empty(length, dim))
        _init_prompt(self.prompt, init, std, bound)

    def offsets(self, n_tokens: int) -> torch.Tensor:
        """The ``(N, d)`` tensor added to a block input of ``N`` tokens."""
        k, length = self.num_prefix_tokens, self.length
        n = max(n_tokens - k, 0)
        covered = n if self.cover_remainder else (n // length) * length
        reps = -(-covered // length) if covered else 0
        tiled = self.prompt.repeat(reps, 1)[:covered]
        return torch.nn.functional.pad(tiled, (0, 0, k, n_tokens - k - covered))

    def run(self, block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        if not (isinstance(x, torch.Tensor) and x.dim() == 3):
            raise InputDataError(
                f"vp expects block inputs of shape (batch, tokens, channels), got {getattr(x, 'shape', type(x))}"
            )
        if not self.cover_remainder and x.shape[1] - self.num_prefix_tokens < self.length:
            raise InputDataError(
                f"vp: prompt_length={self.length} exceeds the {x.shape[1] - self.num_prefix_tokens} patch tokens, so no "
                "prompt would be added (prompts tile whole groups of L tokens); lower prompt_length or set cover_remainder=True"
            )
        return block(x + self.offsets(x.shape[1]).to(x.dtype), *args, **kwargs)

    def extra_repr(self) -> str:
        return f"length={self.length}, prefix={self.num_prefix_tokens}, cover_remainder={self.cover_remainder}"


class AdditivePromptLayer(AdapterLayer):
    """Wraps a transformer block for VP (token mode): the active :class:`AdditiveTokenPrompt` is added
    to the patch tokens of the block's input."""

    method_name = "vp"
    forward = TokenPromptLayer.forward


# ---------------------------------------------------------------------------------------------
# VP: pixel padding prompts (Bahng et al. 2022)
# ---------------------------------------------------------------------------------------------
class PixelPadPrompt(nn.Module):
    """A learnable border of width ``pad`` around a ``(C, *image_size)`` input, any spatial rank.

    Stored as two slabs per axis (``axis{k}``: ``(2, C, ...)``): processing the last axis first,
    the slabs of axis k span the inner extent (size - 2 pad) of the axes before k and the full
    extent of the axes after it, so the slabs tile the frame exactly (2D: the left/right and
    top/bottom strips of Bahng's ``PadPrompter``; 3D: the six faces).
    """

    def __init__(self, channels: int, image_size: tuple[int, ...], pad: int, *, init: str, std: float) -> None:
        super().__init__()
        self.channels = channels
        self.image_size = tuple(int(s) for s in image_size)
        self.pad = pad
        shape = [channels] + [s - 2 * pad for s in self.image_size]
        self.slabs = nn.ParameterDict()
        for axis in reversed(range(len(self.image_size))):
            slab = list(shape)
            slab[1 + axis] = pad
            t = torch.empty(2, *slab)
            _init_prompt(t, init, std, 0.0)
            self.slabs[f"axis{axis}"] = nn.Parameter(t)
            shape[1 + axis] = self.image_size[axis]

    def prompt(self) -> torch.Tensor:
        """``M * phi``: shape ``(C, *image_size)``, zero inside the frame."""
        first = next(iter(self.slabs.values()))
        cur = first.new_zeros(self.channels, *[s - 2 * self.pad for s in self.image_size])
        for axis in reversed(range(len(self.image_size))):
            slab = self.slabs[f"axis{axis}"]
            cur = torch.cat([slab[0], cur, slab[1]], dim=1 + axis)
        return cur

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, *self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise InputDataError(
                f"vp (pixel) prompt was built for inputs of shape (batch, {', '.join(map(str, expected))}), got "
                f"{tuple(x.shape)}; set VPConfig(image_size=...) to the size the network is run at"
            )
        return x + self.prompt().to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, image_size={self.image_size}, pad={self.pad}"


class PixelPromptLayer(AdapterLayer):
    """Adds the active pixel prompt to the first argument (the image) of the wrapped module."""

    method_name = "vp"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        adapter = self.active()
        return self.base_layer(x if adapter is None else adapter(x), *args, **kwargs)


@dataclass
class VPConfig(PeftConfig):
    """Visual prompting: additive prompts on the tokens (EPT's "VP" baseline) or on the pixels (Bahng et al.).

    Args:
        mode: ``"token"`` (default) or ``"pixel"``.
        prompt_length: token mode: number L of prompt vectors, tiled over the patch tokens
            (EPT / MedFMC grid: 1, 5, 10, 50, 100, 150).
        deep: token mode: prompts added before every block (default, as in EPT's baseline) or only
            the first; ``layers`` picks any subset (indices into the targeted blocks).
        cover_remainder: token mode: also add to the last ``n mod L`` patch tokens (the MedFMC code
            does not: default False).
        prompt_init: ``"normal"`` (N(0, init_std)), ``"uniform"`` (VPT's xavier bound) or
            ``"zeros"`` (exactly the base network at step 0).
        init_std: token mode default 0.02; pixel mode uses ``init_std`` too (Bahng: N(0, 1), so set
            ``init_std=1.0`` for the original).
        pad_size: pixel mode: width of the frame in pixels/voxels (Bahng: 30 at 224 px).
        image_size: pixel mode: spatial size the network is run at; default: inferred from the
            network (ViT-like presets and timm), required for CNNs.
        in_channels: pixel mode: image channels; default: the first convolution's in_channels.
        num_prefix_tokens: token mode: tokens left untouched before the patch tokens.

    In pixel mode ``target_modules`` names the module(s) that receive the image (default: the
    patch embedding of ViTs, the first convolution of MONAI CNNs, both image branches of UNETR
    and SwinUNETR, which then share one prompt).
    """

    mode: str = "token"
    prompt_length: int = 10
    deep: bool = True
    layers: list[int] | None = None
    cover_remainder: bool = False
    prompt_init: str = "normal"
    init_std: float = 0.02
    pad_size: int = 30
    image_size: list[int] | None = None
    in_channels: int | None = None
    num_prefix_tokens: int | None = None

    def validate(self) -> None:
        self._require(self.mode in ("token", "pixel"), f"mode must be 'token' or 'pixel', got {self.mode!r}")
        _validate_common(self, ("normal", "uniform", "zeros"))
        self._require(isinstance(self.pad_size, int) and self.pad_size > 0, "pad_size must be a positive int")
        if self.image_size is not None:
            self._require(
                isinstance(self.image_size, (list, tuple))
                and all(isinstance(s, int) and s > 2 * self.pad_size for s in self.image_size),
                f"image_size must be a list of ints larger than 2 * pad_size, got {self.image_size!r}",
            )
            self.image_size = list(self.image_size)
        self._require(
            self.in_channels is None or (isinstance(self.in_channels, int) and self.in_channels > 0),
            "in_channels must be a positive int",
        )


class VPTuner(PromptTuner):
    """Token mode: wraps the prompted transformer blocks; pixel mode: wraps the image-input module(s)."""

    config_cls = VPConfig
    config: VPConfig

    def targets(self, model: nn.Module) -> list[str]:
        if self.config.mode == "pixel":
            return self._pixel_inputs(model)
        return find_transformer_blocks(model, self.config, self.method)

    # -- token mode ------------------------------------------------------------------------------
    def _token_plan(self, model: nn.Module) -> list[PlanItem]:
        cfg = self.config
        blocks = self.targets(model)
        prompted = prompted_indices(cfg.layers, cfg.deep, len(blocks), self.method)
        geo = self.geometry(model, blocks)
        patches = geo.patch_tokens
        if patches is not None and not geo.dynamic and not cfg.cover_remainder and patches < cfg.prompt_length:
            raise ConfigError(
                f"vp: prompt_length={cfg.prompt_length} exceeds the {patches} patch tokens of "
                f"{type(innermost(model)).__name__}, so no prompt would be added; lower it or set cover_remainder=True"
            )
        items = []
        for i in prompted:
            block = innermost(get_submodule(model, blocks[i]))
            d = token_dim(block)
            items.append(
                PlanItem(blocks[i], block, AdditivePromptLayer, _Prompted(d, geo.num_prefix_tokens, geo.fan_in or d))
            )
        return items

    # -- pixel mode ------------------------------------------------------------------------------
    def _pixel_inputs(self, model: nn.Module) -> list[str]:
        cfg = self.config
        if _explicit(cfg):
            return _explicit_targets(model, cfg)
        preset = get_preset(model)
        spec = preset.role("image_input") if preset is not None else None
        if spec is not None:
            return find_targets(model, spec)
        if isinstance(getattr(innermost(model), "patch_embed", None), nn.Module):
            return ["patch_embed"]  # timm ViT-like networks
        raise MethodNotApplicableError(
            f"vp (pixel) does not know which module of {type(innermost(model)).__name__} receives the image; pass target_modules"
        )

    def _pixel_plan(self, model: nn.Module) -> list[PlanItem]:
        cfg = self.config
        net = type(innermost(model)).__name__
        names = self._pixel_inputs(model)
        convs = [
            m
            for where in (
                innermost(get_submodule(model, names[0])),
                model,
            )  # the target's first conv, else the network's
            for _, m in canonical_named_modules(where)
            if isinstance(m, CONV)
        ]
        channels = cfg.in_channels or (convs[0].in_channels if convs else None)
        size = tuple(cfg.image_size) if cfg.image_size is not None else self._infer_image_size(model)
        if channels is None or size is None:
            what = "in_channels" if channels is None else "image_size"
            raise MethodNotApplicableError(
                f"vp (pixel) cannot infer the input {what} of {net}; set VPConfig({what}=...)"
            )
        if any(s <= 2 * cfg.pad_size for s in size):
            raise ConfigError(f"vp (pixel): pad_size={cfg.pad_size} leaves no interior in an image of size {size}")
        return [PlanItem(n, innermost(get_submodule(model, n)), PixelPromptLayer, (int(channels), size)) for n in names]

    @staticmethod
    def _infer_image_size(model: nn.Module) -> tuple[int, ...] | None:
        """``grid * patch`` when the network stores its grid (never guessed from the patch count)."""
        candidates = [n for n in ("blocks.0", "vit.blocks.0", "") if n == "" or _has(model, n)]
        geo = token_geometry(model, candidates[0])
        if (
            geo.grid is not None
            and geo.patch_size is not None
            and len(geo.grid) == len(geo.patch_size)
            and not geo.dynamic
        ):
            return tuple(g * p for g, p in zip(geo.grid, geo.patch_size))
        return None

    # -- tuner interface -------------------------------------------------------------------------
    def plan(self, model: nn.Module) -> list[PlanItem]:
        return self._pixel_plan(model) if self.config.mode == "pixel" else self._token_plan(model)

    def prepare(self, model: nn.Module, plan: list[PlanItem], adapter_name: str) -> nn.Module | None:
        if self.config.mode != "pixel":
            return None
        cfg = self.config
        channels, size = plan[0].context
        return PixelPadPrompt(
            channels, size, cfg.pad_size, init=cfg.prompt_init, std=cfg.init_std
        )  # one prompt for every image branch

    def build(self, item: PlanItem, shared: nn.Module | None) -> nn.Module:
        if shared is not None:
            return shared
        cfg = self.config
        t: _Prompted = item.context
        return AdditiveTokenPrompt(
            t.dim,
            cfg.prompt_length,
            t.prefix,
            cover_remainder=cfg.cover_remainder,
            init=cfg.prompt_init,
            std=cfg.init_std,
            bound=math.sqrt(6.0 / (t.fan_in + t.dim)),
        )

    def resolved_fields(self, model: nn.Module, plan: list[PlanItem]) -> dict[str, Any]:
        if self.config.mode == "pixel":
            channels, size = plan[0].context
            return {"in_channels": channels, "image_size": list(size)}
        return super().resolved_fields(model, plan)

    def item_info(self, item: PlanItem) -> dict[str, Any]:
        if self.config.mode == "pixel":
            channels, size = item.context
            return {"layer": item.layer_cls.__name__, "in_channels": channels, "image_size": list(size)}
        return super().item_info(item)


def _has(model: nn.Module, name: str) -> bool:
    try:
        get_submodule(model, name)
    except TargetingError:
        return False
    return True


register_method("vpt", VPTConfig, VPTTuner)
register_method("vp", VPConfig, VPTuner)
