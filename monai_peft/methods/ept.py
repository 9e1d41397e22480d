"""EPT: Embedded Prompt Tuning (Zu et al., Medical Image Analysis 97, 2024).

A learnable prompt matrix ``P_E`` (one row per token position, ``L`` columns, shared over the
batch and the heads) is concatenated to the scaled attention logits along the key axis, before
the softmax; its columns are dropped after it::

    S  = Q K^T / sqrt(d_h)                      (B, h, N, N)   (+ masks / relative positions as the base does)
    S' = [P_E | S]                              (B, h, N, L + N)      Pure_Cat (the released code)
    S' = [alpha * P_E | S], alpha_i = max_j S_ij - min_j S_ij          Multi_Cat (the paper's best ablation)
    A  = softmax(S')[..., L:]                   (B, h, N, N)
    out = proj(A V)

Prompts have no values: they only absorb probability mass, so row ``i`` of the attention is the
base row times ``c_i = sum_j e^{s_ij} / (sum_j e^{s_ij} + sum_k e^{p_ik})`` in (0, 1) (paper
Eq. 9-10, "patch-wise scaling"). Since ``sum_k e^{p_ik} = e^{logsumexp_k p_ik}``, the ``L``
prompt columns are computed as one column ``z_i = logsumexp_k(p_ik)`` (``alpha_i p_ik`` for
Multi_Cat), which is exactly the same softmax with N + 1 instead of N + L columns.

Variants: EPT-deep (every attention layer; default), EPT-shallow (the first), or any subset of
layers (``layers``, non-contiguous allowed: the reference code's ``prompt[i - bottom_layer_id]``
assumes contiguous layers). Init N(0, 0.02) (options: uniform +-0.08, zeros, kaiming as in the
reference code). Prompt length L = 100 (the paper's configs). Only the prompts (+ head) train.

**Prompt rows follow the runtime tokens.** ``P_E`` holds ``num_prefix_tokens`` rows (CLS,
registers) followed by one row per patch of ``prompt_grid`` (the network's patch grid when the
adapter is created; the caller's config is never changed: the resolved grid is saved in the adapter
file's resolved config, so that loading rebuilds the same shapes). A network that fixes its patch
count but does not store the grid (MONAI's plain ``ViT``) gets one row per patch in its token order,
used as they are; resampling them to another grid then needs ``prompt_grid``.
When the runtime patch grid differs (a timm ViT with ``dynamic_img_size`` run at 384 px with a
prompt built at 224 px, or an adapter saved from a 224 px MONAI ViT loaded onto a 384 px one),
the grid rows are resampled like a position embedding: viewed as an ``L``-channel image on the
prompt grid and interpolated (bilinear in 2D, trilinear in 3D, ``resample_mode``) to the runtime
grid; prefix rows are kept. The runtime grid is read from the input of the patch embedding (a
probe wrapped around it records ``size // patch`` on every forward), so non-square and
anisotropic inputs resample correctly. A token count that is not ``prefix + prod(grid)`` (e.g.
the random patch masking of ``MaskedAutoEncoderViT`` or timm's ``patch_drop``) is refused with a
clear error: EPT needs one row per token *position*.

Attention layers: MONAI ``SABlock`` (fused ``qkv`` or separate ``to_q/to_k/to_v``, attention
dropout, ``save_attn`` (stores the N x N attention after the prompt columns are dropped),
``attention_dtype``, relative position embedding, causal mask, ``attn_mask``) and timm
``Attention`` (q/k norm, attention dropout, fused or manual path). When the base layer uses
``scaled_dot_product_attention`` (MONAI ``use_flash_attention=True``, timm ``fused_attn``) and
Pure_Cat is used, EPT stays on SDPA by adding one *virtual key* with a zero key vector, a zero
value and the additive bias ``z_i``: its logit is ``q_i . 0 + z_i = z_i`` and it contributes no
value, which is exactly the equation above, without materialising the N x N matrix. (An
additive float mask makes PyTorch use its memory-efficient kernel instead of FlashAttention.)
Multi_Cat needs the row range of S, so it always uses the explicit softmax path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_peft.config import PeftConfig
from monai_peft.errors import ConfigError, InputDataError
from monai_peft.methods.base import AdapterLayer, PlanItem
from monai_peft.methods.prompts import (
    PromptTuner,
    _validate_common,
    attention_kind,
    find_attention_modules,
    prompted_indices,
)
from monai_peft.methods.token_geometry import (
    GridContext,
    GridProbe,
    GridProbeLayer,
    TokenGeometry,
    TokenGrid,
    attach_grid_probes,
)
from monai_peft.registry import register_method
from monai_peft.targeting import get_submodule, innermost

__all__ = [
    "EPTAttentionLayer",
    "EPTConfig",
    "EPTPrompt",
    "EPTTuner",
    "GridProbe",
    "GridProbeLayer",
    "ept_attention",
    "resample_prompt_rows",
]

_EMBEDDINGS = ("pure_cat", "multi_cat")
_INITS = ("normal", "uniform", "zeros", "kaiming")
_RESAMPLE = ("linear", "nearest", "bicubic")
_IMPLS = ("auto", "explicit", "sdpa")


@dataclass
class EPTConfig(PeftConfig):
    """Embedded Prompt Tuning.

    Args:
        prompt_length: L, prompt columns per token row (paper configs: 100; searched over
            5 ... 600). Parameters per layer: ``(prefix + patches) * L``.
        deep: prompts in every attention layer (EPT-deep, default) or only the first (EPT-shallow).
        layers: indices (into the targeted attention layers; negatives allowed; any subset) that
            get a prompt; overrides ``deep``.
        embedding: ``"pure_cat"`` (the released code, default) or ``"multi_cat"`` (the paper's best
            ablation: ``P_E`` scaled per row by ``max - min`` of that row of the logits).
        prompt_init: ``"normal"`` (N(0, init_std), reference default), ``"uniform"`` (+-0.08),
            ``"zeros"`` or ``"kaiming"`` (N(0, 2 / (rows * L)), the reference's kaiming_normal on its
            stacked prompt). The reference's ``"token"`` init is not offered: it adds a C-dim mean
            to an L-dim prompt and only runs when L = C.
        init_std: std of the ``"normal"`` init.
        num_prefix_tokens: prompt rows before the patch rows (CLS / registers); default: the
            network's. Recorded in the config when the adapter is created.
        prompt_grid: the patch grid the prompt rows are laid out on; default: the network's patch
            grid (recorded in the config when the adapter is created, so that loading rebuilds the
            same shapes on any input size). Required for networks whose grid cannot be read.
        resample_mode: how grid rows are resampled to another runtime grid: ``"linear"``
            (bilinear 2D / trilinear 3D), ``"nearest"`` or ``"bicubic"`` (2D only).
        attention_impl: ``"auto"`` (SDPA with a virtual key when the base layer uses SDPA and
            the embedding is Pure_Cat, else the explicit softmax), ``"explicit"`` or ``"sdpa"``.
    """

    prompt_length: int = 100
    deep: bool = True
    layers: list[int] | None = None
    embedding: str = "pure_cat"
    prompt_init: str = "normal"
    init_std: float = 0.02
    num_prefix_tokens: int | None = None
    prompt_grid: list[int] | None = None
    resample_mode: str = "linear"
    attention_impl: str = "auto"

    def validate(self) -> None:
        _validate_common(self, _INITS)
        self._require(self.embedding in _EMBEDDINGS, f"embedding must be one of {_EMBEDDINGS}, got {self.embedding!r}")
        self._require(
            self.resample_mode in _RESAMPLE, f"resample_mode must be one of {_RESAMPLE}, got {self.resample_mode!r}"
        )
        self._require(
            self.attention_impl in _IMPLS, f"attention_impl must be one of {_IMPLS}, got {self.attention_impl!r}"
        )
        self._require(
            not (self.embedding == "multi_cat" and self.attention_impl == "sdpa"),
            "embedding='multi_cat' scales the prompt by the range of each row of the attention logits, which SDPA "
            "never materialises: use attention_impl='auto' or 'explicit'",
        )
        if self.prompt_grid is not None:
            self._require(
                isinstance(self.prompt_grid, (list, tuple))
                and len(self.prompt_grid) > 0
                and all(isinstance(g, int) and g > 0 for g in self.prompt_grid),
                f"prompt_grid must be a list of positive ints (patches per spatial axis), got {self.prompt_grid!r}",
            )
            self.prompt_grid = list(self.prompt_grid)


# ---------------------------------------------------------------------------------------------
# the embedded softmax
# ---------------------------------------------------------------------------------------------
def ept_attention(scores: torch.Tensor, prompt: torch.Tensor, embedding: str = "pure_cat") -> torch.Tensor:
    """``softmax([P_E | S])[..., L:]`` for logits ``scores`` ``(..., N, N)`` and prompt ``(N, L)``.

    Computed with one column ``logsumexp_k`` of the prompt logits (identical softmax). Multi_Cat
    multiplies row i of ``P_E`` by the range (max - min over finite entries) of row i of ``S``.
    """
    prompt = prompt.to(scores.dtype)
    if embedding == "multi_cat":
        finite = torch.isfinite(scores)
        hi = scores.masked_fill(~finite, float("-inf")).amax(-1, keepdim=True)
        lo = scores.masked_fill(~finite, float("inf")).amin(-1, keepdim=True)
        alpha = torch.where(finite.any(-1, keepdim=True), hi - lo, torch.zeros_like(hi))
        z = torch.logsumexp(alpha * prompt, dim=-1, keepdim=True)
    else:
        z = torch.logsumexp(prompt, dim=-1, keepdim=True).expand(*scores.shape[:-1], 1)
    return torch.cat([z, scores], dim=-1).softmax(dim=-1)[..., 1:]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _causal_bias(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), dtype=like.dtype, device=like.device).triu(1)


def _sdpa_with_prompt(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_p: float,
    scale: float,
) -> torch.Tensor:
    """EPT (Pure_Cat) through ``scaled_dot_product_attention`` with one virtual key (zero key, zero
    value, additive logit ``logsumexp_k p_ik``)."""
    n = q.shape[-2]
    z = torch.logsumexp(prompt.to(q.dtype), dim=-1, keepdim=True)  # (N, 1)
    bias = q.new_zeros(n, k.shape[-2]) if bias is None else bias.to(q.dtype)
    shape = torch.broadcast_shapes(bias.shape, (n, k.shape[-2]))
    mask = torch.cat([z.expand(*shape[:-1], 1), bias.expand(shape)], dim=-1)
    kk = F.pad(k, (0, 0, 1, 0))
    vv = F.pad(v, (0, 0, 1, 0))
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, dropout_p=dropout_p, scale=scale)


# ---------------------------------------------------------------------------------------------
# prompt rows and runtime grid
# ---------------------------------------------------------------------------------------------
def resample_prompt_rows(
    rows: torch.Tensor, grid: tuple[int, ...], new_grid: tuple[int, ...], mode: str = "linear"
) -> torch.Tensor:
    """Resample patch rows ``(prod(grid), L)`` laid out on ``grid`` to ``(prod(new_grid), L)``."""
    if tuple(grid) == tuple(new_grid):
        return rows
    d = len(grid)
    if len(new_grid) != d:
        raise InputDataError(
            f"cannot resample prompt rows from a {d}-D grid {tuple(grid)} to a {len(new_grid)}-D grid {tuple(new_grid)}"
        )
    if mode == "linear":
        mode = ("linear", "bilinear", "trilinear")[d - 1]
    elif mode == "bicubic" and d != 2:
        raise ConfigError(f"resample_mode='bicubic' needs a 2D grid, got {tuple(grid)}")
    length = rows.shape[-1]
    img = rows.t().reshape(1, length, *grid)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(
        img.float() if img.dtype in (torch.float16, torch.bfloat16) else img, size=tuple(new_grid), mode=mode, **kwargs
    )
    return out.to(rows.dtype).reshape(length, -1).t()


class EPTPrompt(nn.Module):
    """``prompt``: ``(num_prefix_tokens + patches, L)`` embedded prompt logits of one attention layer.

    Args:
        num_prefix_tokens: rows of the prefix tokens.
        grid: patch grid the patch rows are laid out on, or None when the network fixes the patch count but not
            the grid (then ``num_patches`` rows in the network's token order, never resampled).
        length: L.
        tokens: splits the runtime sequence into prefix and patch grid (shared by the layers of one adapter,
            follows the patch embedding's input).
        num_patches: number of patch rows when ``grid`` is None.
        kind: ``"monai"`` (SABlock) or ``"timm"`` (Attention).
    """

    def __init__(
        self,
        num_prefix_tokens: int,
        grid: tuple[int, ...] | None,
        length: int,
        tokens: TokenGrid,
        *,
        num_patches: int | None = None,
        kind: str,
        embedding: str = "pure_cat",
        impl: str = "auto",
        resample_mode: str = "linear",
        init: str = "normal",
        std: float = 0.02,
    ) -> None:
        super().__init__()
        if grid is None and num_patches is None:
            raise ConfigError("ept: the prompt rows need a patch grid or a patch count")
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = tuple(grid) if grid is not None else None
        self.num_patches = math.prod(self.grid) if self.grid is not None else int(num_patches or 0)
        self.length = length
        self.tokens = tokens
        self.kind = kind
        self.embedding = embedding
        self.impl = impl
        self.resample_mode = resample_mode
        rows = num_prefix_tokens + self.num_patches
        self.prompt = nn.Parameter(torch.empty(rows, length))
        if init == "normal":
            nn.init.normal_(self.prompt, std=std)
        elif init == "uniform":
            nn.init.uniform_(self.prompt, -0.08, 0.08)
        elif init == "zeros":
            nn.init.zeros_(self.prompt)
        else:  # kaiming
            nn.init.normal_(self.prompt, std=math.sqrt(2.0 / (rows * length)))

    def use_sdpa(self, base_uses_sdpa: bool) -> bool:
        if self.impl == "sdpa":
            return True
        if self.impl == "explicit":
            return False
        return base_uses_sdpa and self.embedding == "pure_cat"

    def logits(self, n_tokens: int) -> torch.Tensor:
        """Prompt logits ``(n_tokens, L)`` for a sequence of ``n_tokens`` tokens (rows resampled to its grid)."""
        k = self.num_prefix_tokens
        prefix, grid = self.tokens.split(n_tokens)
        if prefix != k:
            raise InputDataError(
                f"ept: this sequence has {prefix} token(s) before its {'x'.join(map(str, grid))} patch grid and the "
                f"prompt has rows for {k}; EPT needs one prompt row per token position (MaskedAutoEncoderViT's random "
                "masking and timm's patch_drop remove tokens; inserted tokens need num_prefix_tokens)"
            )
        if grid == self.grid or (self.grid is None and math.prod(grid) == self.num_patches):
            return self.prompt
        if self.grid is None:
            raise InputDataError(
                f"ept: the prompt has rows for the {self.num_patches} patches of the network it was made for, whose grid "
                f"the network does not store, and this input has a {'x'.join(map(str, grid))} grid; create the adapter "
                "with EPTConfig(prompt_grid=[patches per spatial axis]) to let its rows be resampled"
            )
        rows = resample_prompt_rows(self.prompt[k:], self.grid, grid, self.resample_mode)
        return torch.cat([self.prompt[:k], rows], dim=0)

    def extra_repr(self) -> str:
        return f"prefix={self.num_prefix_tokens}, grid={self.grid}, length={self.length}, embedding={self.embedding!r}"


# ---------------------------------------------------------------------------------------------
# attention layers
# ---------------------------------------------------------------------------------------------
def _monai_forward(m: nn.Module, ad: EPTPrompt, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MONAI ``SABlock.forward`` with the embedded prompt (same operations, same order)."""
    if m.use_combined_linear:
        out = m.input_rearrange(m.qkv(x))
        q, k, v = out[0], out[1], out[2]
    else:
        q = m.input_rearrange(m.to_q(x))
        k = m.input_rearrange(m.to_k(x))
        v = m.input_rearrange(m.to_v(x))
    if m.attention_dtype is not None:
        q = q.to(m.attention_dtype)
        k = k.to(m.attention_dtype)
    n = q.shape[-2]
    prompt = ad.logits(n)
    if ad.use_sdpa(m.use_flash_attention) and not m.save_attn and m.rel_positional_embedding is None:
        bias = None
        if m.causal:
            if attn_mask is not None:
                raise ValueError("Causal attention does not support attention masks.")
            bias = _causal_bias(n, q)
        elif attn_mask is not None:
            bias = _additive(attn_mask, q.dtype)
        y = _sdpa_with_prompt(q, k, v, prompt, bias, m.dropout_rate if m.training else 0.0, m.scale)
    else:
        s = torch.einsum("blxd,blyd->blxy", q, k) * m.scale
        if m.rel_positional_embedding is not None:
            s = m.rel_positional_embedding(x, s, q)
        if m.causal:
            if attn_mask is not None:
                raise ValueError("Causal attention does not support attention masks.")
            s = s.masked_fill(m.causal_mask[:, :, :n, :n] == 0, float("-inf"))
        if attn_mask is not None:
            if m.use_flash_attention:  # the base hands the mask to SDPA: keep SDPA's semantics
                s = s + _additive(attn_mask, s.dtype)
            else:
                mask = attn_mask.unsqueeze(1).unsqueeze(2).expand(-1, m.num_heads, -1, -1)
                s = s.masked_fill(mask == 0, float("-inf"))
        a = ept_attention(s, prompt, ad.embedding)
        if m.save_attn:
            m.att_mat = a.detach()
        a = m.drop_weights(a)
        y = torch.einsum("bhxy,bhyd->bhxd", a, v)
    y = m.out_rearrange(y)
    if m.include_fc:
        y = m.out_proj(y)
    return m.drop_output(y)


def _timm_forward(
    m: nn.Module, ad: EPTPrompt, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """timm ``Attention.forward`` with the embedded prompt."""
    b, n, _ = x.shape
    gate_layer = getattr(m, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    head_dim = getattr(m, "head_dim", None) or innermost(m.qkv).out_features // (3 * m.num_heads)
    attn_dim = getattr(m, "attn_dim", m.num_heads * head_dim)
    q, k, v = m.qkv(x).reshape(b, n, 3, m.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = m.q_norm(q), m.k_norm(k)
    prompt = ad.logits(n)
    bias = _causal_bias(n, q) if is_causal else (_additive(attn_mask, q.dtype) if attn_mask is not None else None)
    if ad.use_sdpa(bool(getattr(m, "fused_attn", False))):
        y = _sdpa_with_prompt(q, k, v, prompt, bias, m.attn_drop.p if m.training else 0.0, m.scale)
    else:
        s = (q * m.scale) @ k.transpose(-2, -1)
        if bias is not None:
            s = s + bias
        a = m.attn_drop(ept_attention(s, prompt, ad.embedding))
        y = a @ v
    y = y.transpose(1, 2).reshape(b, n, attn_dim)
    norm = getattr(m, "norm", None)
    if norm is not None:
        y = norm(y)
    if gate is not None:
        y = y * gate
    return m.proj_drop(m.proj(y))


class EPTAttentionLayer(AdapterLayer):
    """Wraps a global self-attention layer and runs it with the active :class:`EPTPrompt` embedded in
    its softmax (base behaviour when no EPT adapter is active)."""

    method_name = "ept"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self.active()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        attn = innermost(self.base_layer)
        if adapter.kind == "monai":
            return _monai_forward(attn, adapter, x, *args, **kwargs)
        return _timm_forward(attn, adapter, x, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# tuner
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _EPTTarget:
    """Plan context of one prompted attention layer."""

    kind: str
    geometry: TokenGeometry
    rows_grid: tuple[int, ...] | None

    def to_dict(self) -> dict[str, Any]:
        grid = list(self.rows_grid) if self.rows_grid else None
        return {"kind": self.kind, "tokens": self.geometry.to_dict(), "prompt_grid": grid}


_GRID_HINT = (
    "pass EPTConfig(prompt_grid=[patches per spatial axis]) and, if it has CLS/register tokens, num_prefix_tokens"
)


class EPTTuner(PromptTuner):
    """Wraps the prompted attention layers with :class:`EPTAttentionLayer` and the patch embedding
    with :class:`~monai_peft.methods.token_geometry.GridProbeLayer` (to read the runtime patch grid)."""

    config_cls = EPTConfig
    config: EPTConfig

    def targets(self, model: nn.Module) -> list[str]:
        return find_attention_modules(model, self.config, self.method)

    def plan(self, model: nn.Module) -> list[PlanItem]:
        cfg = self.config
        attns = self.targets(model)
        prompted = prompted_indices(cfg.layers, cfg.deep, len(attns), self.method)
        geo = self.geometry(model, attns)
        rows_grid = tuple(cfg.prompt_grid) if cfg.prompt_grid is not None else (geo.grid or geo.native_grid)
        if rows_grid is None and geo.num_patches is None:
            raise ConfigError(
                f"ept: cannot read the patch grid of {type(innermost(model)).__name__} (EPT has one prompt row per token "
                f"position); {_GRID_HINT}"
            )
        if geo.spatial_dims is None:
            if rows_grid is None:
                raise ConfigError(
                    f"ept: the rank of the token grid of {type(innermost(model)).__name__} is unknown; {_GRID_HINT}"
                )
            geo = replace(geo, spatial_dims=len(rows_grid))
        items = []
        for i in prompted:
            module = innermost(get_submodule(model, attns[i]))
            items.append(
                PlanItem(attns[i], module, EPTAttentionLayer, _EPTTarget(str(attention_kind(module)), geo, rows_grid))
            )
        return items

    def prepare(self, model: nn.Module, plan: list[PlanItem], adapter_name: str) -> dict[str, GridContext]:
        return attach_grid_probes(model, [plan[0].context.geometry], adapter_name)

    def build(self, item: PlanItem, shared: dict[str, GridContext]) -> nn.Module:
        cfg = self.config
        t: _EPTTarget = item.context
        geo = t.geometry
        ctx = shared.get(geo.patch_embed) if geo.patch_embed is not None else None
        static = geo.grid if geo.grid is not None or ctx is not None else t.rows_grid
        tokens = TokenGrid(int(geo.spatial_dims or 2), static, geo.num_prefix_tokens, ctx, _GRID_HINT)
        return EPTPrompt(
            geo.num_prefix_tokens,
            t.rows_grid,
            cfg.prompt_length,
            tokens,
            num_patches=geo.num_patches,
            kind=t.kind,
            embedding=cfg.embedding,
            impl=cfg.attention_impl,
            resample_mode=cfg.resample_mode,
            init=cfg.prompt_init,
            std=cfg.init_std,
        )

    def resolved_fields(self, model: nn.Module, plan: list[PlanItem]) -> dict[str, Any]:
        t: _EPTTarget = plan[0].context
        return {
            "num_prefix_tokens": t.geometry.num_prefix_tokens,
            "prompt_grid": list(t.rows_grid) if t.rows_grid else None,
        }


register_method("ept", EPTConfig, EPTTuner)
