"""The MONAI Label app of monai_peft: PEFT bundles and many adapters on one base, served and trained.

Imported by the app folder's ``main.py`` (:func:`monai_peft.monailabel.app_dir`) inside MONAI Label's own
environment. Settings (``monailabel start_server ... --conf KEY VALUE``):

``models``
    comma-separated bundles, each a folder name under ``<app>/model/`` or a path. Each bundle is one MONAI Label
    model named after its folder, served with the bundle's own adapter (``adapter_dir``, any method: LoRA is
    merged for inference, DKA / adapters run unmerged).
``base_bundle`` + ``adapters``
    multi-adapter mode: the base network of ``base_bundle`` is loaded ONCE and every adapter of ``adapters``
    (``"name1=/path/a,name2=/path/b"``, a JSON object, or a ``.json`` file) is a MONAI Label model on it.
``adapter_store``
    folder of the trained versions (default ``<app>/model/adapter_store``); ``/train/<model>`` publishes
    ``<store>/<model>/vNNNN`` and the server serves the newest at the next request.
``device``
    ``cuda`` / ``cpu`` (default: cuda when available).
``skip_trainers``
    ``true`` to offer no training.

Concurrency: every model of one base shares its :class:`~monai_peft.monailabel.serving.MultiAdapterServer`
lock, held around ``set_adapter`` + sliding-window inference (pre-processing, inversion and writing run outside it).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from monai_peft.errors import ConfigError, InputDataError, MonaiPeftError
from monai_peft.monailabel.serving import AdapterStore, BundleRuntime, MultiAdapterServer, parse_adapters
from monai_peft.monailabel.train import train_adapter

__all__ = ["PeftInferTask", "PeftLabelApp", "PeftTrainTask"]

logger = logging.getLogger(__name__)


def _http_error(status: int, detail: str) -> Exception:
    """A FastAPI ``HTTPException`` (what the endpoint turns into a JSON ``{"detail": ...}`` reply)."""
    from fastapi import HTTPException

    return HTTPException(status_code=status, detail=detail)


def _device(value: Any) -> str:
    name = (
        value if isinstance(value, str) and value else (value[0] if isinstance(value, (list, tuple)) and value else "")
    )
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return name


class PeftInferTask(InferTask):
    """MONAI Label infer task for one adapter of a :class:`MultiAdapterServer`.

    ``__call__(request)`` segments ``request["image"]`` (a file or DICOM folder) and returns the label file (NIfTI,
    uint8, the image's exact shape and affine) and ``{"adapter", "adapter_version", "adapter_sha256", ...}``.
    """

    def __init__(self, server: MultiAdapterServer, name: str, runtime: BundleRuntime, description: str = "") -> None:
        labels = dict(runtime.labels)
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=runtime.spatial_dims,
            description=description or runtime.description,
            config={"base_bundle": runtime.name},
        )
        self.server = server
        self.name = name
        self.runtime = runtime

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise InputDataError("the request has no image (give an image id of the datastore, or upload a file)")
        label, version, data = self.server.segment(self.name, image)
        fd, out = tempfile.mkstemp(suffix=".nii.gz", prefix=f"{self.name}-")
        os.close(fd)
        from monai_peft.inference import write_prediction_nifti

        reference = image if Path(image).is_file() and image.endswith((".nii", ".nii.gz")) else None
        try:
            write_prediction_nifti(label, out, reference=reference, dtype=np.uint8)
        except Exception:
            Path(out).unlink(missing_ok=True)
            raise
        return out, {
            "adapter": self.name,
            "adapter_version": version.version,
            "adapter_folder": str(version.path),
            "adapter_sha256": version.sha256,
            "base_bundle": self.runtime.name,
            "adapter_latencies": data.get("latencies", {}),
        }


class PeftTrainTask(TrainTask):
    """MONAI Label train task: fine-tune ONLY adapter ``name`` on the datastore's final labels, publish a version."""

    def __init__(
        self, runtime: BundleRuntime, store: AdapterStore, name: str, configured: Path, device: str = "cpu"
    ) -> None:
        super().__init__(f"fine-tune adapter '{name}' (base {runtime.name}) on the saved final labels")
        self.runtime, self.store, self.name, self.configured, self.device = runtime, store, name, configured, device

    def config(self) -> dict[str, Any]:
        return {"max_epochs": 1, "learning_rate": self.runtime.learning_rate or 1e-3}

    def stats(self) -> dict[str, Any]:
        """The published version of the adapter (``/info``'s ``train_stats``); never raises."""
        try:
            cur = self.store.current(self.name)
        except Exception as exc:  # a broken pointer must not break /info
            return {"adapter_version": None, "error": str(exc)}
        return {"adapter_version": cur[0] if cur else 0, "adapter_folder": str(cur[1] if cur else self.configured)}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        datalist = datastore.datalist()
        return train_adapter(
            self.runtime,
            self.store,
            self.name,
            self.configured,
            datalist,
            max_epochs=int(request.get("max_epochs", 1)),
            learning_rate=float(request["learning_rate"]) if request.get("learning_rate") else None,
            device=_device(request.get("device") or self.device),
        )


def _bundle_path(app_dir: str, value: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = Path(app_dir) / "model" / value
    if not p.is_dir():
        raise ConfigError(
            f"bundle {value!r} not found at {p}: link or copy the bundle folder there (ln -s /path/to/bundle {p}) or "
            "give its full path"
        )
    return p


class PeftLabelApp(MONAILabelApp):
    """MONAI Label app serving monai_peft bundles and many adapters on one base (settings: module docstring)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        import monai_peft

        conf = dict(conf or {})
        self.device = _device(conf.get("device"))
        self.store = AdapterStore(conf.get("adapter_store") or os.path.join(app_dir, "model", "adapter_store"))
        self.servers: dict[str, MultiAdapterServer] = {}
        self._entries: dict[str, tuple[MultiAdapterServer, BundleRuntime, Path]] = {}
        models = [m.strip() for m in (conf.get("models") or "").split(",") if m.strip()]
        for m in models:
            runtime = BundleRuntime.from_bundle(_bundle_path(app_dir, m), device=self.device)
            if runtime.adapter_dir is None:
                raise ConfigError(f"bundle {runtime.root}: configs/inference.json has no 'adapter_dir'")
            self._add(runtime, {runtime.name: str(runtime.adapter_dir)}, key=runtime.name)
        adapters = parse_adapters(conf.get("adapters"), base_dir=app_dir)
        if adapters:
            base = conf.get("base_bundle")
            if not base:
                raise ConfigError("--conf adapters needs --conf base_bundle <bundle name or path> (the shared base)")
            runtime = BundleRuntime.from_bundle(_bundle_path(app_dir, base), device=self.device)
            self._add(runtime, adapters, key=f"{runtime.name}[shared]")
        if not self._entries:
            raise ConfigError(
                "no model to serve: give --conf models <bundle>[,<bundle>...] and/or --conf base_bundle <bundle> "
                "--conf adapters 'name=/adapter/folder,...' (see docs/monailabel.md)"
            )
        self.skip_trainers = str(conf.get("skip_trainers", "false")).lower() in ("1", "true", "yes")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"monai_peft ({monai_peft.__version__})",
            description="PEFT bundles and task adapters on shared foundation models (monai_peft)",
            version=str(monai_peft.__version__),
        )

    def _add(self, runtime: BundleRuntime, adapters: dict[str, str], key: str) -> None:
        clash = sorted(set(adapters) & set(self._entries))
        if clash:
            raise ConfigError(f"model name(s) {clash} given twice (bundles and adapters must have distinct names)")
        server = MultiAdapterServer(
            runtime.build_base(),
            runtime.preprocessing,
            runtime.inferer,
            adapters,
            store=self.store,
            device=self.device,
            spatial_dims=runtime.spatial_dims,
            in_channels=runtime.in_channels,
        )
        self.servers[key] = server
        for name, folder in adapters.items():
            self._entries[name] = (server, runtime, Path(folder))

    def init_infers(self) -> dict[str, InferTask]:
        out: dict[str, InferTask] = {}
        for name, (server, runtime, _) in self._entries.items():
            shared = len(server.names) > 1
            desc = f"{runtime.description} | adapter '{name}'" + (" on a shared base" if shared else "")
            out[name] = PeftInferTask(server, name, runtime, description=desc)
            logger.info(
                "+++ adapter model %s (base bundle %s, %d adapter(s) on it)", name, runtime.name, len(server.names)
            )
        return out

    def init_trainers(self) -> dict[str, TrainTask]:
        if self.skip_trainers:
            return {}
        return {
            name: PeftTrainTask(runtime, self.store, name, folder, self.device)
            for name, (_, runtime, folder) in self._entries.items()
            if runtime.train_preprocessing is not None
        }

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's ``infer`` with clear HTTP errors: 404 unknown model / image, 422 unusable input."""
        model = request.get("model")
        if model not in self._infers:
            msg = f"unknown model {model!r}; this server serves {sorted(self._infers)}"
            logger.error("infer refused: %s", msg)
            raise _http_error(404, msg)
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            ds = datastore if datastore else self.datastore()
            if not ds.get_image_uri(image):
                msg = (
                    f"no image {image!r} in the datastore and no such file; upload the image or use an id of /datastore"
                )
                logger.error("infer refused: %s", msg)
                raise _http_error(404, msg)
        try:
            return super().infer(request, datastore)
        except (InputDataError, ConfigError) as exc:
            logger.error("infer %s refused: %s", model, exc)
            raise _http_error(422, str(exc)) from exc
        except MonaiPeftError as exc:
            logger.error("infer %s failed: %s", model, exc)
            raise _http_error(500, str(exc)) from exc
        except MONAILabelException as exc:
            logger.error("infer %s failed: %s", model, exc.msg)
            raise _http_error(400, str(exc.msg)) from exc
