"""Expand a study into its cells.

Two kinds of work item, both deterministic functions of the :class:`~monai_peft.study.schema.StudySpec`:

* a :class:`TuneCell` per ``(backbone, method, budget)``: the learning-rate search on the validation split;
* a :class:`RunCell` per ``(backbone, method, budget, seed)``: training with the tuned learning rate, selection
  on validation, one evaluation on test.

Budgets are named ``"f<fraction>"`` (per-class fraction, e.g. ``f0.01``) and ``"k<K>"`` (K-shot, e.g. ``k5``).
Order: backbones, then methods, then budgets (fractions then K-shots), then seeds, as written in the file. A method
with ``backbones: [...]`` runs on those backbones only; ``budgets.k_shot_methods`` limits the K-shot arm to the
methods it names.
"""

from __future__ import annotations

from dataclasses import dataclass

from monai_peft.study.schema import StudySpec

__all__ = ["RunCell", "TuneCell", "budget_label", "budget_names", "expand_grid", "expand_tuning"]


def budget_names(study: StudySpec) -> list[str]:
    """``["f0.01", "f0.1", "k5", ...]`` in file order."""
    return [f"f{float(f):g}" for f in study.budgets.fractions] + [f"k{int(k)}" for k in study.budgets.k_shots]


def budget_label(budget: str) -> str:
    """Human form: ``f0.01`` -> ``1%``, ``k5`` -> ``5-shot``."""
    if budget.startswith("f"):
        return f"{float(budget[1:]) * 100:g}%"
    return f"{int(budget[1:])}-shot"


@dataclass(frozen=True)
class TuneCell:
    """The learning-rate search of one ``(backbone, method, budget)``."""

    backbone: str
    method: str
    budget: str

    @property
    def cell_id(self) -> str:
        return f"{self.backbone}__{self.method}__{self.budget}"


@dataclass(frozen=True)
class RunCell:
    """One training run: ``(backbone, method, budget, seed)``; ``tune`` is the search it takes its lr from."""

    backbone: str
    method: str
    budget: str
    seed: int

    @property
    def cell_id(self) -> str:
        return f"{self.backbone}__{self.method}__{self.budget}__s{self.seed}"

    @property
    def tune(self) -> TuneCell:
        return TuneCell(self.backbone, self.method, self.budget)


def expand_tuning(study: StudySpec) -> list[TuneCell]:
    """Every ``(backbone, method, budget)`` of the study (restricted by ``methods[i].backbones`` and
    ``budgets.k_shot_methods``)."""
    return [
        TuneCell(b.key, m.key, bud)
        for b in study.backbones
        for m in study.methods
        if m.runs_on(b.key)
        for bud in budget_names(study)
        if study.budgets.applies(bud, m.key)
    ]


def expand_grid(study: StudySpec) -> list[RunCell]:
    """Every ``(backbone, method, budget, seed)`` of the study: ``len = B x M x (F + K) x S`` without restrictions."""
    return [RunCell(t.backbone, t.method, t.budget, int(s)) for t in expand_tuning(study) for s in study.seeds]
