"""Build MONAI Label's own Python environment, with monai_peft installed in it.

MONAI Label 0.8.5 pins ``pydicom<3``, ``dicomweb-client<0.60`` and ``pynetdicom<3``. Those pins conflict with the
newest highdicom and pydicom that monai_peft's main environment uses, so MONAI Label lives in a virtual environment of
its own. This module builds it with one command::

    python -m monai_peft.monailabel.env .venv-monailabel

It makes the venv, upgrades pip to a release that knows ``--build-constraint`` (MONAI Label's ``sam2`` dependency
builds from source and must build against the pinned torch), and installs ``monailabel`` plus this project under the
pins shipped in ``monai_peft/resources/monailabel/``. Run again, it checks the environment and returns at once when it
already imports MONAI Label and monai_peft.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

__all__ = ["DEFAULT_ENV_DIR", "build_env", "env_python", "main", "project_root"]

DEFAULT_ENV_DIR = ".venv-monailabel"
_RESOURCES = Path(__file__).resolve().parent.parent / "resources" / "monailabel"
_MIN_PIP = "pip>=26.2"
_CHECK = "import monailabel, monai_peft, highdicom, pydicom; print(monailabel.__version__, pydicom.__version__)"


def env_python(env_dir: str | os.PathLike) -> Path:
    """The interpreter of a virtual environment (``bin/python``, or ``Scripts/python.exe`` on Windows)."""
    env_dir = Path(env_dir)
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def project_root() -> Path | None:
    """The source checkout monai_peft is imported from, when it is one (a folder with pyproject.toml and setup.cfg)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "setup.cfg").is_file() else None


def _imports_ok(python: Path) -> bool:
    if not python.is_file():
        return False
    done = subprocess.run([str(python), "-c", _CHECK], capture_output=True, text=True)
    return done.returncode == 0


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"building the MONAI Label environment failed (exit {done.returncode}) at: {' '.join(cmd)}. "
            "The output above says which package could not be installed; fix that and run the same command again."
        )


def build_env(env_dir: str | os.PathLike = DEFAULT_ENV_DIR, project: str | os.PathLike | None = None) -> Path:
    """Create (or check) MONAI Label's environment at ``env_dir`` and return its interpreter.

    Args:
        env_dir: folder of the virtual environment; created when absent.
        project: what to install as monai_peft: a source checkout (installed editable, so the MONAI Label app always
            runs the code of that checkout) or a requirement such as ``monai_peft==0.1.0``. Default: this checkout when
            monai_peft is imported from one, else the installed release.

    Raises:
        RuntimeError: a pip step failed (the message names the step).
    """
    env_dir = Path(env_dir).absolute()
    python = env_python(env_dir)
    if _imports_ok(python):
        print(f"MONAI Label environment at {env_dir} is ready ({python}).")
        return python
    if not python.is_file():
        print(f"creating the MONAI Label environment at {env_dir}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(env_dir)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, "-q", _MIN_PIP])
    if project is None:
        root = project_root()
        target = ["-e", str(root)] if root is not None else [f"monai_peft=={_installed_version()}"]
    else:
        target = ["-e", str(Path(project).absolute())] if Path(project).is_dir() else [str(project)]
    environ = {**os.environ, "SAM2_BUILD_CUDA": "0"}
    environ.pop("PIP_CONSTRAINT", None)
    _run(
        [
            *pip,
            "-c",
            str(_RESOURCES / "constraints.txt"),
            "--build-constraint",
            str(_RESOURCES / "build-constraints.txt"),
            "monailabel",
            "highdicom",
            *target,
        ],
        env=environ,
    )
    if not _imports_ok(python):
        raise RuntimeError(
            f"{python} was built but cannot import MONAI Label and monai_peft: run `{python} -c '{_CHECK}'`."
        )
    print(f"MONAI Label environment at {env_dir} is ready ({python}).")
    return python


def _installed_version() -> str:
    from importlib.metadata import version

    return version("monai_peft")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monai_peft.monailabel.env", description="Build MONAI Label's own environment with monai_peft."
    )
    parser.add_argument("env_dir", nargs="?", default=DEFAULT_ENV_DIR, help=f"venv folder (default {DEFAULT_ENV_DIR})")
    parser.add_argument("--project", default=None, help="a monai_peft checkout or requirement (default: this one)")
    args = parser.parse_args(argv)
    try:
        build_env(args.env_dir, args.project)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
