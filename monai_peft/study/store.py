"""The results folder of a study.

Layout::

    <out>/study.json          the study (every default filled in), its config hash, the monai_peft version
    <out>/tune/<id>.json      one learning-rate search per (backbone, method, budget)
    <out>/cells/<id>.json     one finished (backbone, method, budget, seed) run
    <out>/results.csv ...     the report (monai_peft.study.report)

Every file is written atomically (temporary file in the same folder + ``os.replace``), so an interrupted run
leaves only whole files and a rerun with ``--resume`` skips what is finished. A folder that holds another
study's results (different config hash), or files that are not a study's, is refused and left untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monai_peft.checkpoint import atomic_write_bytes
from monai_peft.errors import ConfigError
from monai_peft.study.schema import StudySpec

__all__ = ["ResultsFolder", "StudyFolderError", "write_json"]


class StudyFolderError(ConfigError):
    """The results folder cannot be used for this study (another study's results, or foreign files)."""


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=1, allow_nan=True) + "\n").encode())


class ResultsFolder:
    """Results of one study under ``root``; :meth:`open` checks the folder before anything runs."""

    def __init__(self, root: str | Path, study: StudySpec) -> None:
        self.root = Path(root)
        self.study = study
        self.hash = study.config_hash()

    @property
    def study_file(self) -> Path:
        return self.root / "study.json"

    def check(self, resume: bool) -> None:
        """Refuse a folder with another study's results, foreign files, or this study's results without ``resume``.

        Raises:
            StudyFolderError: the message says what the folder holds and what to do; nothing is changed.
        """
        if self.root.exists() and not self.root.is_dir():
            raise StudyFolderError(f"results path {self.root} is a file; give a folder with --out.")
        if not self.root.is_dir() or not any(self.root.iterdir()):
            return
        if not self.study_file.is_file():
            raise StudyFolderError(
                f"results folder {self.root} is not empty and holds no study.json (not a study's results folder); "
                "choose an empty or new folder with --out. Nothing was changed."
            )
        try:
            other = json.loads(self.study_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StudyFolderError(
                f"{self.study_file} is unreadable ({exc}); choose another folder with --out."
            ) from exc
        if other.get("config_hash") != self.hash:
            raise StudyFolderError(
                f"results folder {self.root} holds the results of another study ({other.get('study', {}).get('name')!r}, "
                f"config hash {other.get('config_hash')}; this study {self.study.name!r} has hash {self.hash}). Its results "
                "were left intact: choose another folder with --out, or delete that one to start over."
            )
        if not resume and (self.finished("tune") or self.finished("cells")):
            raise StudyFolderError(
                f"results folder {self.root} already holds results of this study; pass --resume to continue it (finished "
                "cells are skipped), or choose another folder with --out."
            )

    def open(self, resume: bool) -> None:
        """:meth:`check`, then create the folder and write ``study.json``."""
        self.check(resume)
        self.root.mkdir(parents=True, exist_ok=True)
        from monai_peft import __version__

        write_json(
            self.study_file,
            {"config_hash": self.hash, "monai_peft_version": __version__, "study": self.study.to_dict()},
        )

    def path(self, kind: str, cell_id: str) -> Path:
        return self.root / kind / f"{cell_id}.json"

    def finished(self, kind: str) -> list[str]:
        """Ids of the finished records of ``kind`` (``"tune"`` or ``"cells"``)."""
        folder = self.root / kind
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    def read(self, kind: str, cell_id: str) -> dict[str, Any] | None:
        """A finished record, or None when absent (or from another config hash)."""
        p = self.path(kind, cell_id)
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if data.get("config_hash") == self.hash else None

    def write(self, kind: str, record: dict[str, Any]) -> None:
        write_json(self.path(kind, record["cell_id"]), {**record, "config_hash": self.hash})
