"""One initialisation for every new classification head the library creates.

A freshly created classifier must not decide the first training steps: with PyTorch's or MONAI's
default initialisation a 1280-input EfficientNet ``_fc`` starts with weight std 0.40, logits of about
+-14 on real images and a first cross-entropy of 15 where ``ln(num_classes)`` is expected. Every head
made by :mod:`monai_peft.networks` (MONAI ViT / EfficientNet backbones, timm models built by the
library, :class:`~monai_peft.networks.heads.ClassificationHead`) therefore starts the way MAE and
MED-PEFT initialise theirs::

    W ~ trunc_normal(0, std=2e-5)   (PyTorch's absolute bounds +-2, i.e. a plain normal at this std)
    b = 0

so that the logits start at ~0 and the first loss is ``ln(num_classes)`` on any input.
"""

from __future__ import annotations

import torch
from torch import nn

from monai_peft.errors import ConfigError

__all__ = ["HEAD_INIT_STD", "init_new_head"]

#: Standard deviation of a new head's weights (MAE / MED-PEFT ``trunc_normal_(head.weight, std=2e-5)``).
HEAD_INIT_STD = 2e-5

_LINEAR_LIKE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _last_linear(module: nn.Module) -> nn.Module | None:
    if isinstance(module, _LINEAR_LIKE):
        return module
    last = None
    for sub in module.modules():
        if isinstance(sub, _LINEAR_LIKE):
            last = sub
    return last


def init_new_head(head: nn.Module, std: float = HEAD_INIT_STD) -> nn.Module:
    """Initialise a new classifier in place: weights ``trunc_normal(std)``, bias 0; returns ``head``.

    Args:
        head: an ``nn.Linear`` (or 1x1 ``Conv``) classifier, or a module holding one; for an MLP head
            only the *last* linear layer is re-initialised (hidden layers keep their default init so that
            gradients reach them). ``nn.Identity`` (no classifier) is returned unchanged.
        std: weight standard deviation (default :data:`HEAD_INIT_STD` = 2e-5).

    Raises:
        ConfigError: ``std`` is negative, or ``head`` has parameters but no linear layer.
    """
    if std < 0:
        raise ConfigError(f"head init std must be >= 0, got {std}")
    layer = _last_linear(head)
    if layer is None:
        if any(True for _ in head.parameters()):
            raise ConfigError(
                f"init_new_head found no Linear/Conv layer in {type(head).__name__}; pass the classifier layer itself"
            )
        return head
    with torch.no_grad():
        if std == 0:
            nn.init.zeros_(layer.weight)
        else:
            nn.init.trunc_normal_(layer.weight, std=std)  # absolute bounds +-2, as timm / MAE
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return head
