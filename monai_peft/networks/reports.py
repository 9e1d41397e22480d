"""What happened when a checkpoint was loaded: :class:`LoadReport`, and :func:`load_into` that produces it.

Every converter in :mod:`monai_peft.networks` returns a :class:`LoadReport` so that a user can see, key by key,
what was loaded, what was deliberately left fresh (a new classification head, MAE's ``fc_norm``), what the
checkpoint had that was deliberately dropped (an MAE decoder, SSL heads) and what did not fit. In strict mode
any key that is missing, unexpected or mis-shaped and not covered by one of the deliberate categories raises
:class:`~monai_peft.errors.StateDictKeyError` naming the keys.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from monai_peft.errors import StateDictKeyError

__all__ = ["LoadReport", "load_into"]

_MAX_LISTED = 12


def _listing(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"{shown}{more}"


@dataclass
class LoadReport:
    """Key-by-key account of loading a checkpoint into a model.

    Attributes:
        source: where the weights came from (path, URL, ``hf://``, ``pkg://``).
        loaded: model keys filled from the checkpoint.
        missing: model keys the checkpoint did not provide and that were not expected to be fresh.
        unexpected: checkpoint keys (after conversion) that no model key consumed.
        mismatched: ``(key, checkpoint_shape, model_shape)`` for keys present in both with different shapes.
        fresh: model keys deliberately left at their initial value (new head, unused MONAI parameters ...).
        ignored: checkpoint keys deliberately dropped, mapped to the reason.
        adapted: model keys whose tensor was transformed, mapped to how (position-embedding resampling,
            in-channel adaptation, CLS position folding ...).
        notes: free-text remarks (pooling protocol, normalisation constants ...).
    """

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or mis-shaped (deliberate fresh/ignored keys are fine)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """Multi-line human-readable summary."""
        lines = [
            f"weights: {self.source or '<state dict>'}",
            f"  loaded: {len(self.loaded)} tensors",
        ]
        if self.fresh:
            lines.append(f"  fresh (initialised, not from the checkpoint): {_listing(self.fresh)}")
        if self.adapted:
            lines.append("  adapted: " + _listing(f"{k} ({how})" for k, how in self.adapted.items()))
        if self.ignored:
            reasons: dict[str, list[str]] = {}
            for key, reason in self.ignored.items():
                reasons.setdefault(reason, []).append(key)
            for reason, keys in reasons.items():
                lines.append(f"  ignored ({reason}): {_listing(keys)}")
        if self.missing:
            lines.append(f"  MISSING: {_listing(self.missing)}")
        if self.unexpected:
            lines.append(f"  UNEXPECTED: {_listing(self.unexpected)}")
        if self.mismatched:
            lines.append(
                "  SHAPE MISMATCH: "
                + _listing(f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched)
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def raise_if_incompatible(self, context: str = "") -> None:
        """Raise :class:`StateDictKeyError` naming the offending keys unless :attr:`ok`."""
        if self.ok:
            return
        parts = []
        if self.missing:
            parts.append(f"missing keys (the model has them, the checkpoint does not): {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys (the checkpoint has them, the model does not): {_listing(self.unexpected)}")
        if self.mismatched:
            parts.append(
                "shape mismatches: "
                + _listing(f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched)
            )
        where = f" into {context}" if context else ""
        raise StateDictKeyError(
            f"checkpoint {self.source or '<state dict>'} does not fit{where}: "
            + "; ".join(parts)
            + ". Pass strict=False to load what matches and inspect the returned report.",
            missing=self.missing,
            unexpected=self.unexpected,
            mismatched=self.mismatched,
        )


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    fresh: Iterable[str] = (),
    report: LoadReport | None = None,
    context: str = "",
) -> LoadReport:
    """Copy matching tensors of ``state_dict`` into ``module`` and account for every key.

    Args:
        module: target network.
        state_dict: tensors already in the module's key layout.
        strict: raise :class:`StateDictKeyError` if anything is missing, unexpected or mis-shaped. With
            ``strict=False`` matching tensors are loaded and the rest is only reported; shape mismatches are
            always an error (such a tensor cannot be loaded).
        fresh: ``fnmatch`` patterns of module keys that are *expected* to be absent from the checkpoint; they
            are reported under :attr:`LoadReport.fresh` instead of :attr:`LoadReport.missing`.
        report: an existing report to complete (converters put ``ignored``/``adapted`` entries there first).
        context: name of the model for error messages.

    Returns:
        the completed report.
    """
    report = report if report is not None else LoadReport()
    fresh = list(fresh)
    target = module.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
        else:
            to_load[key] = value
    for key in target:
        if key in state_dict:
            continue
        (report.fresh if _matches(key, fresh) else report.missing).append(key)
    if report.mismatched or (strict and not report.ok):
        report.raise_if_incompatible(context)
    result = module.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # cannot happen: to_load only holds keys of the module's own state dict
        raise StateDictKeyError(f"internal error: unexpected keys {result.unexpected_keys}")
    report.loaded.extend(to_load)
    return report
