"""Serving many PEFT adapters from one base network: the part of the MONAI Label app that needs no MONAI Label.

* :class:`BundleRuntime` - what a monai_peft bundle's ``configs/inference.json`` gives a server: the base network
  (``base_network``), the adapter folder (``adapter_dir``), the preprocessing, the sliding-window inferer, the label
  names (``metadata.json``) and, from ``configs/train.json`` when it has them, ``train#preprocessing`` and ``loss``.
* :class:`AdapterStore` - versioned adapter folders ``<root>/<name>/v0001, v0002 ...`` and a pointer file
  ``<root>/<name>/CURRENT``. A version is written complete in a temporary sibling folder, renamed into place, and
  only then the pointer is replaced (``os.replace``): a reader sees the old version or the new one, never a part.
* :class:`MultiAdapterServer` - ONE base network (a :class:`~monai_peft.PeftModel`) with several named adapters.
  ``predict(name, image)`` takes a lock, activates adapter ``name`` (``set_adapter``) and runs the sliding-window
  inferer; the lock covers the switch *and* the inference, so two threads can never run with each other's adapter.
  Before each prediction it looks at the adapter's pointer file and loads a new version when one was published
  (e.g. by a training process); a version that fails to load (corrupt, wrong base) is logged and the previous one
  keeps serving.

Tensor shapes: the preprocessed image is channel-first ``(C, X, Y, Z)`` (3D) or ``(C, H, W)`` (2D); the network
maps ``(1, C, *spatial)`` to logits ``(1, K, *spatial)``; :meth:`MultiAdapterServer.segment` returns the label map
``(1, *loaded_spatial)`` on the grid of the file that was loaded (exact shape and affine, by inverting the
preprocessing with :class:`~monai_peft.inference.InvertToOriginald`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_peft.checkpoint import ADAPTER_WEIGHTS_NAME, CONFIG_NAME, file_sha256, read_adapter_folder
from monai_peft.errors import CheckpointError, ConfigError, InputDataError
from monai_peft.model import PeftModel

__all__ = [
    "POINTER_NAME",
    "AdapterStore",
    "AdapterVersion",
    "BundleRuntime",
    "MultiAdapterServer",
    "parse_adapters",
]

logger = logging.getLogger(__name__)

#: name of the pointer file of an adapter in an :class:`AdapterStore`.
POINTER_NAME = "CURRENT"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _check_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{what} {name!r} is not valid: use letters, digits, '_' and '-' (it becomes a URL path /infer/<name>)"
        )
    return name


def parse_adapters(value: str | Mapping[str, str] | None, base_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Parse the ``adapters`` setting of the app into ``{model name: adapter folder}``.

    Accepted forms (``--conf adapters ...`` of ``monailabel start_server``):

    * ``"tumour=/path/a,site2=/path/b"`` (comma-separated ``name=folder`` pairs);
    * a JSON object string ``'{"tumour": "/path/a"}'``;
    * the path of a ``.json`` file holding such an object.

    Relative folders are taken relative to ``base_dir`` (the JSON file's folder for a file).

    Raises:
        ConfigError: an entry without ``=``, an empty or invalid name, a duplicate name, or unreadable JSON.
    """
    if value is None or value == "":
        return {}
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if isinstance(value, Mapping):
        items = [(str(k), str(v)) for k, v in value.items()]
    else:
        text = str(value).strip()
        if text.endswith(".json") and not text.startswith("{"):
            path = Path(text).expanduser()
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"cannot read the adapters file {path}: {exc}; it must hold {{name: folder}}"
                ) from exc
            if not isinstance(data, dict):
                raise ConfigError(f"the adapters file {path} must hold a JSON object {{name: folder}}")
            return parse_adapters({str(k): str(v) for k, v in data.items()}, base_dir=path.parent)
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"adapters: {exc} in the JSON {text!r}") from exc
            return parse_adapters({str(k): str(v) for k, v in data.items()}, base_dir=base)
        items = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ConfigError(
                    f"adapters entry {part!r} has no '=': write name=folder pairs separated by commas, e.g. "
                    "'tumour=/models/tumour,site2=/models/site2', or give a .json file {name: folder}"
                )
            k, _, v = part.partition("=")
            items.append((k.strip(), v.strip()))
    out: dict[str, str] = {}
    for k, v in items:
        _check_name(k, "adapter name")
        if k in out:
            raise ConfigError(f"adapter name {k!r} is given twice in the adapters setting")
        if not v:
            raise ConfigError(f"adapter {k!r} has an empty folder in the adapters setting")
        p = Path(v).expanduser()
        out[k] = str(p if p.is_absolute() else (base / p))
    return out


# ----------------------------------------------------------------------------------------------
# versioned adapter store
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterVersion:
    """One version of a served adapter: its number (0 = the configured folder), folder and weights' sha256."""

    version: int
    path: Path
    sha256: str

    @property
    def label(self) -> str:
        return f"v{self.version:04d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class AdapterStore:
    """Versioned adapter folders with an atomic pointer, shared by the server and training processes.

    Layout::

        <root>/<name>/v0001/adapter_config.json, adapter_model.safetensors, version_info.json
        <root>/<name>/v0002/...
        <root>/<name>/CURRENT          {"version": 2, "folder": "v0002"}

    Args:
        root: the store folder (created on first publish).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def folder(self, name: str) -> Path:
        return self.root / _check_name(name)

    def pointer(self, name: str) -> Path:
        return self.folder(name) / POINTER_NAME

    def pointer_state(self, name: str) -> tuple[int, int] | None:
        """``(mtime_ns, size)`` of the pointer file (a cheap change test), or None when there is none."""
        try:
            st = self.pointer(name).stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def current(self, name: str) -> tuple[int, Path] | None:
        """``(version, folder)`` the pointer names, or None when nothing was published for ``name``.

        Raises:
            CheckpointError: the pointer file is unreadable or names a missing folder.
        """
        p = self.pointer(name)
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
            version, folder = int(data["version"]), str(data["folder"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"the adapter pointer {p} is unreadable ({exc}); delete it to fall back") from exc
        path = self.folder(name) / folder
        if not path.is_dir():
            raise CheckpointError(f"the adapter pointer {p} names {path}, which does not exist")
        return version, path

    def versions(self, name: str) -> list[int]:
        """Numbers of the complete version folders of ``name``, ascending."""
        d = self.folder(name)
        if not d.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in d.iterdir() if p.is_dir() and re.fullmatch(r"v\d{4,}", p.name))

    def publish(
        self, name: str, write: Callable[[Path], Any], info: Mapping[str, Any] | None = None
    ) -> tuple[int, Path]:
        """Write a new version of ``name`` with ``write(folder)`` and make it current, atomically.

        ``write`` fills a temporary folder (e.g. ``peft_model.save_adapter``); the folder is checked
        (:func:`~monai_peft.checkpoint.read_adapter_folder`), renamed to the next ``vNNNN`` and only then the
        pointer is replaced. On any error nothing changes for readers.

        Returns:
            ``(version, folder)`` of the new version.
        """
        d = self.folder(name)
        d.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=d))
        try:
            write(tmp)
            read_adapter_folder(tmp)  # complete and self-consistent, or CheckpointError
            meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **dict(info or {})}
            _atomic_write_text(
                tmp / "version_info.json", json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
            )
            os.chmod(tmp, 0o755)
            existing = self.versions(name)
            version = (existing[-1] if existing else 0) + 1
            while True:
                dest = d / f"v{version:04d}"
                try:
                    os.rename(tmp, dest)  # fails if dest exists (another publisher): take the next number
                    break
                except OSError:
                    if not dest.exists():
                        raise
                    version += 1
            _atomic_write_text(self.pointer(name), json.dumps({"version": version, "folder": dest.name}) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("adapter %s: published version %d at %s", name, version, dest)
        return version, dest


# ----------------------------------------------------------------------------------------------
# bundle
# ----------------------------------------------------------------------------------------------
def _labels_from_metadata(meta: Mapping[str, Any]) -> dict[str, int]:
    outputs = (meta.get("network_data_format") or {}).get("outputs") or {}
    if not outputs:
        return {}
    pred = next(iter(outputs.values()))
    out = {}
    for k, v in (pred.get("channel_def") or {}).items():
        if str(v).lower() != "background":
            out[str(v)] = int(k)
    return out


@dataclass
class BundleRuntime:
    """The parts of a monai_peft bundle that a server needs (see :meth:`from_bundle`).

    Attributes:
        root: the bundle folder.
        name: the bundle's name (its folder name).
        build_base: callable giving a fresh base network (``nn.Module``, eval mode, float32 on CPU).
        adapter_dir: the bundle's adapter folder (``models/adapter``).
        preprocessing: invertible transform ``{"image": path} -> {"image": (C, *spatial) MetaTensor}``.
        inferer: the bundle's (sliding-window) inferer.
        labels: ``{label name: value}`` without background (from ``metadata.json``).
        spatial_dims: 2 or 3.
        in_channels: channels the network takes (None if unknown).
        description: the bundle's description.
        train_preprocessing / loss / learning_rate: from ``configs/train.json`` (``train#preprocessing``,
            ``loss``, ``learning_rate``) when it has them, for the app's train task.
    """

    root: Path
    name: str
    build_base: Callable[[], nn.Module]
    adapter_dir: Path | None
    preprocessing: Any
    inferer: Any
    labels: dict[str, int] = field(default_factory=dict)
    spatial_dims: int = 3
    in_channels: int | None = None
    description: str = ""
    train_preprocessing: Any = None
    loss: Any = None
    learning_rate: float | None = None

    @classmethod
    def from_bundle(
        cls, root: str | os.PathLike, device: str | torch.device = "cpu", name: str | None = None
    ) -> BundleRuntime:
        """Read a monai_peft bundle folder.

        ``configs/inference.json`` must define ``preprocessing``, ``inferer`` and either ``base_network`` (the base
        without adapters; monai_peft bundles do) or a ``network`` that is a :class:`~monai_peft.PeftModel`;
        ``adapter_dir`` names its adapter. Keys are parsed with ``bundle_root`` set to ``root`` and ``device`` to
        ``device``. ``name`` (default: the folder's name as given, before resolving links) names the model.

        Raises:
            ConfigError: the folder is not a bundle or lacks one of the keys (the message names the file).
        """
        from monai.bundle import ConfigParser

        name = name or Path(root).name
        root = Path(root).expanduser().resolve()
        cfg_file = root / "configs" / "inference.json"
        if not cfg_file.is_file():
            raise ConfigError(
                f"{root} is not a MONAI bundle: it has no configs/inference.json. Link or copy a monai_peft bundle "
                "(e.g. bundles/brats_mri_swinunetr_lora) to <app>/model/<name>, or give its full path"
            )
        parser = ConfigParser()
        parser.read_config(str(cfg_file))
        meta_file = root / "configs" / "metadata.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        parser["bundle_root"] = str(root)
        parser["device"] = f"$torch.device({str(device)!r})"
        for key in ("preprocessing", "inferer"):
            if key not in parser:
                raise ConfigError(
                    f"{cfg_file} has no '{key}'; a bundle served by monai_peft's MONAI Label app needs it"
                )
        if "base_network" not in parser and "network" not in parser:
            raise ConfigError(f"{cfg_file} has neither 'base_network' nor 'network'")
        preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
        inferer = parser.get_parsed_content("inferer", instantiate=True)
        adapter_dir = Path(parser.get_parsed_content("adapter_dir")) if "adapter_dir" in parser else None
        lock = threading.Lock()

        def build_base() -> nn.Module:
            with lock:  # ConfigParser caches parsed items: reset so every call builds a new network
                p = ConfigParser()
                p.read_config(str(cfg_file))
                p["bundle_root"] = str(root)
                p["device"] = "$torch.device('cpu')"
                if "base_network" in p:
                    net = p.get_parsed_content("base_network", instantiate=True)
                else:
                    net = p.get_parsed_content("network", instantiate=True)
                    if not isinstance(net, PeftModel):
                        raise ConfigError(
                            f"{cfg_file}: 'network' is a {type(net).__name__}, not a monai_peft PeftModel, and there is "
                            "no 'base_network'; serve it with MONAI Label's own monaibundle app instead"
                        )
                    net = net.unload()
            if not isinstance(net, nn.Module):
                raise ConfigError(f"{cfg_file}: the base network is a {type(net).__name__}, not an nn.Module")
            return net.float().cpu().eval()

        net_def = parser.get("network_def") or {}
        spatial_dims = int(net_def.get("spatial_dims", 3)) if isinstance(net_def, dict) else 3
        in_channels = net_def.get("in_channels") if isinstance(net_def, dict) else None
        in_channels = int(in_channels) if isinstance(in_channels, int) else None
        runtime = cls(
            root=root,
            name=name,
            build_base=build_base,
            adapter_dir=adapter_dir,
            preprocessing=preprocessing,
            inferer=inferer,
            labels=_labels_from_metadata(meta),
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            description=str(meta.get("description") or meta.get("name") or root.name),
        )
        train_file = root / "configs" / "train.json"
        if train_file.is_file():
            tp = ConfigParser()
            tp.read_config(str(train_file))
            tp["bundle_root"] = str(root)
            tp["device"] = f"$torch.device({str(device)!r})"
            try:
                if "train#preprocessing" in tp:
                    runtime.train_preprocessing = tp.get_parsed_content("train#preprocessing", instantiate=True)
                if "loss" in tp:
                    runtime.loss = tp.get_parsed_content("loss", instantiate=True)
                if "learning_rate" in tp:
                    runtime.learning_rate = float(tp.get_parsed_content("learning_rate"))
            except Exception as exc:  # training is optional: serving still works
                logger.warning("bundle %s: cannot read the training parts of %s (%s)", root.name, train_file, exc)
        return runtime


# ----------------------------------------------------------------------------------------------
# the multi-adapter server
# ----------------------------------------------------------------------------------------------
@dataclass
class _Served:
    name: str
    source: Path
    internal: str
    current: AdapterVersion
    pointer_state: tuple[int, int] | None = None
    failed_state: tuple[int, int] | None = None
    last_error: str = ""


def _sha(path: Path) -> str:
    return file_sha256(path / ADAPTER_WEIGHTS_NAME)


class MultiAdapterServer:
    """One base network, several named adapters, one lock around switch + inference.

    Args:
        base_network: the base network (wrapped in a :class:`~monai_peft.PeftModel`; its weights are frozen).
        preprocessing: invertible transform ``{"image": path} -> {"image": (C, *spatial)}`` (a bundle's).
        inferer: ``inferer(x, network) -> logits``; ``x`` is ``(1, C, *spatial)``.
        adapters: ``{model name: adapter folder}``.
        store: versioned store where training publishes new versions (None: versions are never refreshed).
        device: device of the network and the inference.
        spatial_dims: 2 or 3 (a mismatching image is refused with a clear error).
        in_channels: channels the network takes (checked when known).

    Raises:
        CheckpointError / BaseModelMismatchError: an adapter folder is missing, corrupt or was trained on another
            base; the message names the folder. Raised at construction (server start-up).
    """

    def __init__(
        self,
        base_network: nn.Module,
        preprocessing: Any,
        inferer: Any,
        adapters: Mapping[str, str | os.PathLike],
        store: AdapterStore | None = None,
        device: str | torch.device = "cpu",
        spatial_dims: int = 3,
        in_channels: int | None = None,
    ) -> None:
        if not adapters:
            raise ConfigError("MultiAdapterServer needs at least one adapter {name: folder}")
        self.device = torch.device(device)
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.store = store
        self.spatial_dims = int(spatial_dims)
        self.in_channels = in_channels
        self.lock = threading.RLock()
        self.peft = PeftModel(base_network.to(self.device).eval(), None)
        self._served: dict[str, _Served] = {}
        self.switches = 0
        for name, folder in adapters.items():
            self._register(_check_name(name), Path(folder))

    # -- adapters -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._served)

    def version(self, name: str) -> AdapterVersion:
        return self._get(name).current

    def _get(self, name: str) -> _Served:
        served = self._served.get(name)
        if served is None:
            raise KeyError(f"no adapter model {name!r}; served: {self.names}")
        return served

    def _load(self, folder: Path, internal: str) -> None:
        """Load ``folder`` as adapter ``internal`` (strict base check); wraps errors with the file's name."""
        if not (folder / CONFIG_NAME).is_file():
            raise CheckpointError(
                f"adapter folder {folder} has no {CONFIG_NAME}: give the folder written by save_adapter() "
                f"(it holds {CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})"
            )
        try:
            self.peft.load_adapter(folder, internal, is_trainable=False, verify_base="strict")
        except CheckpointError as exc:
            msg = str(exc)
            if str(folder) not in msg:
                msg = f"adapter {folder}: {msg}"
            raise type(exc)(msg) from exc

    def _register(self, name: str, source: Path) -> None:
        """Serve the newest loadable version of ``name``: the store's current one, else older published versions,
        else the configured folder ``source``. A published version that fails is logged and skipped; the
        configured folder failing (missing, corrupt, another base) raises, naming it."""
        state = self.store.pointer_state(name) if self.store is not None else None
        candidates: list[tuple[int, Path]] = []
        failed = None
        if self.store is not None:
            try:
                cur = self.store.current(name)
            except CheckpointError as exc:
                logger.error("adapter model %s: %s", name, exc)
                cur, failed = None, state
            if cur is not None:
                candidates.append(cur)
            candidates += [
                (v, self.store.folder(name) / f"v{v:04d}")
                for v in reversed(self.store.versions(name))
                if cur is None or v < cur[0]
            ]
        for version, folder in candidates:
            internal = f"{name}__v{version}"
            try:
                self._load(folder, internal)
            except Exception as exc:
                logger.error(
                    "adapter model %s: published version %d at %s refused (%s: %s); trying an older one",
                    name, version, folder, type(exc).__name__, exc,
                )  # fmt: skip
                if internal in self.peft.peft_config:
                    self.peft.delete_adapter(internal)
                failed = state
                continue
            break
        else:
            version, folder, internal = 0, source, f"{name}__v0"
            self._load(source, internal)
        self._served[name] = _Served(name, source, internal, AdapterVersion(version, folder, _sha(folder)), state)
        if failed is not None:
            self._served[name].last_error = "a published version could not be loaded (see the log)"
        logger.info("adapter model %s: serving version %d from %s", name, version, folder)

    def refresh(self, name: str) -> bool:
        """Load a newer version of ``name`` if the store's pointer changed; True when a new version is served.

        A version that cannot be loaded is logged (once per pointer change) and the current one keeps serving.
        """
        served = self._get(name)
        if self.store is None:
            return False
        state = self.store.pointer_state(name)
        if state is None or state == served.pointer_state or state == served.failed_state:
            return False
        with self.lock:
            try:
                cur = self.store.current(name)
                if cur is None or cur[0] == served.current.version:
                    served.pointer_state = state
                    return False
                version, folder = cur
                internal = f"{name}__v{version}"
                if internal in self.peft.peft_config:
                    self.peft.delete_adapter(internal)
                self._load(folder, internal)
            except Exception as exc:
                served.failed_state = state
                served.last_error = f"{type(exc).__name__}: {exc}"
                logger.error(
                    "adapter model %s: new version from %s refused (%s); still serving version %d",
                    name,
                    self.store.pointer(name),
                    served.last_error,
                    served.current.version,
                )
                return False
            old = served.internal
            served.internal = internal
            served.current = AdapterVersion(version, folder, _sha(folder))
            served.pointer_state = state
            served.failed_state = None
            served.last_error = ""
            if old != internal and old in self.peft.peft_config:
                self.peft.delete_adapter(old)
            logger.info("adapter model %s: now serving version %d from %s", name, version, folder)
            return True

    # -- inference ------------------------------------------------------------------------------
    def _check_image(self, image: torch.Tensor, source: str) -> None:
        spatial = tuple(image.shape[1:])
        if image.ndim != self.spatial_dims + 1:
            raise InputDataError(
                f"{source}: the model is {self.spatial_dims}D and the image has spatial shape {spatial} "
                f"(channel-first {tuple(image.shape)}); send a {self.spatial_dims}D image"
            )
        if self.in_channels is not None and image.shape[0] != self.in_channels:
            raise InputDataError(
                f"{source}: the model takes {self.in_channels} channels and the image has {image.shape[0]}; send one "
                f"image with {self.in_channels} channels (e.g. a 4D NIfTI X x Y x Z x {self.in_channels})"
            )

    def preprocess(self, image_path: str | os.PathLike) -> dict[str, Any]:
        """``{"image": path}`` through the preprocessing; errors become :class:`InputDataError` naming the file."""
        source = str(image_path)
        try:
            data = self.preprocessing({"image": source})
        except InputDataError:
            raise
        except Exception as exc:  # MONAI wraps transform errors in RuntimeError; unwrap our own
            cause: BaseException | None = exc
            while cause is not None:
                if isinstance(cause, InputDataError):
                    raise InputDataError(str(cause)) from exc
                cause = cause.__cause__
            raise InputDataError(
                f"cannot read {source} as an image for this model ({type(exc).__name__}: {exc}). Send a NIfTI / "
                "DICOM / NRRD volume"
            ) from exc
        self._check_image(data["image"], source)
        return data

    @contextlib.contextmanager
    def activated(self, name: str):
        """Context holding the lock with adapter ``name`` active (newest published version); yields the model."""
        self.refresh(name)
        with self.lock:
            served = self._get(name)
            if self.peft.active_adapter != served.internal:
                self.peft.set_adapter(served.internal)
                self.switches += 1
            self.peft.eval()
            yield self.peft

    def predict(self, name: str, image: torch.Tensor) -> tuple[torch.Tensor, AdapterVersion]:
        """Logits ``(1, K, *spatial)`` of adapter ``name`` for a preprocessed image ``(C, *spatial)``.

        The adapter switch and the inference run under one lock. Returns the logits and the version used.
        """
        x = image[None].to(self.device)
        with self.activated(name) as model, torch.no_grad():
            version = self._get(name).current
            out = self.inferer(x, model)
        return out, version

    def segment(self, name: str, image_path: str | os.PathLike) -> tuple[Any, AdapterVersion, dict[str, Any]]:
        """Label map ``(1, *loaded_spatial)`` of adapter ``name`` for an image file, on the file's grid.

        Preprocessing and the inversion run outside the lock (they do not touch the network).
        """
        from monai_peft.inference import InvertToOriginald

        self._get(name)
        t0 = time.perf_counter()
        data = self.preprocess(image_path)
        t1 = time.perf_counter()
        logits, version = self.predict(name, data["image"])
        t2 = time.perf_counter()
        data["pred"] = logits[0].argmax(0, keepdim=True).to(torch.uint8).cpu()
        data["image"] = data["image"].cpu() if hasattr(data["image"], "cpu") else data["image"]
        data = InvertToOriginald("pred", self.preprocessing, orig_key="image", nearest_interp=True)(data)
        t3 = time.perf_counter()
        data["latencies"] = {"pre": round(t1 - t0, 3), "infer": round(t2 - t1, 3), "invert": round(t3 - t2, 3)}
        return data["pred"], version, data


def adapter_folder_ok(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a complete adapter (both files, consistent)."""
    try:
        read_adapter_folder(folder)
    except CheckpointError:
        return False
    return True
