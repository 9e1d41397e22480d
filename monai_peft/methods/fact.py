"""FacT: factor-tuning of ViTs (Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on
Vision Transformer", AAAI 2023; reference code ``JieShibo/PETL-ViT/FacT``).

All weight updates of a ViT are seen as one tensor of d x d slices (d = hidden size): per layer
the q, k, v, attention-projection matrices and the MLP matrices split into d x d blocks (fc1:
d -> 4d = 4 blocks, fc2: 4d -> d = 4 blocks), i.e. 12 slices per layer. Each slice j is factorised
with factors shared by *all* layers::

    y = W0 x + s * V(Dropout(U x . Sigma_j))          (row-vector convention: x (.., d), U x = x @ U)

    U in R^{d x r} (shared; nn.Linear default init, uniform(+-1/sqrt(d)))
    V in R^{r x d} (shared; zeros, so a fresh adapter is an exact identity)

- FacT-TT: a free core ``Sigma_j in R^{r x r}`` per slice (the reference code's per-matrix
  ``nn.Linear(r, r)``, default init; fc1's ``r x 4r`` and fc2's ``4r x r`` cores are the four slice
  cores side by side / stacked, exactly as here);
- FacT-TK: ``Sigma_j = C x_3 p_j = sum_k C[:, :, k] P[k, j]`` with a shared core tensor
  ``C in R^{r x r x r}`` and ``P in R^{r x n}`` (n = number of slices of the network, 144 for
  ViT-B/12 layers), both xavier-uniform.

For a Linear of in = a d, out = b d the slices form a b x a grid: output block o gets
``s V(Dropout(sum_i (U x_i) Sigma_{o,i}))`` for the input blocks x_i. So a fused qkv Linear (d -> 3d)
is three matrices q, k, v with their own cores (as in the reference code, which adds
``cat[V(U x Sigma_q), V(U x Sigma_k), V(U x Sigma_v)]`` to ``qkv(x)``), separate q/k/v Linears
are one slice each, and any MLP ratio that is an integer works (MONAI ``mlp_dim = k * hidden``).
TK's fc1/fc2 use slice j for block j exactly as the paper describes (the reference code reshapes
the ``r x r x 4`` product to ``r x 4r``, a fixed re-ordering of the same entries).

Merge (exact; dropout is the identity in eval)::

    W0[o-block, i-block] += s * (U Sigma_{o,i} V)^T = s * V^T Sigma_{o,i}^T U^T

Shared factors are one ``nn.Parameter`` referenced by every layer's adapter module, so they are
trained once, counted once and stored once in the adapter file. Default targets: q, k, v,
proj, fc1, fc2 of every block (the preset's ``linears`` role); the method needs one hidden size for
all targets (it rejects e.g. SwinUNETR's four stage widths unless targets are narrowed to one
stage). Token layout is irrelevant, so 2D and 3D ViTs are handled alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monai_peft.config import PeftConfig
from monai_peft.errors import MethodNotApplicableError
from monai_peft.methods.base import AdapterLayer, PlanItem, WrappingTuner
from monai_peft.methods.common import MergeDeltaMixin
from monai_peft.registry import register_method
from monai_peft.targeting import innermost

__all__ = ["FacTAdapter", "FacTConfig", "FacTLinear", "FacTShared", "FacTTuner"]


@dataclass
class FacTConfig(PeftConfig):
    """Configuration of FacT.

    Args:
        variant: ``"tt"`` (tensor-train: one free r x r core per slice) or ``"tk"`` (Tucker:
            cores from a shared ``C`` and per-slice rows of ``P``).
        r: rank (paper/reference configs: 8 for TT, 8-32 for TK).
        scale: s (per data set in the paper, e.g. 0.1-100; 1.0 here).
        dropout: dropout before V (reference: 0.1).
        hidden_size: d; ``None`` = the smallest in/out width among the targets. Every target must map
            d -> k d or k d -> d (k integer).
    """

    variant: str = "tt"
    r: int = 8
    scale: float = 1.0
    dropout: float = 0.1
    hidden_size: int | None = None

    def validate(self) -> None:
        self._require(self.variant in ("tt", "tk"), f"variant must be 'tt' or 'tk', got {self.variant!r}")
        self._require(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got {self.r!r}")
        self._require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        self._require(
            self.hidden_size is None or (isinstance(self.hidden_size, int) and self.hidden_size > 0),
            f"hidden_size must be None or a positive int, got {self.hidden_size!r}",
        )


class FacTShared(nn.Module):
    """Factors shared by every FacT layer of one adapter.

    ``U`` (d, r), ``V`` (r, d); TK adds ``C`` (r, r, r) and ``P`` (r, n_slices).
    """

    def __init__(self, d: int, r: int, variant: str, n_slices: int) -> None:
        super().__init__()
        self.d, self.r, self.variant, self.n_slices = d, r, variant, n_slices
        bound = 1.0 / math.sqrt(d)  # nn.Linear(d, r)'s default init
        self.U = nn.Parameter(torch.empty(d, r).uniform_(-bound, bound))
        self.V = nn.Parameter(torch.zeros(r, d))
        if variant == "tk":
            self.C = nn.Parameter(torch.empty(r, r, r))
            self.P = nn.Parameter(torch.empty(r, n_slices))
            nn.init.xavier_uniform_(self.C)
            nn.init.xavier_uniform_(self.P)

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}, variant={self.variant!r}, slices={self.n_slices}"


class FacTAdapter(nn.Module):
    """FacT update of one Linear with ``in = a d`` and ``out = b d``.

    Args:
        shared: the adapter's :class:`FacTShared` (the same object in every layer).
        a, b: input / output blocks; offset: index of this layer's first slice in ``P`` (TK).
        scale: s; dropout: probability.

    Cores: TT: ``cores`` (b, a, r, r), uniform(+-1/sqrt(a r)) (nn.Linear(a r, r)'s default);
    TK: ``C x_3 P[:, offset : offset + a b]``, slice ``offset + o a + i`` for block (o, i).
    Shapes: x (..., a d) -> update (..., b d).
    """

    def __init__(self, shared: FacTShared, a: int, b: int, offset: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.shared = shared
        self.a, self.b, self.offset = a, b, offset
        self.scale = scale
        r = shared.r
        if shared.variant == "tt":
            bound = 1.0 / math.sqrt(a * r)
            self.cores = nn.Parameter(torch.empty(b, a, r, r).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def core_tensor(self) -> torch.Tensor:
        """Sigma_{o,i} as a (b, a, r, r) tensor."""
        sh = self.shared
        if sh.variant == "tt":
            return self.cores
        p = sh.P[:, self.offset : self.offset + self.a * self.b]  # (r, a b)
        sigma = torch.einsum("xyk,kj->jxy", sh.C, p)  # (a b, r, r)
        return sigma.reshape(self.b, self.a, sh.r, sh.r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh = self.shared
        lead = x.shape[:-1]
        xb = x.reshape(*lead, self.a, sh.d)
        u = xb @ sh.U.to(x.dtype)  # (..., a, r)
        z = torch.einsum("...ix,oixy->...oy", u, self.core_tensor().to(x.dtype))  # (..., b, r)
        out = self.dropout(z) @ sh.V.to(x.dtype)  # (..., b, d)
        return out.reshape(*lead, self.b * sh.d) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The exact weight update, shape (b d, a d) (nn.Linear layout)."""
        sh = self.shared
        sigma = self.core_tensor()
        blocks = torch.einsum("dx,oixy,ye->oide", sh.U, sigma, sh.V)  # (b, a, d_in, d_out): U Sigma V
        w = blocks.permute(0, 3, 1, 2).reshape(self.b * sh.d, self.a * sh.d)  # [o, e, i, d] -> W[o e, i d]
        return w * self.scale


class FacTLinear(MergeDeltaMixin, AdapterLayer):
    """``nn.Linear`` + FacT update. Input (..., in) -> output (..., out). Mergeable exactly."""

    mergeable = True
    method_name = "fact"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        adapter = self.active()
        if adapter is None:
            return result
        return result + adapter(x).to(result.dtype)


class FacTTuner(WrappingTuner):
    """FacT on the Linear layers of every ViT block (preset role ``linears``)."""

    config_cls = FacTConfig
    default_roles = ("linear",)
    applies_to = (
        "the nn.Linear layers of transformer blocks (q, k, v / fused qkv, proj, fc1, fc2) sharing one hidden size"
    )
    config: FacTConfig

    def resolve(self, model: nn.Module, *default_roles: str) -> list[str]:
        cfg = self.config
        if cfg.target_modules is None and not cfg.target_types:
            preset = self.preset(model)
            if preset is not None and preset.role("linear") is None:
                raise MethodNotApplicableError(
                    f"fact factorises the weight updates of the Linear layers of transformer blocks (shared U, V across "
                    f"layers); {type(innermost(model)).__name__} (preset {preset.name}) has no transformer linears"
                )
        return super().resolve(model, *default_roles)

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        return FacTLinear if isinstance(module, nn.Linear) else None

    def plan(self, model: nn.Module) -> list[PlanItem]:
        """Plan items whose context is ``(a, b, offset)``: the target's ``d x d`` blocks and its first core index."""
        items = super().plan(model)
        d, slices = self.slices(items)
        return [PlanItem(i.name, i.module, i.layer_cls, (d, *slices[i.name])) for i in items]

    def slices(self, plan: list[PlanItem]) -> tuple[int, dict[str, tuple[int, int, int]]]:
        """Hidden size d and, per target, (a, b, offset) of its d x d slices."""
        widths = [w for i in plan for w in (i.module.in_features, i.module.out_features)]
        d = self.config.hidden_size or min(widths)
        bad = [
            f"{i.name} ({i.module.in_features} -> {i.module.out_features})"
            for i in plan
            if i.module.in_features % d
            or i.module.out_features % d
            or min(i.module.in_features, i.module.out_features) != d
        ]
        if bad:
            raise MethodNotApplicableError(
                f"fact shares U (d x r) and V (r x d) across all targeted layers, so every target must map the hidden "
                f"size d={d} to a multiple of it or back (d -> k d or k d -> d); these do not: {bad[:4]}. Narrow "
                "target_modules to layers of one width (e.g. one Swin stage) or set hidden_size"
            )
        out: dict[str, tuple[int, int, int]] = {}
        offset = 0
        for i in plan:
            a, b = i.module.in_features // d, i.module.out_features // d
            out[i.name] = (a, b, offset)
            offset += a * b
        return d, out

    def prepare(self, model: nn.Module, plan: list[PlanItem], adapter_name: str) -> FacTShared:
        """The factors U, V (and the core) shared by every layer of this adapter."""
        d = plan[0].context[0]
        n = sum(i.context[1] * i.context[2] for i in plan)
        return FacTShared(d, self.config.r, self.config.variant, n)

    def build(self, item: PlanItem, shared: FacTShared) -> nn.Module:
        _, a, b, offset = item.context
        return FacTAdapter(shared, a, b, offset, self.config.scale, self.config.dropout)

    def item_info(self, item: PlanItem) -> dict[str, Any]:
        d, a, b, offset = item.context
        return {
            "layer": item.layer_cls.__name__,
            "hidden_size": d,
            "blocks_in": a,
            "blocks_out": b,
            "core_offset": offset,
        }


register_method("fact", FacTConfig, FacTTuner)
