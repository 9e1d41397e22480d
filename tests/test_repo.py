"""Repository consistency: README's commands and .ci/run agree; the CLI entry point works."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def _commands(text: str) -> list[str]:
    return [c.strip() for c in re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)]


def test_ci_runs_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    commands = _commands(readme)
    assert len(commands) >= 2, "README must give an install+demo command and an install+test command"
    test_command = next(c for c in commands if "pytest" in c)
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_cli_lists_methods(capsys):
    from monai_peft.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "LoraConfig" in out


def test_cli_info_and_error_paths(tmp_path, capsys):
    import monai_peft as mp
    from monai_peft.cli import main
    from tests.helpers import tiny_vit

    mp.get_peft_model(tiny_vit(2), mp.LoraConfig(r=2)).save_adapter(tmp_path / "ad")
    assert main(["info", str(tmp_path / "ad")]) == 0
    assert "method: lora" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err
