"""Build the classifier and the PEFT model of a study cell.

Backbones (``backbones[i].name``):

* ``efficientnet_lite0`` - ImageNet EfficientNet-Lite0 (:func:`monai_peft.networks.load_backbone`) with a fresh
  ``_fc`` for the study's classes; input channels and ``image_size`` follow the study.
* ``vit_b16_in21k``, ``vit_b16_mae``, ``mrm``, ``cxr_mae`` - ViT-B/16 checkpoints (``source:`` required) with a
  fresh head; ``img_size`` / ``in_channels`` follow the study.
* ``mae_vit`` - a ViT pretrained with ``monai-peft pretrain`` (``source:`` its ``--out`` folder;
  :func:`monai_peft.pretrain.load_mae_vit`): MAE fine-tuning protocol (mean-pooled patch tokens, fresh ``fc_norm``
  and head); position embeddings resampled when ``image_size`` differs from the pretraining size.
* ``litemedsam_encoder`` - LiteMedSAM's TinyViT encoder (fixed 256 x 256, 3 channels) with an average-pooled
  linear head on its neck map (:class:`~monai_peft.networks.heads.ClassificationModel`).
* ``monai:<Net>`` - a network of ``monai.networks.nets`` built **from scratch** with
  ``spatial_dims=2, in_channels, out_channels`` plus ``kwargs`` (e.g. ``monai:DenseNet121``; a from-scratch
  baseline, or a tiny network for tests).

The trainable head is found with the network's targeting preset (role ``head``) and trained with every method
(``modules_to_save``) except those that already train it (``full_finetune``, ``linear_probe``, ``partial``).
Methods that have the ``batchnorm_stats`` field default to ``"freeze"`` when the network has BatchNorm layers
outside its head (pretrained BatchNorm statistics kept; with few images updating them makes train and eval
behaviour diverge, see :mod:`monai_peft.demo`) and to ``"save"`` otherwise: a fresh head's own BatchNorm (e.g.
``mae_vit`` with ``head_norm: batchnorm``) has no pretrained statistics and must learn them.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from torch import nn

from monai_peft.errors import ConfigError, MethodNotApplicableError, MonaiPeftError
from monai_peft.study.schema import BackboneSpec, MethodSpec, StudySpec

__all__ = [
    "build_classifier",
    "build_peft_model",
    "check_backbone_methods",
    "default_batchnorm_stats",
    "method_config",
    "study_backbones",
]

_HEAD_TRAINED_BY_METHOD = ("full_finetune", "linear_probe", "partial")
_VITS = ("vit_b16_in21k", "vit_b16_mae", "mrm", "cxr_mae", "mae_vit")
_CLASSIFIERS = ("efficientnet_lite0", "litemedsam_encoder", *_VITS)


def study_backbones() -> list[str]:
    """Backbone names a classification study accepts (``monai:<Net>`` also works for any MONAI network)."""
    import monai_peft.pretrain  # noqa: F401  (registers the backbone mae_vit)
    from monai_peft.networks import list_backbones

    return [n for n in list_backbones() if n in _CLASSIFIERS] + ["monai:<Net> (from scratch, e.g. monai:DenseNet121)"]


def build_classifier(
    spec: BackboneSpec, num_classes: int, in_channels: int, image_size: int
) -> tuple[nn.Module, list[str]]:
    """The backbone with a ``num_classes`` head, and the names of its head modules.

    Returns:
        ``(network, head_module_names)``; the network maps ``(B, in_channels, image_size, image_size)`` to logits
        ``(B, num_classes)`` (or a tuple whose first item is the logits).
    """
    import monai_peft as mp
    from monai_peft.study.presets import register_study_presets

    register_study_presets()
    kwargs = dict(spec.kwargs)
    if spec.name == "mae_vit":
        import monai_peft.pretrain  # registers the backbone mae_vit
    if spec.name.startswith("monai:"):
        import monai.networks.nets as nets

        cls_name = spec.name.split(":", 1)[1]
        cls = getattr(nets, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"backbone {spec.name!r}: monai.networks.nets has no network {cls_name!r}.")
        params = inspect.signature(cls).parameters
        base = {"spatial_dims": 2, "in_channels": in_channels}
        base["out_channels" if "out_channels" in params else "num_classes"] = num_classes
        try:
            net = cls(**{**base, **kwargs})
        except Exception as exc:
            raise ConfigError(
                f"backbone {spec.name!r} could not be built with { ({**base, **kwargs}) }: {exc}"
            ) from exc
    elif spec.name == "efficientnet_lite0":
        from monai_peft.networks import load_backbone

        net = load_backbone(
            spec.name,
            spec.source,
            **{"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size, **kwargs},
        )
    elif spec.name in _VITS:
        from monai_peft.networks import load_backbone

        net = load_backbone(
            spec.name,
            spec.source,
            **{"in_channels": in_channels, "num_classes": num_classes, "img_size": image_size, **kwargs},
        )
    elif spec.name == "litemedsam_encoder":
        from monai_peft.networks import load_backbone
        from monai_peft.networks.heads import ClassificationHead, TinyViTFeatures

        if image_size != 256 or in_channels != 3:
            raise ConfigError(
                "backbone 'litemedsam_encoder' takes 256 x 256 RGB input: give it image_size: 256 and channels: 3 "
                "(in its backbones entry, or the study's image_size and dataset.channels)."
            )
        from monai_peft.study.presets import TinyViTClassifier

        features = TinyViTFeatures(load_backbone(spec.name, spec.source, **kwargs), layers=())
        net = TinyViTClassifier(features, ClassificationHead(features.feature_channels[-1], num_classes, pooling="avg"))
        return net, ["head"]
    else:
        from monai_peft.networks import list_backbones

        known = list_backbones()
        why = "is not a classification backbone" if spec.name in known else "is unknown"
        raise ConfigError(f"backbone {spec.name!r} {why}; valid study backbones: {', '.join(study_backbones())}.")
    preset = mp.get_preset(net)
    head = preset.role("head") if preset is not None else None
    names = (
        []
        if head is None or head.modules is None
        else ([head.modules] if isinstance(head.modules, str) else list(head.modules))
    )
    return net, names


def default_batchnorm_stats(net: nn.Module, head: list[str]) -> str:
    """``"freeze"`` when ``net`` has a BatchNorm outside the ``head`` modules (pretrained statistics), else ``"save"``."""
    from torch.nn.modules.batchnorm import _BatchNorm

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(f"{h}.") for h in head)

    pretrained = any(isinstance(m, _BatchNorm) and not in_head(n) for n, m in net.named_modules())
    return "freeze" if pretrained else "save"


def method_config(spec: MethodSpec, batchnorm_stats: str = "freeze") -> Any:
    """``monai_peft.get_config(spec.name, **spec.kwargs)`` (+ ``preset=`` when the registry supports it).

    ``batchnorm_stats`` is the default for methods with that field when ``spec.kwargs`` does not set it.
    """
    import monai_peft as mp
    from monai_peft.registry import get_method

    cls = get_method(spec.name).config_cls  # unknown names: ConfigError listing the registered methods
    kwargs = dict(spec.kwargs)
    if "batchnorm_stats" in cls.field_names():
        kwargs.setdefault("batchnorm_stats", batchnorm_stats)
    if spec.preset is not None:
        if "preset" not in inspect.signature(mp.get_config).parameters:
            raise ConfigError(
                f"method {spec.key!r} asks for preset {spec.preset!r}, but this monai_peft's get_config has no paper "
                "presets; write the config fields under kwargs: instead."
            )
        return mp.get_config(spec.name, preset=spec.preset, **kwargs)
    return mp.get_config(spec.name, **kwargs)


def build_peft_model(net: nn.Module, head: list[str], spec: MethodSpec) -> Any:
    """``get_peft_model(net, method_config(spec), modules_to_save=head)`` (head omitted where the method trains it)."""
    import monai_peft as mp

    cfg = method_config(spec, default_batchnorm_stats(net, head))
    save = None if spec.name in _HEAD_TRAINED_BY_METHOD or not head else head
    return mp.get_peft_model(net, cfg, modules_to_save=save)


def not_applicable(method: MethodSpec, backbone: str, exc: Exception, applicable: list[str]) -> Exception:
    """The error for ``method`` failing on ``backbone``: why, the methods that apply with their defaults, the fix."""
    ok = ", ".join(applicable) or "none"
    return MethodNotApplicableError(
        f"method {method.key!r} ({method.name}) does not apply to backbone {backbone!r}: {exc}. Methods that apply "
        f"to {backbone!r} with their defaults: {ok}. To keep {method.key!r} for the other backbones, give it "
        f"backbones: [...] without {backbone!r}."
    )


def check_backbone_methods(study: StudySpec, num_classes: int, in_channels: int) -> dict[str, dict[str, int]]:
    """Build every backbone and apply every method to a copy: all bad combinations fail here, before training.

    Returns:
        ``{backbone: {method: trainable parameters}}``.

    Raises:
        ConfigError: unknown backbone or method (the message lists the valid ones).
        MethodNotApplicableError: a method that does not apply to a backbone; the message names those that do.
    """
    import monai_peft as mp

    names = set(mp.list_methods())
    for m in study.methods:
        if m.name not in names:
            raise ConfigError(
                f"unknown method {m.name!r} in the study; registered methods: {', '.join(sorted(names))}."
            )
    out: dict[str, dict[str, int]] = {}
    for b in study.backbones:
        net, head = build_classifier(b, num_classes, b.channels or in_channels, study.input_size(b))
        applicable = mp.applicable_methods(net)
        out[b.key] = {}
        for m in study.methods:
            if not m.runs_on(b.key):
                continue
            try:
                model = build_peft_model(copy.deepcopy(net), head, m)
            except Exception as exc:
                if m.name in applicable and isinstance(exc, MonaiPeftError):
                    raise  # applies with its defaults: the config fields are wrong, the message says which
                raise not_applicable(m, b.key, exc, applicable) from exc
            out[b.key][m.key] = int(model.trainable_parameters()[0])
    return out
