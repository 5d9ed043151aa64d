"""The README stays true: every setting documented, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

from hitl.config import SETTINGS, env_var

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    for setting in SETTINGS:
        flag = "--" + setting.name.replace("_", "-")
        assert f"| `{flag}` | `{env_var(setting.name)}` |" in README, flag


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    commands = re.findall(r"```sh\n(.+?)\n```", README)
    serve, test = commands[0], commands[1]
    assert serve.endswith("hitl serve") and test.endswith("pytest")
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
