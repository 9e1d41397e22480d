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
adapter is created, stored in the config so that a saved adapter rebuilds the same shapes).
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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_peft.config import PeftConfig
from monai_peft.errors import ConfigError, InputDataError
from monai_peft.methods.base import BaseTuner
from monai_peft.methods.prompts import (
    ForwardingAdapterLayer,
    TokenLayout,
    _validate_common,
    attention_kind,
    find_attention_modules,
    prompted_indices,
    token_layout,
    wrap_module,
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
        self._require(self.resample_mode in _RESAMPLE, f"resample_mode must be one of {_RESAMPLE}, got {self.resample_mode!r}")
        self._require(self.attention_impl in _IMPLS, f"attention_impl must be one of {_IMPLS}, got {self.attention_impl!r}")
        self._require(
            not (self.embedding == "multi_cat" and self.attention_impl == "sdpa"),
            "embedding='multi_cat' scales the prompt by the range of each row of the attention logits, which SDPA "
            "never materialises: use attention_impl='auto' or 'explicit'",
        )
        if self.prompt_grid is not None:
            self._require(
                isinstance(self.prompt_grid, (list, tuple)) and len(self.prompt_grid) > 0
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt: torch.Tensor, bias: torch.Tensor | None, dropout_p: float, scale: float
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
class _GridContext:
    """The patch grid of the current forward pass, written by :class:`GridProbe`."""

    def __init__(self) -> None:
        self.grid: tuple[int, ...] | None = None


def resample_prompt_rows(rows: torch.Tensor, grid: tuple[int, ...], new_grid: tuple[int, ...], mode: str = "linear") -> torch.Tensor:
    """Resample patch rows ``(prod(grid), L)`` laid out on ``grid`` to ``(prod(new_grid), L)``."""
    if tuple(grid) == tuple(new_grid):
        return rows
    d = len(grid)
    if len(new_grid) != d:
        raise InputDataError(f"cannot resample prompt rows from a {d}-D grid {tuple(grid)} to a {len(new_grid)}-D grid {tuple(new_grid)}")
    if mode == "linear":
        mode = ("linear", "bilinear", "trilinear")[d - 1]
    elif mode == "bicubic" and d != 2:
        raise ConfigError(f"resample_mode='bicubic' needs a 2D grid, got {tuple(grid)}")
    length = rows.shape[-1]
    img = rows.t().reshape(1, length, *grid)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(img.float() if img.dtype in (torch.float16, torch.bfloat16) else img, size=tuple(new_grid), mode=mode, **kwargs)
    return out.to(rows.dtype).reshape(length, -1).t()


class EPTPrompt(nn.Module):
    """``prompt``: ``(num_prefix_tokens + prod(grid), L)`` embedded prompt logits of one attention layer.

    Args:
        num_prefix_tokens: rows of the prefix tokens.
        grid: patch grid of the prompt rows.
        length: L.
        ctx: runtime grid recorded by the probe (shared by the layers of one adapter).
        model_grid: the patch grid of the network this adapter is attached to (None if unknown).
        kind: ``"monai"`` (SABlock) or ``"timm"`` (Attention).
    """

    def __init__(
        self,
        num_prefix_tokens: int,
        grid: tuple[int, ...],
        length: int,
        ctx: _GridContext,
        *,
        model_grid: tuple[int, ...] | None,
        kind: str,
        embedding: str = "pure_cat",
        impl: str = "auto",
        resample_mode: str = "linear",
        init: str = "normal",
        std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = tuple(grid)
        self.length = length
        self.ctx = ctx
        self.model_grid = tuple(model_grid) if model_grid is not None else None
        self.kind = kind
        self.embedding = embedding
        self.impl = impl
        self.resample_mode = resample_mode
        rows = num_prefix_tokens + math.prod(self.grid)
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

    def runtime_grid(self, n_patches: int) -> tuple[int, ...] | None:
        """The patch grid of ``n_patches`` runtime patch tokens (None: use the rows as they are)."""
        where = f"{n_patches} patch tokens (+{self.num_prefix_tokens} prefix)"
        seen = self.ctx.grid
        if seen is not None:
            if math.prod(seen) != n_patches:
                raise InputDataError(
                    f"ept: {where} do not match the {'x'.join(map(str, seen))} patch grid of this input. EPT needs one "
                    "token per patch position (MaskedAutoEncoderViT's random masking and timm's patch_drop remove tokens)"
                )
            return seen
        if self.model_grid is not None and math.prod(self.model_grid) == n_patches:
            return self.model_grid
        if n_patches == math.prod(self.grid):
            return None
        d = len(self.grid)
        s = (n_patches / math.prod(self.grid)) ** (1.0 / d)
        guess = tuple(round(g * s) for g in self.grid)
        if math.prod(guess) == n_patches:
            return guess
        raise InputDataError(
            f"ept: the prompt has rows for a {'x'.join(map(str, self.grid))} patch grid and the input has {where}; the "
            "runtime grid is unknown (no patch embedding was found to read it from) and not an isotropic rescaling"
        )

    def logits(self, n_tokens: int) -> torch.Tensor:
        """Prompt logits ``(n_tokens, L)`` for a sequence of ``n_tokens`` tokens."""
        k = self.num_prefix_tokens
        if n_tokens <= k:
            raise InputDataError(f"ept: {n_tokens} tokens cannot hold {k} prefix tokens and a patch grid")
        grid = self.runtime_grid(n_tokens - k)
        if grid is None or grid == self.grid:
            return self.prompt
        rows = resample_prompt_rows(self.prompt[k:], self.grid, grid, self.resample_mode)
        return torch.cat([self.prompt[:k], rows], dim=0)

    def extra_repr(self) -> str:
        return f"prefix={self.num_prefix_tokens}, grid={self.grid}, length={self.length}, embedding={self.embedding!r}"


class GridProbe(nn.Module):
    """Records ``size // patch`` (``ceil`` with dynamic padding) of the patch embedding's input."""

    def __init__(self, ctx: _GridContext, patch_size: tuple[int, ...], dynamic_pad: bool = False) -> None:
        super().__init__()
        self.ctx = ctx
        self.patch_size = tuple(patch_size)
        self.dynamic_pad = dynamic_pad

    def record(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != len(self.patch_size) + 2:
            self.ctx.grid = None
            return
        sizes = x.shape[2:]
        if self.dynamic_pad:
            self.ctx.grid = tuple(-(-int(s) // p) for s, p in zip(sizes, self.patch_size))
        else:
            self.ctx.grid = tuple(int(s) // p for s, p in zip(sizes, self.patch_size))

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"


class GridProbeLayer(ForwardingAdapterLayer):
    """Wraps the patch embedding; the active :class:`GridProbe` records the runtime patch grid."""

    method_name = "ept"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        probe = self.active()
        if probe is not None:
            probe.record(x)
        return self.base_layer(x, *args, **kwargs)


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


class EPTAttentionLayer(ForwardingAdapterLayer):
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
class EPTTuner(BaseTuner):
    """Wraps the prompted attention layers with :class:`EPTAttentionLayer` and the patch embedding
    with :class:`GridProbeLayer` (to read the runtime patch grid)."""

    config_cls = EPTConfig
    config: EPTConfig

    def _plan(self, model: nn.Module) -> tuple[list[str], list[int], TokenLayout, int, tuple[int, ...]]:
        cfg = self.config
        attns = find_attention_modules(model, cfg, self.method)
        prompted = prompted_indices(cfg.layers, cfg.deep, len(attns), self.method)
        layout = token_layout(model, attns[0])
        prefix = cfg.num_prefix_tokens if cfg.num_prefix_tokens is not None else layout.num_prefix_tokens
        grid = tuple(cfg.prompt_grid) if cfg.prompt_grid is not None else layout.grid
        if grid is None:
            raise ConfigError(
                f"ept: cannot read the patch grid of {type(innermost(model)).__name__} (EPT has one prompt row per token "
                "position); pass EPTConfig(prompt_grid=[patches per spatial axis]) and, if it has CLS/register tokens, "
                "num_prefix_tokens"
            )
        return attns, prompted, layout, prefix, grid

    def check_applicable(self, model: nn.Module) -> None:
        self._plan(model)

    def inject(self, model: nn.Module, adapter_name: str) -> None:
        cfg = self.config
        attns, prompted, layout, prefix, grid = self._plan(model)
        # record the resolved layout in the config: a saved adapter then rebuilds the same shapes
        cfg.prompt_grid = list(grid)
        cfg.num_prefix_tokens = prefix
        ctx = _GridContext()
        if layout.patch_embed is not None and layout.patch_size is not None:
            wrap_module(model, layout.patch_embed, GridProbeLayer, adapter_name, GridProbe(ctx, layout.patch_size, layout.dynamic_pad))
        for i in prompted:
            kind = attention_kind(get_submodule(model, attns[i]))
            adapter = EPTPrompt(
                prefix, grid, cfg.prompt_length, ctx, model_grid=layout.grid, kind=str(kind), embedding=cfg.embedding,
                impl=cfg.attention_impl, resample_mode=cfg.resample_mode, init=cfg.prompt_init, std=cfg.init_std,
            )
            wrap_module(model, attns[i], EPTAttentionLayer, adapter_name, adapter)


register_method("ept", EPTConfig, EPTTuner)
