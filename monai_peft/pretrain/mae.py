"""MAE self-supervised pretraining with MONAI's ``MaskedAutoEncoderViT`` (He et al., CVPR 2022), 2D and 3D.

The model splits an image ``x`` ``(B, C, *S)`` into ``N = prod(S / p)`` patches, keeps a random
``(1 - mask_ratio)`` of them for the encoder, and the decoder predicts every patch's pixels. The loss is the mean
squared error on the **masked** patches only (MAE eq. 1)::

    L = sum_n m_n * mean_j (x̂_nj - t_nj)^2 / sum_n m_n,     m_n = 1 if patch n was masked

with ``t_n`` the patch's pixels (``p^d * C`` values), optionally normalised by the patch's own mean and
variance (``norm_pix_loss``, MAE's best setting on ImageNet).

Optimisation: AdamW (betas 0.9 / 0.95, weight decay 0.05, MAE's recipe), a linear warm-up over
``warmup_fraction`` of the steps and a half-cosine decay to 0, random flips along the last axis.

Files in ``out`` (all written atomically, temporary file + ``os.replace``):

* ``checkpoint.pt`` - training state every ``save_every`` steps and at the end of every epoch: model, optimiser,
  step, torch RNG state (the mask sampling), config. Read back with ``torch.load(weights_only=True)`` only, so
  ``--resume`` after a kill continues from the last saved step and reproduces the uninterrupted run's weights.
* ``tb/`` - TensorBoard logs (``loss``, ``lr`` per step, ``epoch_loss``).
* ``history.json`` - mean loss per epoch.
* at the end: ``encoder.safetensors`` + ``mae_vit.json`` (:mod:`~monai_peft.pretrain.backbone`; the study backbone
  ``mae_vit``) and ``mae.safetensors`` (the whole autoencoder, decoder included).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_peft.errors import ConfigError
from monai_peft.pretrain.backbone import ENCODER_FILE, FORMAT, FORMAT_VERSION, META_FILE, encoder_state_from_mae

__all__ = ["MAEPretrainConfig", "PretrainFolderError", "build_mae", "mae_loss", "patchify", "pretrain_mae"]

logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
#: Config fields that change what is computed: a resumed run must agree on all of them.
_RUN_FIELDS = (
    "data",
    "data_key",
    "pattern",
    "image_size",
    "in_channels",
    "patch_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "mlp_dim",
    "decoder_hidden_size",
    "decoder_layers",
    "decoder_heads",
    "mask_ratio",
    "norm_pix_loss",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_fraction",
    "flip",
    "seed",
)


class PretrainFolderError(ConfigError):
    """The output folder holds another run, or a run that ``--resume`` cannot continue."""


@dataclass
class MAEPretrainConfig:
    """Options of ``monai-peft pretrain`` (defaults: a small ViT that trains on a CPU in minutes).

    Attributes:
        data: an ``.npz`` (``data_key`` images, labels unused) or a folder of NIfTI volumes.
        out: output folder.
        image_size: ``(H, W)`` or ``(D, H, W)``; one value for every dimension; None: the data's size.
        patch_size: patch edge (the same in every dimension); must divide every ``image_size``.
        hidden_size / num_layers / num_heads / mlp_dim: the encoder ViT (``mlp_dim`` None: ``4 * hidden_size``).
        decoder_hidden_size / decoder_layers / decoder_heads: the MAE decoder (pretraining only).
        mask_ratio: share of patches hidden from the encoder (MAE: 0.75).
        norm_pix_loss: per-patch normalised pixel targets.
        epochs, batch_size, lr, weight_decay, warmup_fraction: optimisation (AdamW, warm-up + cosine).
        flip: random flips along the last axis.
        seed: data order, masks, flips and initialisation.
        save_every: steps between checkpoints (and at every epoch end).
        max_steps: stop after this many steps in total (None: all epochs); a later ``resume`` continues.
        device: ``cpu``, ``cuda`` ...
        in_channels: 1 or 3 (None: the data's).
        spatial_dims: 2 or 3 expected (None: from the data).
        data_key / pattern: see :func:`~monai_peft.pretrain.data.load_unlabelled`.
        progress: show a tqdm bar.
        tensorboard: write TensorBoard logs to ``out/tb``.
    """

    data: str
    out: str = "runs/pretrain_mae"
    image_size: tuple[int, ...] | None = None
    patch_size: int = 4
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int | None = None
    decoder_hidden_size: int = 48
    decoder_layers: int = 2
    decoder_heads: int = 4
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    flip: bool = True
    seed: int = 0
    save_every: int = 100
    max_steps: int | None = None
    device: str = "cpu"
    in_channels: int | None = None
    spatial_dims: int | None = None
    data_key: str = "train_images"
    pattern: str | None = None
    progress: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        if self.image_size is not None:
            self.image_size = tuple(int(s) for s in self.image_size)
        for name in ("patch_size", "hidden_size", "num_layers", "num_heads", "decoder_hidden_size", "decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
        for name in ("epochs", "batch_size", "save_every", "decoder_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}.")
        if self.decoder_hidden_size % self.decoder_heads:
            raise ConfigError(
                f"decoder_hidden_size {self.decoder_hidden_size} must be divisible by decoder_heads {self.decoder_heads}."
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must lie in (0, 1) (MAE uses 0.75), got {self.mask_ratio}.")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup_fraction < 1:
            raise ConfigError("lr must be > 0, weight_decay >= 0 and warmup_fraction in [0, 1).")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or None, got {self.max_steps}.")

    @property
    def encoder_mlp_dim(self) -> int:
        return int(self.mlp_dim or 4 * self.hidden_size)

    def run_identity(self, image_size: Sequence[int], in_channels: int) -> dict[str, Any]:
        """The fields a resumed run must share (with the resolved image size and channels)."""
        out = {k: getattr(self, k) for k in _RUN_FIELDS}
        out["image_size"] = [int(s) for s in image_size]
        out["in_channels"] = int(in_channels)
        out["mlp_dim"] = self.encoder_mlp_dim
        out["data"] = str(Path(self.data).resolve())
        return out


def build_mae(cfg: MAEPretrainConfig, spatial_dims: int, in_channels: int, image_size: Sequence[int]) -> nn.Module:
    """MONAI ``MaskedAutoEncoderViT`` of ``cfg`` (conv patches, sin-cos positions, qkv with bias)."""
    from monai.networks.nets import MaskedAutoEncoderViT

    size = tuple(int(s) for s in image_size)
    step = 4 if spatial_dims == 2 else 6
    for name in ("hidden_size", "decoder_hidden_size"):
        if getattr(cfg, name) % step:
            raise ConfigError(
                f"{name} {getattr(cfg, name)} must be divisible by {step} for {spatial_dims}D sin-cos position "
                "embeddings (e.g. 96 / 48, the defaults, work in 2D and 3D)."
            )
    bad = [s for s in size if s % cfg.patch_size]
    if bad:
        raise ConfigError(
            f"image_size {list(size)} is not a multiple of patch_size {cfg.patch_size}; choose a size divisible by "
            "the patch size (e.g. --image-size 28 with --patch-size 4)."
        )
    n_tokens = math.prod(s // cfg.patch_size for s in size)
    if int((1 - cfg.mask_ratio) * n_tokens) < 1:
        raise ConfigError(
            f"{n_tokens} patches with mask_ratio {cfg.mask_ratio} leave no visible patch; use a smaller patch size or "
            "mask ratio."
        )
    return MaskedAutoEncoderViT(
        in_channels=in_channels,
        img_size=size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        mlp_dim=cfg.encoder_mlp_dim,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        masking_ratio=cfg.mask_ratio,
        decoder_hidden_size=cfg.decoder_hidden_size,
        decoder_mlp_dim=4 * cfg.decoder_hidden_size,
        decoder_num_layers=cfg.decoder_layers,
        decoder_num_heads=cfg.decoder_heads,
        proj_type="conv",
        pos_embed_type="sincos",
        decoder_pos_embed_type="sincos",
        spatial_dims=spatial_dims,
        qkv_bias=True,
    )


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, *S)`` -> ``(B, N, p^d * C)`` in the token order of MONAI's conv patch embedding (row-major grid)."""
    b, c, *spatial = x.shape
    d = len(spatial)
    grid = [s // patch_size for s in spatial]
    shape = [b, c]
    for g in grid:
        shape += [g, patch_size]
    x = x.reshape(shape)
    # (B, C, g1, p1, g2, p2[, g3, p3]) -> (B, g1, g2[, g3], p1, p2[, p3], C)
    perm = [0] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)] + [1]
    return x.permute(perm).reshape(b, math.prod(grid), patch_size**d * c)


