"""Classification heads for token encoders (ViT) and feature-map encoders (CNN, Swin, TinyViT).

Pooling follows the conventions of the source papers:

* ``"cls"``: the CLS token (token 0), as in ViT, VPT and the DKA scripts.
* ``"mean"``: the mean of the patch tokens, the CLS/prompt tokens excluded, optionally followed by a
  LayerNorm ``fc_norm``: the MAE global-pool head (He et al., CVPR 2022), used by MED-PEFT on
  chest-radiograph foundation models.
* ``"avg"`` / ``"max"``: global average / max pooling of a channel-first map ``(B, C, *spatial)``.
* ``None``: the input is already a pooled vector ``(B, C)``.

The classifier is linear (``num_layers=1``, linear probing) or a ``k``-layer MLP (``num_layers=k``;
EPT's "MLP-3" baseline is ``num_layers=3``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.layers.utils import get_act_layer
from torch import nn

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.networks.heads.init import HEAD_INIT_STD, init_new_head

__all__ = ["ClassificationHead", "ClassificationModel"]

_POOLINGS = ("cls", "mean", "avg", "max", None)
_INITS = ("trunc_normal", "zeros", "xavier", "default")


def _last_feature(features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The last element of a list/tuple of features (what feature extractors return), or the tensor."""
    if isinstance(features, torch.Tensor):
        return features
    if isinstance(features, (list, tuple)) and features and isinstance(features[-1], torch.Tensor):
        return features[-1]
    what = type(features).__name__
    if isinstance(features, (list, tuple)):
        what += f" of {[type(f).__name__ for f in features]}"
    raise InputDataError(
        f"ClassificationHead expected a tensor or a non-empty list/tuple of tensors, got {what}. "
        "A raw MONAI ViT returns (x, hidden_states): wrap it in MonaiViTFeatures(vit, output='tokens')."
    )


