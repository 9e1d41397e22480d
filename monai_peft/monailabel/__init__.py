"""monai_peft.monailabel: a MONAI Label app that serves PEFT bundles and many adapters on one base network.

* :func:`app_dir` - the folder of the shipped app (``main.py``); copy it with
  ``python -m monai_peft.monailabel app <DIR>`` and start ``monailabel start_server --app <DIR> ...``.
* :mod:`monai_peft.monailabel.serving` - :class:`~monai_peft.monailabel.serving.MultiAdapterServer` (one base,
  named adapters, a lock around switch + inference), :class:`~monai_peft.monailabel.serving.AdapterStore`
  (versioned adapters with an atomic pointer), :class:`~monai_peft.monailabel.serving.BundleRuntime`.
* :mod:`monai_peft.monailabel.train` - :func:`~monai_peft.monailabel.train.train_adapter` (``/train``).
* :mod:`monai_peft.monailabel.application` - the MONAI Label classes (import it only where MONAI Label is
  installed: it needs its own environment, see ``docs/monailabel.md``).

Only :mod:`~monai_peft.monailabel.application` imports ``monailabel``; the rest runs in monai_peft's environment.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["app_dir", "copy_app"]


def app_dir() -> Path:
    """Path of the app folder shipped in the package (it holds ``main.py``)."""
    return Path(__file__).resolve().parent / "app"


def copy_app(dest: str | os.PathLike, overwrite: bool = False) -> Path:
    """Copy the app's ``main.py`` to ``dest`` (a writable folder: MONAI Label creates ``model/``, ``logs/`` ... in it).

    The copy only imports :mod:`monai_peft.monailabel.application`, so upgrading monai_peft upgrades the app.

    Raises:
        FileExistsError: ``dest/main.py`` exists and ``overwrite`` is False.
    """
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "main.py"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    tmp = dest / ".main.py.tmp"
    shutil.copyfile(app_dir() / "main.py", tmp)
    os.replace(tmp, target)
    (dest / "model").mkdir(exist_ok=True)
    return dest
