"""Ignite handlers that bundle configs attach: a progress bar and an atomic CSV writer of per-case predictions."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monai_peft.bundle.distributed import is_main_process
from monai_peft.checkpoint import atomic_write_bytes
from monai_peft.errors import ConfigError, InputDataError

__all__ = ["PredictionCSVWriter", "ProgressBarHandler"]

logger = logging.getLogger(__name__)


class ProgressBarHandler:
    """A tqdm progress bar (ignite's ``ProgressBar``) for a trainer or evaluator, from a bundle config.

    Args:
        desc: text before the bar (e.g. ``"train"``, ``"cases"``).
        output_key: show this entry of the engine output (e.g. ``"loss"`` of a trainer); ``None``: none.
        persist: keep the finished bar on screen.
    """

    def __init__(self, desc: str = "", output_key: str | None = None, persist: bool = False) -> None:
        self.desc, self.output_key, self.persist = desc, output_key, persist

    def _output(self, output: Any) -> dict[str, float]:
        item = output[0] if isinstance(output, (list, tuple)) and output else output
        if self.output_key is None or not isinstance(item, dict) or self.output_key not in item:
            return {}
        value = item[self.output_key]
        return {self.output_key: float(value.detach() if isinstance(value, torch.Tensor) else value)}

    def attach(self, engine: Any) -> None:
        from ignite.handlers import ProgressBar

        bar = ProgressBar(persist=self.persist, desc=self.desc)
        bar.attach(engine, output_transform=self._output if self.output_key else None)


class PredictionCSVWriter:
    """Collect per-case class probabilities during an evaluator run; write ``filename`` atomically at the end.

    Columns: ``case``, one ``prob_<class>`` per class, ``prediction`` (arg-max class name). Nothing is written
    when the run fails, so an earlier CSV stays intact. The output folder is checked at ``Events.STARTED``.

    Args:
        output_dir: folder of the CSV (created).
        class_names: names of the output channels, in order.
        filename: CSV file name.
        case_key: key holding each case's name, in the output (a post-transform) or the batch (the datalist of
            :func:`~monai_peft.bundle.datalist_from_dir`).
        pred_key: output key holding the probabilities ``(num_classes,)`` per case.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        filename: str = "predictions.csv",
        case_key: str = "case",
        pred_key: str = "pred",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.filename, self.case_key, self.pred_key = filename, case_key, pred_key
        self.rows: list[list[Any]] = []

    @property
    def path(self) -> Path:
        return self.output_dir / self.filename

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _started(self, engine: Any) -> None:
        self.rows = []
        if is_main_process():
            from monai_peft.inference.writers import check_output_dir

            check_output_dir(self.output_dir)

    def _collect(self, engine: Any) -> None:
        batch, output = engine.state.batch, engine.state.output
        items_b = batch if isinstance(batch, list) else [batch]
        items_o = output if isinstance(output, list) else [output]
        for b, o in zip(items_b, items_o):
            probs = torch.as_tensor(o[self.pred_key]).detach().float().cpu().reshape(-1)
            if probs.numel() != len(self.class_names):
                raise ConfigError(
                    f"prediction has {probs.numel()} values but {len(self.class_names)} class names were given"
                )
            case = o.get(self.case_key) if isinstance(o, dict) else None  # set by a post-transform
            if case is None and isinstance(b, dict):
                case = b.get(self.case_key)  # from the datalist
            if case is None:
                raise ConfigError(f"the batch has no '{self.case_key}' key; build the datalist with datalist_from_dir")
            if not torch.isfinite(probs).all():
                raise InputDataError(f"case '{case}' gives non-finite predictions; check that image for NaN/Inf values")
            k = int(probs.argmax())
            self.rows.append([str(case), *[f"{float(p):.6f}" for p in probs], self.class_names[k]])

    def _write(self, engine: Any) -> None:
        if not is_main_process():
            return
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["case", *[f"prob_{c}" for c in self.class_names], "prediction"])
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, text.getvalue().encode())
        logger.info("%d prediction(s) written to %s", len(self.rows), self.path)
