"""Fine-tune one served adapter on the labels users saved, and publish it as a new version (no MONAI Label needed).

:func:`train_adapter` builds a *fresh* base network from the bundle, loads the adapter version being served with
``is_trainable=True`` (so only the adapter's tensors - LoRA / DKA matrices, the tuned head - get gradients; the
base stays frozen and its fingerprint unchanged), trains it on ``[{"image": path, "label": path}, ...]`` with the
bundle's ``train#preprocessing`` and ``loss`` (``configs/train.json``; DiceCE otherwise) and AdamW, and publishes
the result in the :class:`~monai_peft.monailabel.serving.AdapterStore` (versioned folder + atomic pointer). A
server that serves the adapter picks the new version up at its next request.

The network being served is never touched: training runs on its own copy (MONAI Label runs ``/train`` in a
separate process by default; with ``run_sync`` it runs in the server process, still on its own copy).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.model import PeftModel
from monai_peft.monailabel.serving import AdapterStore, BundleRuntime, adapter_folder_ok

__all__ = ["train_adapter"]

logger = logging.getLogger(__name__)


def _plain(t: Any) -> torch.Tensor:
    """A plain tensor (MetaTensor meta dropped: the loss needs none)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def _source_version(store: AdapterStore, name: str, configured: Path) -> tuple[int, Path]:
    cur = store.current(name)
    if cur is not None and adapter_folder_ok(cur[1]):
        return cur
    return 0, configured


def train_adapter(
    runtime: BundleRuntime,
    store: AdapterStore,
    name: str,
    configured_adapter: str | Path,
    datalist: Sequence[Mapping[str, Any]],
    *,
    max_epochs: int = 1,
    learning_rate: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Train adapter ``name`` for ``max_epochs`` epochs on ``datalist`` and publish a new version.

    Args:
        runtime: the bundle (base recipe, ``train_preprocessing``, ``loss``).
        store: where versions are published.
        name: the model / adapter name.
        configured_adapter: the adapter folder served when the store holds no version yet.
        datalist: ``[{"image": file, "label": file}]`` (MONAI Label's ``datastore.datalist()``, final labels).
        max_epochs: passes over ``datalist``.
        learning_rate: AdamW learning rate (default: the bundle's ``learning_rate``, else 1e-3).
        device: training device.
        seed: RNG seed (random patches, augmentation).
        log: progress callback (default: the module logger).

    Returns:
        ``{"model", "version", "path", "from_version", "epochs", "steps", "loss", "trainable", "total", "wall_s"}``.

    Raises:
        InputDataError: no labelled image.
        ConfigError: the bundle has no training preprocessing.
    """
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    say = log or logger.info
    if not datalist:
        raise InputDataError(
            f"no labelled image to train adapter {name!r} on: save a final label for at least one image first "
            "(Slicer: 'Submit Label'; HTTP: PUT /datastore/label?image=<id>&tag=final)"
        )
    if runtime.train_preprocessing is None:
        raise ConfigError(
            f"bundle {runtime.root} has no configs/train.json with 'train#preprocessing'; the app cannot train it"
        )
    if int(max_epochs) < 1:
        raise ConfigError(f"max_epochs must be >= 1, got {max_epochs!r}")
    t0 = time.time()
    device = torch.device(device)
    from_version, folder = _source_version(store, name, Path(configured_adapter))
    model = PeftModel.from_pretrained(runtime.build_base(), folder, adapter_name=name, is_trainable=True).to(device)
    trainable, total = model.trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"adapter {folder} has no trainable tensors")
    lr = float(learning_rate if learning_rate is not None else (runtime.learning_rate or 1e-3))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    loss_fn = runtime.loss if runtime.loss is not None else DiceCELoss(to_onehot_y=True, softmax=True)
    set_determinism(seed=seed)
    model.train()
    steps, losses = 0, []
    try:
        for epoch in range(1, int(max_epochs) + 1):
            epoch_losses = []
            for item in datalist:
                data = runtime.train_preprocessing({"image": str(item["image"]), "label": str(item["label"])})
                if isinstance(data, list):  # a RandCropByPosNegLabeld-style transform gives several patches
                    images = torch.stack([d["image"] for d in data])
                    labels = torch.stack([d["label"] for d in data])
                else:
                    images, labels = data["image"][None], data["label"][None]
                opt.zero_grad()
                x = _plain(images).to(device)
                y = _plain(labels).to(device)
                loss = loss_fn(model(x), y)
                if not math.isfinite(float(loss.detach())):
                    raise InputDataError(
                        f"the loss became {float(loss.detach())} on {item['image']}; check the image and label"
                    )
                loss.backward()
                opt.step()
                steps += 1
                epoch_losses.append(float(loss.detach()))
            losses.append(sum(epoch_losses) / len(epoch_losses))
            say(f"adapter {name}: epoch {epoch}/{max_epochs} loss {losses[-1]:.4f} ({len(datalist)} image(s))")
    finally:
        set_determinism(seed=None)
    model.eval()
    info = {
        "model": name,
        "from_version": from_version,
        "from_folder": str(folder),
        "epochs": int(max_epochs),
        "steps": steps,
        "loss": losses,
        "learning_rate": lr,
        "images": [str(i["image"]) for i in datalist],
    }
    version, path = store.publish(name, lambda tmp: model.save_adapter(tmp, adapter_name=name), info=info)
    out = {**info, "version": version, "path": str(path), "trainable": trainable, "total": total}
    out["wall_s"] = round(time.time() - t0, 2)
    say(f"adapter {name}: version {version} written to {path} ({out['wall_s']} s)")
    return out
