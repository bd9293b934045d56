"""The README's two commands: the main job runs as a newcomer would run it, and CI runs the README's test command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_gives_two_commands_and_ci_runs_the_test_command():
    setup_and_run, tests = quick_start_commands()
    assert "pip install" in setup_and_run and setup_and_run.endswith("proxyv run llava-shapes")
    assert tests in (ROOT / ".ci" / "run").read_text(), "CI runs exactly the README's test command"


@pytest.mark.longest
def test_main_command_runs_the_built_in_model(tmp_path):
    command = quick_start_commands()[0].rsplit("&& ", 1)[1]  # the job itself, after the set-up
    assert command == ".venv/bin/proxyv run llava-shapes"
    result = subprocess.run([sys.executable, "-m", "proxyv_convert.cli", *command.split()[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "llava-shapes-proxyv-l2"
    for name in ("config.json", "modeling_proxyv.py", "model-proxyv.safetensors", "recipe.yaml",
                 "distill_report.json", "eval_report.json", "bench_report.json", "run_state.json"):
        assert (folder / name).is_file(), name
    distill = json.loads((folder / "distill_report.json").read_text())
    assert distill["steps"] == 1800 and distill["after"]["cosine_vision"] > distill["before"]["cosine_vision"]
    evaluation = json.loads((folder / "eval_report.json").read_text())
    assert evaluation["n"] == 600 and evaluation["agreement"] > 0.9
    summary = result.stdout
    assert "Ran convert, distill, eval, bench" in summary and f"the model is in {folder.name}" in summary
    assert "answer_agreement:" in summary and "accuracy:" in summary and "prefill_speedup:" in summary
    assert "Next: proxyv push llava-shapes-proxyv-l2" in summary
