"""PEFT for diffusion U-Nets: the text-to-image arm of Dutt et al. (MIDL 2024) on MONAI's
:class:`~monai.networks.nets.DiffusionModelUNet` (2D and 3D).

Dutt, Ericsson, Sanchez, Tsaftaris, Hospedales, "Parameter-Efficient Fine-Tuning for Medical
Image Analysis: The Missed Opportunity", MIDL 2024 (PMLR 250:406-425), Table 4 / Appendix E,
fine-tune only the U-Net of Stable Diffusion (SD) with: full fine-tuning, attention, bias, norm,
bias+norm+attention (B+N+A), LoRA, SV-Diff and DiffFit. This module gives each of them its
paper default on MONAI's U-Net (``target_modules=None``) through a network preset, and adds the
two methods the core lacks.

Method -> registry name (config class) on DiffusionModelUNet, with the SD rule it reproduces:

============================  =====================================  ==========================================
paper method                  monai_peft                             SD rule -> MONAI modules
============================  =====================================  ==========================================
Bias                          ``"bitfit"`` (BitFitConfig)            every parameter named ``bias`` (convs,
                                                                     linears, GroupNorm/LayerNorm biases)
Norm                          ``"norm_tuning"`` (NormTuningConfig)   params with "norm" in the name = affine
                                                                     params of every GroupNorm/LayerNorm,
                                                                     incl. the output GroupNorm ``out.0``
                                                                     (SD's ``conv_norm_out``)
Attention                     ``"attention_tuning"``                 "attentions" in the name = every parameter
                              (AttentionTuningConfig)                of ``{down,up}_blocks.i.attentions.j`` and
                                                                     of ``middle_block.attention`` (SD:
                                                                     ``mid_block.attentions.0``)
B+N+A                         ``"diffusion_bias_norm_attention"``    union of the three rules above
                              (DiffusionBiasNormAttentionConfig)
LoRA                          ``"lora"`` (LoraConfig)                ``to_q``, ``to_k``, ``to_v``, ``out_proj``
                                                                     of every attention (SD/diffusers:
                                                                     ``to_q, to_k, to_v, to_out.0``)
SV-Diff                       ``"svdiff"`` (SVDiffConfig)            every Linear and convolution of the U-Net
DiffFit                       ``"difffit"`` (DiffFitConfig)          bias + norm + ``class_embedding`` + new
                                                                     scale factors gamma on every residual
                                                                     branch
============================  =====================================  ==========================================

SV-Diff (Han et al., ICCV 2023), per weight ``W`` reshaped to a matrix ``(m, n)`` (Linear: (out, in);
convolution: ``(W.shape[0], prod(W.shape[1:]))``, i.e. (out, in/groups * k...))::

    W = U diag(sigma) V^T                 (thin SVD, k = min(m, n) singular values, frozen)
    W_delta = U diag(ReLU(sigma + delta)) V^T      delta in R^k trainable, delta = 0 at init

computed as ``W + U diag(ReLU(sigma + delta) - sigma) V^T`` so that ``delta = 0`` reproduces the base
weight bit for bit (``ReLU(sigma) - sigma == 0`` exactly because sigma >= 0).

DiffFit (Xie et al., ICCV 2023): train the biases, the norms, the class embedding ("y_embed") and
new scale factors ``gamma`` (initialised to 1) that multiply the output of each residual branch:
``x <- x + gamma * f(x)``. On MONAI's U-Net the branch outputs are ``conv2`` of every
DiffusionUNetResnetBlock, ``attn.out_proj`` of every SpatialAttentionBlock and ``attn1.out_proj``,
``attn2.out_proj`` and ``ff.linear2`` of every transformer block; gamma folds exactly into these
layers' weight and bias.

Importing this module registers the methods. The ``monai.DiffusionModelUNet`` preset lives with the other
presets in :mod:`monai_peft.targeting` (it recognises the class by its qualified name, without importing
MONAI); its structural roles give each method its default: ``attention`` (attention tuning), ``qkv``
(LoRA, with all of q, k, v), ``weights`` (SV-Diff), ``residual_out`` (DiffFit), ``norm``, ``head``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_peft.config import PeftConfig
from monai_peft.errors import AdapterError, MethodNotApplicableError, TargetingError
from monai_peft.methods.base import AdapterLayer, BaseTuner, PlanItem, WrappingTuner
from monai_peft.methods.common import CONV, CONVT, conv_forward_with
from monai_peft.methods.selective import (
    AttentionTuningConfig,
    AttentionTuningTuner,
    BitFitConfig,
    BitFitTuner,
    NormTuningConfig,
    NormTuningTuner,
)
from monai_peft.registry import register_method
from monai_peft.targeting import (
    DIFFUSION_UNET_PRESET,
    DiffusionUNetType,
    canonical_named_tensors,
    get_preset,
    get_submodule,
    innermost,
    set_submodule,
)

__all__ = [
    "DIFFUSION_UNET_PRESET",
    "DiffFitConfig",
    "DiffFitGamma",
    "DiffFitScaleLayer",
    "DiffFitTuner",
    "DiffusionBiasNormAttentionConfig",
    "DiffusionBiasNormAttentionTuner",
    "DiffusionUNetType",
    "SVDiffConfig",
    "SVDiffLayer",
    "SVDiffShift",
    "SVDiffTuner",
    "svd_factors",
]


def _net_name(model: nn.Module) -> str:
    return type(innermost(model)).__name__


# ---------------------------------------------------------------------------------------------
# bias + norm + attention (B+N+A)
# ---------------------------------------------------------------------------------------------
@dataclass
class DiffusionBiasNormAttentionConfig(PeftConfig):
    """Dutt et al.'s SD "B+N+A": biases, norms and attention blocks trained together, in place.

    The union of ``bitfit`` (every parameter named ``bias``), ``norm_tuning`` (affine parameters
    of the normalisation layers in ``norm_types``) and ``attention_tuning`` (every parameter of the
    attention blocks). Biases and norms are taken from the whole network; ``target_modules`` /
    ``target_types`` / ``exclude_modules`` choose the attention blocks (``None``: the network
    preset's ``attention`` role, on DiffusionModelUNet ``{down,up}_blocks.i.attentions.j`` and
    ``middle_block.attention``).

    Args:
        bias: include every bias.
        norm: include the norm affine parameters.
        attention: include every parameter of the attention blocks.
        norm_types: which normalisation layers count as norms (see :class:`NormTuningConfig`).
    """

    bias: bool = True
    norm: bool = True
    attention: bool = True
    norm_types: list[str] = field(default_factory=lambda: ["layernorm", "batchnorm", "groupnorm", "instancenorm"])

    def validate(self) -> None:
        self._require(self.bias or self.norm or self.attention, "at least one of bias, norm, attention must be True")
        NormTuningConfig(norm_types=self.norm_types)  # same validation as norm tuning


class DiffusionBiasNormAttentionTuner(BaseTuner):
    """Owns the union of the bias, norm and attention-tuning parameters (see the config)."""

    config_cls = DiffusionBiasNormAttentionConfig
    config: DiffusionBiasNormAttentionConfig

    def owned_tensors(self, model: nn.Module) -> list[str]:
        cfg = self.config
        names: list[str] = []
        if cfg.bias:
            names += BitFitTuner(BitFitConfig()).owned_tensors(model)
        if cfg.norm:
            names += NormTuningTuner(NormTuningConfig(norm_types=list(cfg.norm_types))).owned_tensors(model)
        if cfg.attention:
            attn = AttentionTuningConfig(
                target_modules=cfg.target_modules,
                target_types=cfg.target_types,
                exclude_modules=cfg.exclude_modules,
                include_pos_embed=False,
            )
            try:
                names += AttentionTuningTuner(attn).owned_tensors(model)
            except MethodNotApplicableError as exc:
                raise MethodNotApplicableError(
                    f"{self.method}: {_net_name(model)} has no attention block to tune ({exc}); "
                    "set attention=False for bias+norm tuning or pass target_modules"
                ) from exc
        return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# SV-Diff
# ---------------------------------------------------------------------------------------------
@dataclass
class SVDiffConfig(PeftConfig):
    """Configuration of SV-Diff (spectral shifts of the singular values of every weight matrix).

    ``target_modules=None`` adapts every Linear and convolution of a DiffusionModelUNet (the
    SVDiff paper fine-tunes the spectral shifts of all weight matrices of the U-Net). On other
    networks pass ``target_modules`` / ``target_types`` (e.g. ``["Linear", "Conv2d"]``).

    Args:
        svd_dtype: precision of the one-off SVD of each base weight, ``"float32"`` (default) or
            ``"float64"``. The factors only enter the *change* ``U diag(ReLU(sigma + delta) - sigma) V^T``,
            so their round-off scales with ``delta`` and float32 is ample; float64 is ~1.5x slower
            on CPU. The factors are stored in the weight's precision (at least float32).
    """

    svd_dtype: str = "float32"

    def validate(self) -> None:
        self._require(
            self.svd_dtype in ("float32", "float64"),
            f"svd_dtype must be 'float32' or 'float64', got {self.svd_dtype!r}",
        )


def svd_factors(
    weight: torch.Tensor, svd_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``weight`` seen as the matrix ``(W.shape[0], prod(W.shape[1:]))``.

    Args:
        weight: a Linear weight (out, in) or a convolution weight (out, in/groups, *k)
            (transposed convolutions: (in, out/groups, *k)).
        svd_dtype: precision of the decomposition.

    Returns:
        ``U`` (m, k), ``sigma`` (k,) in descending order, ``Vh`` (k, n) with ``k = min(m, n)``,
        in ``weight``'s dtype promoted to at least float32.
    """
    out_dtype = torch.promote_types(weight.dtype, torch.float32)
    mat = weight.detach().reshape(weight.shape[0], -1).to(svd_dtype)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return u.to(out_dtype), s.to(out_dtype), vh.to(out_dtype)


