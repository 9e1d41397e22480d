"""Shared helpers of the bundle tests: bundle discovery, parsers, README command extraction and execution."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT, shared_data_dir

BUNDLES = REPO_ROOT / "bundles"
SCHEMA = BUNDLES / "meta_schema.json"
REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/inference.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
    "LICENSE",
)
SLOW_MARK = "# slow"


def all_bundles() -> list[Path]:
    """Every folder of bundles/ that has configs/metadata.json."""
    return sorted(p.parent.parent for p in BUNDLES.glob("*/configs/metadata.json"))


def parser_for(bundle: Path, *configs: str, **overrides: Any):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    files = [str(bundle / "configs" / c) for c in configs]
    parser.read_config(files if len(files) > 1 else files[0])
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser


_REF = re.compile(r"@([A-Za-z0-9_#]+)")


def unresolved_references(config_file: Path) -> list[str]:
    """``@id`` references of a config file that the file itself does not define (it would not run alone)."""
    from monai.bundle import ConfigParser

    config = json.loads(config_file.read_text())
    parser = ConfigParser(config)
    missing: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and (node.startswith("@") or node.startswith("$")):
            for ref in _REF.findall(node):
                if ref.startswith("_meta_"):
                    continue
                try:
                    parser[ref]
                except (KeyError, IndexError, ValueError):
                    missing.append(ref)

    walk(config)
    return sorted(set(missing))


def readme_commands(bundle: Path) -> list[str]:
    """The shell commands of the ```bash blocks of ``docs/README.md`` (continuations joined, comments dropped)."""
    text = (bundle / "docs" / "README.md").read_text()
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def stage_bundle(bundle: Path, tmp_path: Path) -> Path:
    """Copy ``bundle`` (without run outputs) to ``tmp/work/bundles/<name>`` with ``bundles/meta_schema.json`` and
    ``tmp/shared`` -> the shared data folder, so README paths like ``../meta_schema.json`` and
    ``../../../shared/data`` resolve as in the repository."""
    work = tmp_path / "work" / "bundles"
    work.mkdir(parents=True)
    shutil.copy(SCHEMA, work / SCHEMA.name)
    dest = work / bundle.name
    shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("runs", "eval", "model.pt", "model.ts", "__pycache__"))
    shared = shared_data_dir()
    if shared.is_dir():
        (tmp_path / "shared").symlink_to(shared.parent if shared.name == "data" else shared)
    return dest


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: this venv's python first on PATH, the repository importable, one thread."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["MONAI_PEFT_SHARED_DATA"] = str(shared_data_dir())
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_shell(command: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run one README command with bash in ``cwd``; raise with its output when it fails."""
    proc = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed (rc {proc.returncode}) in {cwd}:\n{command}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def quote(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def permission_bits_enforced() -> bool:
    """False when this process may write into a read-only folder (root with CAP_DAC_OVERRIDE, as in CI containers);
    root without it (``setpriv --bounding-set=-dac_override,-dac_read_search``) runs the chmod tests too."""
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o555)
        try:
            with open(os.path.join(d, "probe"), "wb"):
                return False
        except OSError:
            return True
        finally:
            os.chmod(d, 0o755)


def run_bundle(bundle: Path, configs: str | list[str] = "inference.json", **overrides: Any) -> Any:
    """``monai.bundle.run`` in-process on ``bundle``'s configs (one name or a list layered in order)."""
    from monai.bundle import run

    files = [configs] if isinstance(configs, str) else list(configs)
    paths = [str(bundle / "configs" / c) for c in files]
    return run(
        config_file=paths if len(paths) > 1 else paths[0],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle),
        **overrides,
    )


def inference_cli(bundle: Path, dataset_dir: Path, output_dir: Path, timeout: float = 900) -> str:
    """``python -m monai.bundle run --config_file configs/inference.json`` alone, as a user runs it; its output."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir), "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=bundle, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr
