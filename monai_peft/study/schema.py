"""The study file: a declarative grid of backbones x methods x training budgets x seeds (YAML or JSON).

A study file is a mapping with these keys (``*`` = required; every other key has the default shown)::

    name: my_study                     # * free text; part of the study's identity (config hash)
    task: classification               # classification; "generation" files: monai_peft.study.generation_schema
    dataset:                           # * where the images are (one of the kinds below)
      kind: medmnist                   #   medmnist | folder | csv | segmentation_datalist
      path: ../shared/data/medmnist/pneumoniamnist_28.npz   # medmnist: the .npz (or flag + root)
      flag: null                       #   medmnist: e.g. pneumoniamnist -> <root>/pneumoniamnist.npz
      root: null                       #   medmnist: folder of MedMNIST files (default $MEDMNIST_ROOT/~/.medmnist)
      size: 28                         #   medmnist: file size used with flag
      channels: 1                      #   1 = grayscale, 3 = RGB (grayscale repeated)
      extensions: [.png, .jpg, .jpeg, .bmp, .tif, .tiff, .npy]   # folder: files that count as images
      image_column: image              #   csv: column with image paths (relative to the CSV's folder)
      label_column: label              #   csv: column with class names or ids
      split_column: split              #   csv: column with train / val / test
      datalist: null                   #   segmentation_datalist: the datalist inline (paths relative to root:)
      spacing: null                    #   segmentation_datalist: resample to this voxel size in mm, e.g. [3, 3, 3]
      roi_size: null                   #   segmentation_datalist: training patch = sliding-window size, e.g. [64, 64, 64]
      num_classes: null                #   segmentation_datalist: label values 0..num_classes-1 (0 = background)
      class_names: null                #   segmentation_datalist: a name per label value (tables)
      modalities: null                 #   segmentation_datalist: a name per channel (messages)
      samples_per_case: null           #   segmentation_datalist: random patches per training case per epoch (1)
    image_size: 64                     # images are resized to image_size x image_size
    backbones:                         # * one or more
      - name: efficientnet_lite0       #   monai_peft.networks.list_backbones() name, or monai:<Net> (from scratch)
        source: null                   #   weights (path / URL / hf:// / pkg://) when the backbone needs them
        label: null                    #   name in tables (default: name)
        kwargs: {}                     #   passed to the backbone loader / MONAI network
        mean: 0.5                      #   input normalisation: (x - mean) / std on images in [0, 1]
        std: 0.5
        image_size: null               #   this backbone's input size (default: the study's image_size)
        channels: null                 #   this backbone's input channels: gray repeated to 3 / RGB to gray
    methods:                           # * one or more
      - name: lora                     #   monai_peft.list_methods() name
        label: null                    #   name in tables (default: name); labels must be unique
        kwargs: {r: 4, alpha: 8}       #   config fields: monai_peft.get_config(name, **kwargs)
        preset: null                   #   a paper preset, when monai_peft.get_config supports preset=
        backbones: []                  #   backbone labels this method runs on (default []: every backbone)
        lr_range: null                 #   [low, high]: this method's learning-rate search range (default: lr_search's)
    budgets:                           # * at least one fraction or K
      fractions: [0.01, 0.1, 1.0]      #   per-class fractions of the training split
      k_shots: [1, 5, 10]              #   K images of every class
      min_per_class: 0                 #   a fraction keeps at least this many images per class
      k_shot_methods: null             #   method labels of the K-shot arm (default null: every method)
    seeds: [0, 1, 2]                   # * data subset, initialisation and shuffling per seed
    training:
      epochs: 10
      min_steps: null                  #   small budgets train longer: at least this many optimiser steps
      batch_size: 32
      eval_batch_size: 256
      weight_decay: 0.0001
      hflip: true                      #   random horizontal flips during training
      device: cpu                      #   cpu | cuda | cuda:N (not part of the config hash)
      num_threads: 1                   #   torch threads per cell process (not part of the config hash)
    lr_search:                         # learning rate per (backbone, method, budget) on the VALIDATION split
      low: 0.0001
      high: 0.01
      n_trials: 4                      #   trials; low == high fixes the learning rate (no search)
      epochs: null                     #   epochs per trial (default training.epochs)
      seed: 0                          #   Optuna TPE sampler seed
      sampler: tpe                     #   tpe | grid (n_trials rates log-evenly over [low, high], in order)
      data_seed: null                  #   training subset used for tuning (default: the first seed)
      n_startup_trials: 2              #   MedianPruner: trials never pruned
      n_warmup_steps: 1                #   MedianPruner: epochs before pruning starts
    metrics:
      bootstrap: 1000                  #   bootstrap resamples of the test split for the 95 % CI
      bootstrap_seed: 0

Relative paths are relative to the current folder; ``${VAR}`` and ``${VAR:-default}`` are expanded from the
environment (e.g. ``${MONAI_PEFT_SHARED_DATA:-../shared/data}``). Unknown keys are errors that name the valid
ones. ``segmentation_datalist`` (a MONAI datalist of 3D images and label maps, ``task: segmentation``, reported
with Dice) is described in :mod:`monai_peft.study.seg_data`; there ``channels`` is the number of modalities.

:func:`load_study` reads and validates a file; :func:`study_from_dict` validates a mapping;
:meth:`StudySpec.config_hash` identifies the study (results folders are tied to it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_peft.errors import ConfigError

__all__ = [
    "BackboneSpec",
    "BudgetSpec",
    "DATASET_KINDS",
    "DatasetSpec",
    "LRSearchSpec",
    "MethodSpec",
    "MetricsSpec",
    "StudySpec",
    "TrainingSpec",
    "load_study",
    "packaged_studies",
    "read_study_file",
    "resolve_study_path",
    "study_from_dict",
]

DATASET_KINDS = ("medmnist", "folder", "csv", "segmentation_datalist")
TASKS = ("classification", "segmentation")
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")
#: Fields that change how a study runs but not what it computes: left out of the config hash.
_EXECUTION_ONLY = {("training", "device"), ("training", "num_threads")}


@dataclass(frozen=True)
class DatasetSpec:
    """Where the images and labels are; see the module docstring for the keys of each ``kind``."""

    kind: str
    path: str | None = None
    flag: str | None = None
    root: str | None = None
    size: int = 28
    channels: int = 1
    extensions: tuple[str, ...] = _IMAGE_EXTENSIONS
    image_column: str = "image"
    label_column: str = "label"
    split_column: str = "split"
    # segmentation_datalist only (None elsewhere; see monai_peft.study.seg_data)
    datalist: Any = None
    spacing: tuple[float, ...] | None = None
    roi_size: tuple[int, ...] | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    modalities: tuple[str, ...] | None = None
    samples_per_case: int | None = None

    def validate(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise ConfigError(f"unknown dataset kind {self.kind!r}; valid kinds: {', '.join(DATASET_KINDS)}.")
        if self.kind == "segmentation_datalist":
            from monai_peft.study.seg_data import validate_seg_dataset

            return validate_seg_dataset(self)
        if self.channels not in (1, 3):
            raise ConfigError(f"dataset.channels must be 1 (grayscale) or 3 (RGB), got {self.channels}.")
        if self.kind == "medmnist" and not self.path and not self.flag:
            raise ConfigError("a medmnist dataset needs path: (the .npz file) or flag: (e.g. pneumoniamnist).")
        if self.kind in ("folder", "csv") and not self.path:
            raise ConfigError(
                f"a {self.kind} dataset needs path: "
                + (
                    "(a folder with train/, val/, test/ subfolders of class folders)."
                    if self.kind == "folder"
                    else "(the CSV file)."
                )
            )


@dataclass(frozen=True)
class BackboneSpec:
    """One pretrained network (``monai_peft.networks`` registry name) or ``monai:<Net>`` built from scratch."""

    name: str
    source: str | None = None
    label: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: float = 0.5
    std: float = 0.5
    image_size: int | None = None
    channels: int | None = None

    @property
    def key(self) -> str:
        """Name in tables and file names: ``label``, else ``name`` with ``:`` -> ``-`` (``monai-DenseNet121``)."""
        return self.label or self.name.replace(":", "-")

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("every backbone needs a name.")
        if not self.std > 0:
            raise ConfigError(f"backbone {self.key!r}: std must be > 0, got {self.std}.")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            raise ConfigError(
                f"backbone {self.key!r}: image_size must be an integer >= 8 or null, got {self.image_size!r}."
            )
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"backbone {self.key!r}: channels must be 1, 3 or null, got {self.channels!r}.")


@dataclass(frozen=True)
class MethodSpec:
    """One PEFT method: a ``monai_peft.get_config`` name with its config fields."""

    name: str
    label: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    backbones: tuple[str, ...] = ()
    lr_range: tuple[float, ...] | None = None

    @property
    def key(self) -> str:
        return self.label or self.name

    def runs_on(self, backbone: str) -> bool:
        """Whether this method is part of the grid on ``backbone`` (a backbone key); empty ``backbones``: all."""
        return not self.backbones or backbone in self.backbones

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("every method needs a name.")
        if self.lr_range is not None:
            ok = len(self.lr_range) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in self.lr_range
            )
            if not ok or not 0 < self.lr_range[0] <= self.lr_range[1]:
                raise ConfigError(
                    f"method {self.key!r}: lr_range must be [low, high] with 0 < low <= high, got {list(self.lr_range)}."
                )


@dataclass(frozen=True)
class BudgetSpec:
    """Training-set sizes: per-class fractions and/or K images per class."""

    fractions: tuple[float, ...] = ()
    k_shots: tuple[int, ...] = ()
    min_per_class: int = 0
    k_shot_methods: tuple[str, ...] | None = None

    def applies(self, budget: str, method: str) -> bool:
        """Whether ``method`` (a method key) runs with ``budget`` (``f<fraction>`` / ``k<K>``)."""
        return not budget.startswith("k") or self.k_shot_methods is None or method in self.k_shot_methods

    def validate(self) -> None:
        if not self.fractions and not self.k_shots:
            raise ConfigError("budgets needs at least one of fractions: [...] or k_shots: [...].")
        for f in self.fractions:
            if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 < float(f) <= 1.0:
                raise ConfigError(f"budgets.fractions must lie in (0, 1] (e.g. 0.01 for 1 %), got {f!r}.")
        for k in self.k_shots:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ConfigError(f"budgets.k_shots must be integers >= 1, got {k!r}.")
        if len(set(self.fractions)) != len(self.fractions) or len(set(self.k_shots)) != len(self.k_shots):
            raise ConfigError("budgets lists must not repeat a value.")
        if not isinstance(self.min_per_class, int) or self.min_per_class < 0:
            raise ConfigError(f"budgets.min_per_class must be an integer >= 0, got {self.min_per_class!r}.")


@dataclass(frozen=True)
class TrainingSpec:
    """Training of every cell (AdamW, cosine schedule, best epoch chosen on validation AUROC)."""

    epochs: int = 10
    min_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 256
    weight_decay: float = 1e-4
    hflip: bool = True
    device: str = "cpu"
    num_threads: int = 1

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "num_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"training.{name} must be an integer >= 1, got {value!r}.")
        if self.min_steps is not None and (
            not isinstance(self.min_steps, int) or isinstance(self.min_steps, bool) or self.min_steps < 1
        ):
            raise ConfigError(f"training.min_steps must be an integer >= 1 or null, got {self.min_steps!r}.")
        if self.weight_decay < 0:
            raise ConfigError(f"training.weight_decay must be >= 0, got {self.weight_decay}.")
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", str(self.device)):
            raise ConfigError(f"training.device must be cpu, cuda, cuda:N or mps, got {self.device!r}.")


@dataclass(frozen=True)
class LRSearchSpec:
    """Learning-rate search per (backbone, method, budget): Optuna TPE + MedianPruner on validation AUROC."""

    low: float = 1e-4
    high: float = 1e-2
    n_trials: int = 4
    epochs: int | None = None
    seed: int = 0
    data_seed: int | None = None
    n_startup_trials: int = 2
    n_warmup_steps: int = 1
    sampler: str = "tpe"

    def validate(self) -> None:
        if self.sampler not in ("tpe", "grid"):
            raise ConfigError(f"lr_search.sampler must be 'tpe' or 'grid', got {self.sampler!r}.")
        if not (self.low > 0 and self.high >= self.low):
            raise ConfigError(f"lr_search needs 0 < low <= high, got low={self.low}, high={self.high}.")
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ConfigError(f"lr_search.n_trials must be an integer >= 1, got {self.n_trials!r}.")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ConfigError(f"lr_search.epochs must be an integer >= 1 or null, got {self.epochs!r}.")
        if self.n_startup_trials < 0 or self.n_warmup_steps < 0:
            raise ConfigError("lr_search.n_startup_trials and n_warmup_steps must be >= 0.")


@dataclass(frozen=True)
class MetricsSpec:
    """Test metrics: bootstrap resamples for the 95 % confidence interval."""

    bootstrap: int = 1000
    bootstrap_seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.bootstrap, int) or self.bootstrap < 10:
            raise ConfigError(f"metrics.bootstrap must be an integer >= 10, got {self.bootstrap!r}.")


@dataclass(frozen=True)
class StudySpec:
    """A validated study (see the module docstring). Build it with :func:`load_study` / :func:`study_from_dict`."""

    name: str
    dataset: DatasetSpec
    backbones: tuple[BackboneSpec, ...]
    methods: tuple[MethodSpec, ...]
    budgets: BudgetSpec
    seeds: tuple[int, ...]
    task: str = "classification"
    image_size: int = 64
    training: TrainingSpec = field(default_factory=TrainingSpec)
    lr_search: LRSearchSpec = field(default_factory=LRSearchSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)

    def validate(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("the study needs a name: (free text).")
        if self.task not in TASKS:
            raise ConfigError(
                f"unknown task {self.task!r}; this schema runs: {', '.join(TASKS)} (task: generation files are read "
                "by monai_peft.study.generation_schema; monai-peft study dispatches on the task)."
            )
        if (self.task == "segmentation") != (self.dataset.kind == "segmentation_datalist"):
            raise ConfigError(
                "task: segmentation goes with dataset kind segmentation_datalist (and that kind with that task); "
                f"got task {self.task!r} with dataset kind {self.dataset.kind!r}."
            )
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ConfigError(f"image_size must be an integer >= 8, got {self.image_size!r}.")
        if not self.backbones:
            raise ConfigError("backbones: needs at least one backbone.")
        if not self.methods:
            raise ConfigError("methods: needs at least one method.")
        if not self.seeds:
            raise ConfigError("seeds: needs at least one seed, e.g. [0, 1, 2].")
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds) or len(
            set(self.seeds)
        ) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct integers >= 0, got {list(self.seeds)}.")
        for what, items in (("backbone", self.backbones), ("method", self.methods)):
            keys = [i.key for i in items]
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            if dupes:
                raise ConfigError(
                    f"{what} labels must be unique; repeated: {dupes} (give each entry a distinct label:)."
                )
            for k in keys:
                if not re.fullmatch(r"[A-Za-z0-9_.+-]+", k):
                    raise ConfigError(f"{what} label {k!r} may only hold letters, digits and _ . + - (it names files).")
        backbone_keys = [b.key for b in self.backbones]
        method_keys = [m.key for m in self.methods]
        for m in self.methods:
            unknown = [b for b in m.backbones if b not in backbone_keys]
            if unknown:
                raise ConfigError(
                    f"method {m.key!r} lists backbones {unknown} that are not in the study; backbones: {backbone_keys}."
                )
        if self.budgets.k_shot_methods is not None:
            unknown = [k for k in self.budgets.k_shot_methods if k not in method_keys]
            if unknown:
                raise ConfigError(
                    f"budgets.k_shot_methods lists {unknown}, which are not method labels of the study; methods: "
                    f"{method_keys}."
                )
            if not self.budgets.k_shots:
                raise ConfigError("budgets.k_shot_methods is set but budgets.k_shots is empty; add k_shots: [...].")
        for part in (
            self.dataset,
            *self.backbones,
            *self.methods,
            self.budgets,
            self.training,
            self.lr_search,
            self.metrics,
        ):
            part.validate()

    def input_size(self, backbone: BackboneSpec) -> int:
        """Input size of ``backbone``: its own ``image_size``, else the study's."""
        return backbone.image_size or self.image_size

    @property
    def tune_seed(self) -> int:
        """Seed of the training subset used by the learning-rate search."""
        return self.seeds[0] if self.lr_search.data_seed is None else self.lr_search.data_seed

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping with every default filled in (round-trips through :func:`study_from_dict`)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def lr_range(self, method: str) -> tuple[float, float]:
        """``(low, high)`` of the learning-rate search of method label ``method``: its ``lr_range``, else the
        study's ``lr_search.low`` / ``high``; ``low == high`` fixes the learning rate."""
        spec = next(m for m in self.methods if m.key == method)
        if spec.lr_range is not None:
            return float(spec.lr_range[0]), float(spec.lr_range[1])
        return self.lr_search.low, self.lr_search.high

    def config_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the canonical JSON of the study, without execution-only fields."""
        data = self.to_dict()
        for section, key in _EXECUTION_ONLY:
            data.get(section, {}).pop(key, None)
        # keys added after the first release leave the hash of studies that do not use them unchanged
        if data["training"].get("min_steps") is None:
            data["training"].pop("min_steps", None)
        if data["lr_search"].get("sampler") == "tpe":
            data["lr_search"].pop("sampler", None)
        if data["budgets"].get("k_shot_methods") is None:
            data["budgets"].pop("k_shot_methods", None)
        for key in ("datalist", "spacing", "roi_size", "num_classes", "class_names", "modalities", "samples_per_case"):
            if data["dataset"].get(key) is None:
                data["dataset"].pop(key, None)
        for m in data["methods"]:
            for key in ("backbones", "lr_range"):
                if not m.get(key):
                    m.pop(key, None)
        for b in data["backbones"]:
            for key in ("image_size", "channels"):
                if b.get(key) is None:
                    b.pop(key, None)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- parsing ------------------------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(text: str) -> str:
    def repl(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            if m.group(2) is None:
                raise ConfigError(
                    f"environment variable {m.group(1)} is not set (used as ${{{m.group(1)}}}); set it or write ${{{m.group(1)}:-default}}."
                )
            return m.group(2)
        return value

    return _ENV.sub(repl, text)


def _coerce(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types name the valid keys."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where} must be a mapping with keys {[f.name for f in dataclasses.fields(cls)]}, got {type(data).__name__}."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}.")
    required = [
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{where} is missing required key(s) {missing}.")
    values = {}
    for key, value in data.items():
        ftype = str(fields[key].type)
        if value is not None and "tuple" in ftype and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}.{key} must be a list, got {value!r}.")
        if "tuple" in ftype and value is not None:
            value = tuple(value)
        if ftype.startswith("dict") and not isinstance(value, dict):
            raise ConfigError(f"{where}.{key} must be a mapping, got {value!r}.")
        if ftype in ("int", "int | None") and isinstance(value, float) and value.is_integer():
            value = int(value)
        if ftype in ("float",) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if ftype == "float" and (not isinstance(value, float) or not math.isfinite(value)):
            raise ConfigError(f"{where}.{key} must be a number, got {value!r}.")
        if ftype.startswith("str") and value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string, got {value!r}.")
        if ftype.startswith("str") and isinstance(value, str):
            value = _expand(value)
        values[key] = value
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - guarded above
        raise ConfigError(f"{where}: {exc}") from exc


def study_from_dict(data: dict[str, Any]) -> StudySpec:
    """Validate a study mapping (as read from YAML/JSON) and return the :class:`StudySpec`.

    Raises:
        ConfigError: unknown keys, missing keys, wrong types or values (the message says which and what is valid).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a study file must hold a mapping at the top level, got {type(data).__name__}.")
    top = {f.name for f in dataclasses.fields(StudySpec)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in the study; valid keys: {sorted(top)}.")
    missing = [k for k in ("name", "dataset", "backbones", "methods", "budgets", "seeds") if k not in data]
    if missing:
        raise ConfigError(f"the study is missing required key(s) {missing}; see docs/study.md for the schema.")

    def listed(key: str) -> list:
        value = data[key]
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}.")
        return list(value)

    def entry(cls: type, item: Any, where: str) -> Any:
        return _coerce(cls, {"name": item} if isinstance(item, str) else item, where)

    spec = StudySpec(
        name=str(data["name"]),
        task=str(data.get("task", "classification")),
        dataset=_coerce(DatasetSpec, data["dataset"], "dataset"),
        backbones=tuple(entry(BackboneSpec, b, f"backbones[{i}]") for i, b in enumerate(listed("backbones"))),
        methods=tuple(entry(MethodSpec, m, f"methods[{i}]") for i, m in enumerate(listed("methods"))),
        budgets=_coerce(BudgetSpec, data["budgets"], "budgets"),
        seeds=tuple(listed("seeds")),
        image_size=data.get("image_size", 64),
        training=_coerce(TrainingSpec, data.get("training", {}), "training"),
        lr_search=_coerce(LRSearchSpec, data.get("lr_search", {}), "lr_search"),
        metrics=_coerce(MetricsSpec, data.get("metrics", {}), "metrics"),
    )
    spec.validate()
    return spec