class SVDiffShift(nn.Module):
    """The trainable spectral shift ``delta`` (k,) of one weight matrix; zeros = identity."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(rank))


class SVDiffLayer(AdapterLayer):
    """A Linear / convolution / transposed convolution whose weight is spectrally shifted.

    Holds the frozen SVD of the base weight as non-persistent buffers (``svd_u`` (m, k),
    ``svd_s`` (k,), ``svd_vh`` (k, n); computed once per layer and shared by every SV-Diff
    adapter of the layer, never written to adapter files). Each adapter holds ``delta`` (k,).

    Forward (input/output shapes as the base layer: (..., in) -> (..., out) for Linear,
    (B, C_in, *spatial) -> (B, C_out, *spatial_out) for convolutions)::

        W_eff = W + (U diag(ReLU(sigma + delta) - sigma) V^T).view(W.shape)   (= U diag(ReLU(sigma + delta)) V^T)

    Merging adds the same change to ``W`` (exact up to float rounding); unmerging subtracts it.
    """

    mergeable = True
    method_name = "svdiff"

    def __init__(self, base_layer: nn.Module, svd_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(base_layer)
        u, s, vh = svd_factors(innermost(base_layer).weight, svd_dtype)
        self.register_buffer("svd_u", u, persistent=False)
        self.register_buffer("svd_s", s, persistent=False)
        self.register_buffer("svd_vh", vh, persistent=False)

    @property
    def rank(self) -> int:
        return int(self.svd_s.numel())

    def delta_weight(self, adapter: nn.Module) -> torch.Tensor:
        """``U diag(ReLU(sigma + delta) - sigma) V^T`` reshaped like the base weight (in its dtype)."""
        base = innermost(self.base_layer)
        s = self.svd_s
        shift = F.relu(s + adapter.delta.to(s.dtype)) - s
        return ((self.svd_u * shift) @ self.svd_vh).view(base.weight.shape).to(base.weight.dtype)

    def shifted_weight(self, adapter: nn.Module) -> torch.Tensor:
        """``W_delta`` as used in the forward pass."""
        return innermost(self.base_layer).weight + self.delta_weight(adapter)

    def forward(self, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        adapter = self.active()
        base = innermost(self.base_layer)
        if adapter is None:
            if output_size is None:
                return self.base_layer(x)
            return self.base_layer(x, output_size)
        weight = self.shifted_weight(adapter)
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, base.bias)
        return conv_forward_with(base, x, weight, base.bias, output_size)

    def merge_adapter_into_base(self, adapter: nn.Module) -> None:
        base = innermost(self.base_layer)
        with torch.no_grad():
            base.weight += self.delta_weight(adapter)

    def unmerge_adapter_from_base(self, adapter: nn.Module) -> None:
        base = innermost(self.base_layer)
        with torch.no_grad():
            base.weight -= self.delta_weight(adapter)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, {super().extra_repr()}"


class SVDiffTuner(WrappingTuner):
    """Wraps every targeted weight matrix in an :class:`SVDiffLayer` with a zero spectral shift."""

    config_cls = SVDiffConfig
    default_roles = ("weights",)
    applies_to = (
        "modules with a weight matrix: nn.Linear, nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d "
        "(a convolution weight is reshaped to (W.shape[0], prod(W.shape[1:])))"
    )
    config: SVDiffConfig

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        if isinstance(module, (nn.Linear, *CONV, *CONVT)) and module.weight is not None:
            return SVDiffLayer
        return None

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        w = module.weight
        return SVDiffShift(min(w.shape[0], w[0].numel()))

    def inject(self, model: nn.Module, adapter_name: str) -> None:
        svd_dtype = getattr(torch, self.config.svd_dtype)
        for item in self.plan(model):
            current = get_submodule(model, item.name)
            if isinstance(current, SVDiffLayer):
                layer = current
            else:
                layer = SVDiffLayer(current, svd_dtype)  # the SVD is computed once, in the configured precision
                set_submodule(model, item.name, layer)
            adapter = self.build(item, None)
            if adapter.delta.numel() != layer.rank:  # pragma: no cover - defensive
                raise AdapterError(f"svdiff: rank mismatch at {item.name}: {adapter.delta.numel()} vs {layer.rank}")
            layer.add_adapter(adapter_name, adapter)


# ---------------------------------------------------------------------------------------------
# DiffFit
# ---------------------------------------------------------------------------------------------
@dataclass
class DiffFitConfig(PeftConfig):
    """Configuration of DiffFit: biases + norms + class embedding + scale factors gamma.

    ``target_modules`` name the layers whose output gamma multiplies (the last layer of a
    residual branch). ``None`` on a DiffusionModelUNet: ``conv2`` of every resnet block,
    ``attn.out_proj`` of every self-attention block, ``attn1.out_proj`` / ``attn2.out_proj`` /
    ``ff.linear2`` of every transformer block (with ``include_fc=False`` MONAI's self-attention
    has no output projection, so those branches get no gamma). Other networks need explicit
    ``target_modules``. Biases, norms and the class embedding are trained in place (as ``bitfit``
    and ``norm_tuning``), over the whole network.

    Args:
        train_bias: train every parameter named ``bias``.
        train_norm: train the affine parameters of every normalisation layer.
        train_class_embedding: train the class-label embedding (DiT's ``y_embedder``; MONAI's
            ``class_embedding``, present when the U-Net has ``num_class_embeds``).
        class_embedding_params: canonical parameter names of the class embedding (``None``: the
            network preset's, i.e. ``class_embedding.weight`` when it exists).
        scalar_gamma: one gamma per branch instead of one per output channel.
    """

    train_bias: bool = True
    train_norm: bool = True
    train_class_embedding: bool = True
    class_embedding_params: list[str] | None = None
    scalar_gamma: bool = False


class DiffFitGamma(nn.Module):
    """Scale factors ``gamma`` (C,) (or (1,) when scalar), initialised to 1, on channel axis ``channel_dim``."""

    def __init__(self, channels: int, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.gamma = nn.Parameter(torch.ones(channels))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y: (..., C) when ``channel_dim == -1``, (B, C, *spatial) when 1."""
        g = self.gamma
        if self.channel_dim == -1 or g.numel() == 1:
            return y * g
        return y * g.view(1, -1, *([1] * (y.dim() - 2)))


class DiffFitScaleLayer(AdapterLayer):
    """``y = gamma * base(x)`` after a Linear (``(..., out)``) or a convolution (``(B, out, *spatial)``).

    Mergeable exactly: ``W' = diag(gamma) W``, ``b' = gamma * b`` (the output channel is axis 0 of
    the weight); unmerging divides, so merging refuses a gamma with zeros.
    """

    mergeable = True
    method_name = "difffit"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        adapter = self.active()
        return out if adapter is None else adapter(out)

    @staticmethod
    def _weight_scale(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        if gamma.numel() == 1:
            return gamma.reshape(())
        return gamma.view(-1, *([1] * (weight.dim() - 1)))

    def merge_adapter_into_base(self, adapter: nn.Module) -> None:
        base = innermost(self.base_layer)
        gamma = adapter.gamma.detach()
        if bool((gamma == 0).any()):
            raise AdapterError("difffit: cannot merge a scale factor gamma equal to 0 (the merge could not be undone)")
        with torch.no_grad():
            base.weight.mul_(self._weight_scale(base.weight, gamma).to(base.weight.dtype))
            if base.bias is not None:
                base.bias.mul_(gamma.to(base.bias.dtype))

    def unmerge_adapter_from_base(self, adapter: nn.Module) -> None:
        base = innermost(self.base_layer)
        gamma = adapter.gamma.detach()
        with torch.no_grad():
            base.weight.div_(self._weight_scale(base.weight, gamma).to(base.weight.dtype))
            if base.bias is not None:
                base.bias.div_(gamma.to(base.bias.dtype))


class DiffFitTuner(WrappingTuner):
    """Adds gamma after each residual branch and trains biases, norms and the class embedding in place."""

    config_cls = DiffFitConfig
    default_roles = ("residual_out",)
    applies_to = "the outputs of nn.Linear and nn.Conv1d/2d/3d layers (the last layer of each residual branch)"
    config: DiffFitConfig

    def plan(self, model: nn.Module) -> list[PlanItem]:
        cfg = self.config
        if cfg.target_modules is None and not cfg.target_types:
            preset = self.preset(model)
            if preset is None or preset.role("residual_out") is None:
                raise MethodNotApplicableError(
                    f"difffit: the default placement of the scale factors gamma is defined for diffusion U-Nets "
                    f"(MONAI DiffusionModelUNet); {_net_name(model)} is not one. Pass target_modules naming the last "
                    "Linear/convolution of each residual branch to use DiffFit on it"
                )
        return super().plan(model)

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        if isinstance(module, (nn.Linear, *CONV)):
            return DiffFitScaleLayer
        return None

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        if isinstance(module, nn.Linear):
            channels, dim = module.out_features, -1
        else:
            channels, dim = module.out_channels, 1
        return DiffFitGamma(1 if self.config.scalar_gamma else channels, dim)

    def owned_tensors(self, model: nn.Module) -> list[str]:
        cfg = self.config
        names: list[str] = []
        # a network without biases (or norms) is fine: the other parts still train
        if cfg.train_bias:
            with contextlib.suppress(MethodNotApplicableError):
                names += BitFitTuner(BitFitConfig()).owned_tensors(model)
        if cfg.train_norm:
            with contextlib.suppress(MethodNotApplicableError):
                names += NormTuningTuner(NormTuningConfig()).owned_tensors(model)
        if cfg.train_class_embedding:
            names += self._class_embedding(model)
        return list(dict.fromkeys(names))

    def _class_embedding(self, model: nn.Module) -> list[str]:
        tensors = canonical_named_tensors(model, buffers=False)
        explicit = self.config.class_embedding_params
        if explicit is not None:
            missing = [n for n in explicit if n not in tensors]
            if missing:
                raise TargetingError(
                    f"difffit: class_embedding_params {missing} are not parameters of {_net_name(model)}; "
                    f"parameter names look like {list(tensors)[:8]}"
                )
            return list(explicit)
        preset = get_preset(model)
        candidates = preset.param_roles.get("class_embed", []) if preset is not None else []
        return [n for n in candidates if n in tensors]

    def check_applicable(self, model: nn.Module) -> None:
        self.plan(model)
        self.owned_tensors(model)


register_method("diffusion_bias_norm_attention", DiffusionBiasNormAttentionConfig, DiffusionBiasNormAttentionTuner)
register_method("svdiff", SVDiffConfig, SVDiffTuner)
register_method("difffit", DiffFitConfig, DiffFitTuner)