def mae_loss(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """Mean squared error on the masked patches (module docstring).

    Args:
        pred: ``(B, N, p^d * C)`` decoder output of ``MaskedAutoEncoderViT``.
        x: ``(B, C, *S)`` input images.
        mask: ``(B, N)`` with 1 for masked (hidden) patches.
    """
    target = patchify(x, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_json(path: Path, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    _atomic(path, write)


def _lr_at(step: int, total: int, cfg: MAEPretrainConfig) -> float:
    warm = int(round(cfg.warmup_fraction * total))
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _epoch_order(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation and flip decisions of an epoch: a pure function of ``(seed, epoch)`` (resume-safe)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen), torch.rand(n, generator=gen) < 0.5


def _check_folder(out: Path, identity: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    ckpt = out / CHECKPOINT
    if not out.exists():
        return None
    if not out.is_dir():
        raise PretrainFolderError(f"output {out} exists and is not a folder; pass another --out.")
    if not ckpt.is_file():
        if (out / META_FILE).is_file():
            raise PretrainFolderError(
                f"{out} holds a finished pretraining run without its training state; pass another --out."
            )
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if others and not resume:
            raise PretrainFolderError(f"{out} is not empty ({sorted(others)[:5]}); pass an empty or new --out.")
        return None
    if not resume:
        raise PretrainFolderError(
            f"{out} already holds a pretraining run; pass --resume to continue it, or choose another --out."
        )
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved = json.loads(state["identity"])
    diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {identity.get(k)!r}" for k in diff)
        raise PretrainFolderError(f"--resume: {out} holds a run with other settings ({detail}); use another --out.")
    return state


def pretrain_mae(cfg: MAEPretrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run MAE pretraining (module docstring); returns the summary also written to ``mae_vit.json``.

    Raises:
        ConfigError / InputDataError: bad options or data (before any training).
        PretrainFolderError: ``out`` holds another run (or a run, without ``resume``).
    """
    from monai_peft.pretrain.data import load_unlabelled

    cfg.validate()
    data = load_unlabelled(
        cfg.data,
        image_size=cfg.image_size,
        key=cfg.data_key,
        pattern=cfg.pattern,
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
    )
    images = data.images
    size = tuple(int(s) for s in images.shape[2:])
    dims, channels = data.spatial_dims, data.in_channels
    identity = cfg.run_identity(size, channels)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    model = build_mae(cfg, dims, channels, size)  # checks patch size / mask ratio before touching `out`
    state = _check_folder(out, identity, resume)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    n = len(images)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = cfg.epochs * steps_per_epoch
    step, history, seconds = 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, seconds = int(state["step"]), float(state["seconds"])
        history = json.loads(state["history"])
        resumed_losses = json.loads(state["epoch_losses"])
        logger.info("resuming %s at step %d of %d", out, step, total)
    stop_at = total if cfg.max_steps is None else min(total, cfg.max_steps)

    def save() -> None:
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "step": step,
            "seconds": seconds + (time.time() - t0),
            "history": json.dumps(history),
            "epoch_losses": json.dumps(epoch_losses),
            "identity": json.dumps(identity),
        }
        _atomic(out / CHECKPOINT, lambda tmp: torch.save(payload, tmp))
        _atomic_json(out / "history.json", {"steps_per_epoch": steps_per_epoch, "step": step, "epochs": history})

    writer = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"), purge_step=step)
        except ImportError:  # pragma: no cover - tensorboard is a dependency of the pretrain extra
            logger.warning("tensorboard is not installed: no TensorBoard log (pip install tensorboard)")
    from tqdm.auto import tqdm

    bar = tqdm(total=stop_at, initial=step, desc="MAE pretraining", unit="step", disable=not cfg.progress)
    t0 = time.time()
    epoch_losses: list[float] = resumed_losses if state is not None else []
    try:
        while step < stop_at:
            epoch, k = divmod(step, steps_per_epoch)
            perm, flips = _epoch_order(n, cfg.seed, epoch)
            idx = perm[k * bs : (k + 1) * bs]
            xb = images[idx]
            if cfg.flip:
                xb = torch.where(flips[idx].reshape(-1, *([1] * (xb.ndim - 1))), xb.flip(-1), xb)
            xb = xb.to(device)
            lr = _lr_at(step, total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            pred, mask = model(xb)
            loss = mae_loss(pred, xb, mask, cfg.patch_size, cfg.norm_pix_loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"MAE loss became {float(loss)} at step {step}; lower --lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            value = float(loss.detach())
            epoch_losses.append(value)
            if writer is not None:
                writer.add_scalar("loss", value, step)
                writer.add_scalar("lr", lr, step)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", epoch=epoch + 1)
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch:
                history.append(
                    {"epoch": epoch + 1, "loss": sum(epoch_losses) / len(epoch_losses), "steps": len(epoch_losses)}
                )
                if writer is not None:
                    writer.add_scalar("epoch_loss", history[-1]["loss"], epoch + 1)
                epoch_losses = []
            if end_of_epoch or step % cfg.save_every == 0 or step == stop_at:
                save()
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    summary = {"finished": step >= total, "step": step, "total_steps": total, "out": str(out)}
    if step < total:
        logger.info("stopped at step %d of %d (max_steps); continue with resume", step, total)
        return summary
    seconds += time.time() - t0
    return {**summary, **export_encoder(model, cfg, out, data.source, n, size, channels, history, seconds)}


def export_encoder(
    model: nn.Module,
    cfg: MAEPretrainConfig,
    out: Path,
    source: str,
    n_images: int,
    size: Sequence[int],
    channels: int,
    history: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    """Write ``encoder.safetensors``, ``mae.safetensors`` and ``mae_vit.json``; return the JSON's content."""
    from safetensors.torch import save_file

    from monai_peft.pretrain.backbone import _sha256

    encoder = encoder_state_from_mae(model.state_dict(), cfg.num_layers)
    full = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic(out / ENCODER_FILE, lambda tmp: save_file(encoder, tmp, metadata={"format": FORMAT}))
    _atomic(
        out / "mae.safetensors", lambda tmp: save_file(full, tmp, metadata={"format": "monai.MaskedAutoEncoderViT"})
    )
    try:
        import monai_peft

        version = getattr(monai_peft, "__version__", "unknown")
    except Exception:  # pragma: no cover
        version = "unknown"
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {
            "spatial_dims": len(size),
            "in_channels": int(channels),
            "img_size": [int(s) for s in size],
            "patch_size": cfg.patch_size,
            "hidden_size": cfg.hidden_size,
            "mlp_dim": cfg.encoder_mlp_dim,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "qkv_bias": True,
            "layer_norm_eps": 1e-5,
            "proj_type": "conv",
            "pretrain_pos_embed": "sincos",
        },
        "encoder_file": ENCODER_FILE,
        "encoder_sha256": _sha256(out / ENCODER_FILE),
        "encoder_parameters": int(sum(v.numel() for v in encoder.values())),
        "preprocessing": (
            "images scaled to [0, 1] (npz uint8: x / 255; NIfTI: 0.5-99.5 percentile per volume), resized to img_size"
        ),
        "pretraining": {
            "method": "MAE (He et al. 2022), monai.networks.nets.MaskedAutoEncoderViT",
            "data": source,
            "images": int(n_images),
            "mask_ratio": cfg.mask_ratio,
            "norm_pix_loss": cfg.norm_pix_loss,
            "decoder": {
                "hidden_size": cfg.decoder_hidden_size,
                "layers": cfg.decoder_layers,
                "heads": cfg.decoder_heads,
            },
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "seed": cfg.seed,
            "device": cfg.device,
            "seconds": round(seconds, 1),
            "epoch_loss": [round(h["loss"], 6) for h in history],
        },
        "monai_peft_version": version,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"},
    }
    meta["config"]["image_size"] = [int(s) for s in size]
    _atomic_json(out / META_FILE, meta)
    return meta