def packaged_studies() -> dict[str, Path]:
    """Study files shipped with the package (``monai_peft/resources/studies/*.yaml``), by name."""
    folder = Path(__file__).resolve().parents[1] / "resources" / "studies"
    return {p.stem: p for p in sorted(folder.glob("*.y*ml"))} if folder.is_dir() else {}


def resolve_study_path(config: str | os.PathLike) -> Path:
    """A study file path, or the name of a packaged study (e.g. ``quick_pneumoniamnist``)."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = packaged_studies()
    if str(config) in shipped:
        return shipped[str(config)]
    raise ConfigError(
        f"study file {str(config)!r} does not exist and is not a packaged study; packaged studies: "
        f"{', '.join(shipped) or 'none'}."
    )


def load_study(config: str | os.PathLike) -> StudySpec:
    """Read and validate a study file (``.yaml``/``.yml`` with PyYAML, or ``.json``), or a packaged study name."""
    return study_from_dict(read_study_file(config))


def read_study_file(config: str | os.PathLike) -> Any:
    """The raw mapping of a study file or packaged study name (``task: generation`` files are read here too)."""
    path = resolve_study_path(config)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    else:
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - PyYAML ships with the study extra
            raise ConfigError(
                "reading YAML study files needs PyYAML (pip install pyyaml), or write the study as JSON."
            ) from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return data
