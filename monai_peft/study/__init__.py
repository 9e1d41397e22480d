"""monai_peft.study: the reproducible PEFT study (backbones x methods x data budgets x seeds) in one command.

``monai-peft study CONFIG`` or::

    from monai_peft.study import load_study, run_study
    study = load_study("quick_pneumoniamnist")          # a file path or a packaged study name
    run_study(study, "runs/quick", workers=2)

Modules: :mod:`~monai_peft.study.schema` (the study file), :mod:`~monai_peft.study.grid` (cells),
:mod:`~monai_peft.study.data` (splits behind a test guard), :mod:`~monai_peft.study.tune` (Optuna learning-rate
search on validation), :mod:`~monai_peft.study.run` (train, select, test once), :mod:`~monai_peft.study.metrics`,
:mod:`~monai_peft.study.execute` (processes / Ray, resume), :mod:`~monai_peft.study.report`. See ``docs/study.md``.
"""

from monai_peft.study.execute import StudyRunError, preflight, run_study
from monai_peft.study.grid import RunCell, TuneCell, expand_grid, expand_tuning
from monai_peft.study.report import write_report
from monai_peft.study.schema import StudySpec, load_study, packaged_studies, study_from_dict
from monai_peft.study.store import StudyFolderError

__all__ = [
    "RunCell",
    "StudyFolderError",
    "StudyRunError",
    "StudySpec",
    "TuneCell",
    "expand_grid",
    "expand_tuning",
    "load_study",
    "packaged_studies",
    "preflight",
    "run_study",
    "study_from_dict",
    "write_report",
]