class ClassificationHead(nn.Module):
    """Pooling + (optional norm) + linear or MLP classifier.

    Args:
        in_channels: feature width ``C`` (ViT hidden size or number of map channels).
        num_classes: number of logits.
        pooling: ``"cls"`` | ``"mean"`` (token inputs ``(B, P + N, C)``), ``"avg"`` | ``"max"``
            (map inputs ``(B, C, *spatial)``) or ``None`` (pooled input ``(B, C)``).
        num_prefix_tokens: number of leading non-patch tokens (CLS, distillation, prompt tokens)
            excluded by ``"mean"``; ``"cls"`` takes token 0 and needs at least one.
        fc_norm: normalisation of the pooled vector before the classifier: ``None``/``False``,
            ``"layer"``/``True`` (LayerNorm, eps 1e-6, MAE/MED-PEFT ``fc_norm``) or ``"batch"``
            (BatchNorm1d without affine parameters, eps 1e-6, the MAE linear-probing recipe).
        num_layers: 1 = linear classifier; ``k > 1`` = ``k`` linear layers with activation
            (MLP-k; EPT's MLP-3 baseline uses 3).
        hidden_channels: width of the hidden MLP layers (default ``in_channels``).
        act: activation between MLP layers, any MONAI ``get_act_layer`` spec (default ``"relu"``).
        dropout: dropout probability applied to the classifier input and after each hidden layer.
        init: initialisation of the *last* linear layer: ``"trunc_normal"`` (weights
            ``trunc_normal_(std=init_std)`` with PyTorch's absolute bounds +-2, bias 0, exactly the
            MAE / MED-PEFT call with std 2e-5, which makes it a plain normal), ``"zeros"`` (weights
            and bias 0: logits start at 0), ``"xavier"`` (xavier-uniform, bias 0) or ``"default"``
            (PyTorch's). Hidden MLP layers always keep PyTorch's default initialisation so that
            gradients reach them.
        init_std: standard deviation for ``init="trunc_normal"``.

    Shapes:
        input ``(B, P + N, C)`` tokens, ``(B, C, *spatial)`` map or ``(B, C)``; a list/tuple of features
        (as returned by the feature extractors) uses its last element. Output ``(B, num_classes)``.

    Example::

        >>> head = ClassificationHead(768, 14, pooling="mean", fc_norm="layer")   # MED-PEFT / MAE
        >>> head(torch.randn(2, 197, 768)).shape
        torch.Size([2, 14])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pooling: str | None = "cls",
        num_prefix_tokens: int = 1,
        fc_norm: str | bool | None = None,
        num_layers: int = 1,
        hidden_channels: int | None = None,
        act: str | tuple = "relu",
        dropout: float = 0.0,
        init: str = "trunc_normal",
        init_std: float = HEAD_INIT_STD,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}.")
        if pooling not in _POOLINGS:
            raise ConfigError(f"pooling must be one of {_POOLINGS}, got {pooling!r}.")
        if num_prefix_tokens < 0:
            raise ConfigError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}.")
        if pooling == "cls" and num_prefix_tokens < 1:
            raise ConfigError("pooling='cls' reads token 0 as the CLS token: num_prefix_tokens must be >= 1.")
        if num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {num_layers}.")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}.")
        if init not in _INITS:
            raise ConfigError(f"init must be one of {_INITS}, got {init!r}.")
        if fc_norm is True:
            fc_norm = "layer"
        if fc_norm is False:
            fc_norm = None
        if fc_norm not in (None, "layer", "batch"):
            raise ConfigError(f"fc_norm must be None, 'layer' or 'batch', got {fc_norm!r}.")

        self.in_channels = in_channels
        self.num_classes = num_classes
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens
        self.fc_norm: nn.Module
        if fc_norm == "layer":
            self.fc_norm = nn.LayerNorm(in_channels, eps=1e-6)
        elif fc_norm == "batch":
            self.fc_norm = nn.BatchNorm1d(in_channels, affine=False, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()

        hidden = in_channels if hidden_channels is None else hidden_channels
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        width = in_channels
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden), get_act_layer(act)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.fc = nn.Linear(width, num_classes)
        layers.append(self.fc)
        self.classifier = nn.Sequential(*layers)
        self.reset_classifier(init, init_std)

    def reset_classifier(self, init: str = "trunc_normal", init_std: float = HEAD_INIT_STD) -> None:
        """Re-initialise the last linear layer (see the class arguments ``init`` / ``init_std``)."""
        if init == "trunc_normal":
            init_new_head(self.fc, init_std)  # the library-wide new-head init (absolute bounds +-2, as timm / MAE)
        elif init == "zeros":
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)
        elif init == "xavier":
            nn.init.xavier_uniform_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)
        elif init == "default":
            self.fc.reset_parameters()
        else:
            raise ConfigError(f"init must be one of {_INITS}, got {init!r}.")

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, C)`` (before ``fc_norm``)."""
        if self.pooling in ("cls", "mean"):
            if x.ndim != 3:
                raise InputDataError(
                    f"pooling={self.pooling!r} expects tokens (B, tokens, C={self.in_channels}), got {tuple(x.shape)}; "
                    "use pooling='avg' or 'max' for channel-first feature maps."
                )
            if x.shape[-1] != self.in_channels:
                raise InputDataError(
                    f"token width {x.shape[-1]} does not match in_channels={self.in_channels} (tokens are (B, N, C))."
                )
            if self.pooling == "cls":
                return x[:, 0]
            if x.shape[1] <= self.num_prefix_tokens:
                raise InputDataError(
                    f"pooling='mean' found no patch tokens: {x.shape[1]} tokens, {self.num_prefix_tokens} prefix tokens."
                )
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        if self.pooling in ("avg", "max"):
            if x.ndim < 3:
                raise InputDataError(
                    f"pooling={self.pooling!r} expects a channel-first map (B, C, *spatial), got {tuple(x.shape)}."
                )
            if x.shape[1] != self.in_channels:
                raise InputDataError(
                    f"map has {x.shape[1]} channels but in_channels={self.in_channels} (maps are (B, C, *spatial))."
                )
            flat = x.flatten(2)
            return flat.mean(dim=-1) if self.pooling == "avg" else flat.amax(dim=-1)
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise InputDataError(f"pooling=None expects pooled features (B, {self.in_channels}), got {tuple(x.shape)}.")
        return x

    def forward(self, features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.classifier(self.fc_norm(self.pool(_last_feature(features))))


class _CallableEncoder(nn.Module):
    """Holds a plain callable (no parameters of its own) so that it still sits at ``model.encoder``."""

    def __init__(self, fn: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> object:
        return self.fn(x)


def as_encoder_module(encoder: nn.Module | Callable[[torch.Tensor], object]) -> nn.Module:
    """``encoder`` itself if it is a module, else a parameter-free module wrapping the callable."""
    if isinstance(encoder, nn.Module):
        return encoder
    if callable(encoder):
        return _CallableEncoder(encoder)
    raise ConfigError(f"encoder must be an nn.Module or a callable, got {type(encoder).__name__}.")


class ClassificationModel(nn.Module):
    """``head(encoder(x))`` as one module, with the submodules named ``encoder`` and ``head``.

    The names let PEFT configurations select them (e.g. ``modules_to_save=["head"]``, or freezing
    every parameter whose name starts with ``encoder.``).

    Args:
        encoder: module or callable mapping an image ``(B, C_in, *spatial)`` to features: tokens
            ``(B, P + N, C)``, a map ``(B, C, *grid)`` or a list of them (the last one is used), e.g.
            ``MonaiViTFeatures(vit, output="tokens")``.
        head: usually a :class:`ClassificationHead`.
    """

    def __init__(self, encoder: nn.Module | Callable[[torch.Tensor], object], head: nn.Module) -> None:
        super().__init__()
        self.encoder = as_encoder_module(encoder)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.head(self.encoder(x))
