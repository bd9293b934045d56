"""Recipes: validation, overrides, `proxyv run` (stages, rerun, interruption) and `--recipe` on single commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_distill import save_vqa
from tiny_models import save_tiny_llava

from proxyv_convert import run as run_module
from proxyv_convert.config import check_against_model, load_recipe, read_recipe
from proxyv_convert.errors import ProxyVError
from proxyv_convert.model_folder import RUN_STATE as STATE_FILE
from proxyv_convert.run import run


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxyv_convert.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run")
    return {"source": save_tiny_llava(root / "source", seed=3), "data": save_vqa(root / "data")}


def write_recipe(path: Path, tiny: dict[str, Path], **changes) -> Path:
    recipe = {
        "output": str(path.parent / "model"),
        "model": {"source": str(tiny["source"])},
        "proxyv": {"start_layer": 2, "reduce_factor": 4},
        "distill": {"data": str(tiny["data"]), "steps": 2, "batch_size": 4, "eval_examples": 2, "lr": 0.003},
        "eval": {"data": str(tiny["data"]), "split": "validation", "batch_size": 4},
        "bench": {"repeats": 1, "warmup": 0, "text_tokens": 8},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if value is None:
            recipe[section].pop(name) if name else recipe.pop(section)
        elif name:
            recipe[section][name] = value
        else:
            recipe[section] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"distill__stpes": 3}, r"distill\.stpes: unknown key"),
        ({"distill__steps": "many"}, r"distill\.steps: Input should be a valid integer"),
        ({"proxyv__reduce_factor": 0}, r"proxyv\.reduce_factor: Input should be greater than or equal to 1"),
        ({"model": None}, r"model: Field required"),
        ({"proxyv__vision_mlp": "paper"}, r"proxyv\.vision_mlp: Input should be 'residual'"),
    ],
)
def test_typos_and_bad_values_are_named(tmp_path, tiny, changes, message):
    path = write_recipe(tmp_path / "r.yaml", tiny, **changes)
    with pytest.raises(ProxyVError, match=message):
        load_recipe(path)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"proxyv__start_layer": 9}, r"start layer 9 is out of range: the model has 4 decoder layers \(0-3\)"),
        ({"proxyv__reduce_factor": 5}, "reduce factor 5 does not divide the 24x24 vision grid"),
    ],
)
def test_impossible_combinations_against_the_model(tmp_path, tiny, changes, message):
    path = write_recipe(tmp_path / "r.yaml", tiny, **changes)
    recipe, _ = load_recipe(path)
    with pytest.raises(ProxyVError, match=message):
        check_against_model(recipe, str(path))
    result = cli("validate", str(path))
    assert result.returncode == 2 and message.split(":")[0].replace("\\", "") in result.stderr


def test_overrides(tmp_path, tiny):
    path = write_recipe(tmp_path / "r.yaml", tiny)
    recipe, _ = load_recipe(path, ["distill.steps=7", "distill.mixed_precision=bf16", "bench=null"])
    assert recipe.distill.steps == 7 and recipe.distill.mixed_precision == "bf16" and recipe.bench is None
    with pytest.raises(ProxyVError, match="not of the form section.key=value"):
        load_recipe(path, ["distill.steps"])
    with pytest.raises(ProxyVError, match=r"distill\.steps: Input should be a valid integer"):
        load_recipe(path, ["distill.steps=lots"])


def test_run_all_stages_then_rerun_skips_them(tmp_path, tiny):
    path = write_recipe(tmp_path / "r.yaml", tiny)
    result = cli("run", str(path), "distill.steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    model = tmp_path / "model"
    for name in ("distill_report.json", "eval_report.json", "bench_report.json", "recipe.yaml", STATE_FILE):
        assert (model / name).is_file(), name
    assert json.loads((model / "distill_report.json").read_text())["steps"] == 3
    assert f"the model is in {model}" in result.stdout
    assert "answer_agreement" in result.stdout and "prefill_speedup" in result.stdout
    assert "Next: proxyv push" in result.stdout
    sections, commands = read_recipe(model)
    assert commands == [f"proxyv run {path} distill.steps=3"]  # its stages add no commands of their own
    assert sections["distill"]["steps"] == 3 and sections["eval"]["split"] == "validation"
    assert sections["proxyv"]["start_layer"] == 2 and "provenance" in sections
    load_recipe(model / "recipe.yaml")  # the resolved recipe is itself a valid recipe

    again = cli("run", str(path), "distill.steps=3", "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout)
    assert summary["stages_run"] == [] and summary["stages_skipped"] == ["convert", "distill", "eval", "bench"]

    changed = cli("run", str(path), "distill.steps=4")
    assert changed.returncode == 2 and "made by a different recipe" in changed.stderr


def test_rerun_after_an_interruption_continues(tmp_path, tiny, monkeypatch):
    path = write_recipe(tmp_path / "r.yaml", tiny, bench=None)
    real_eval = run_module.STAGE_FUNCTIONS["eval"]

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setitem(run_module.STAGE_FUNCTIONS, "eval", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(path, progress=False, log=lambda m: None)
    state = json.loads((tmp_path / "model" / STATE_FILE).read_text())
    assert state["done"] == ["convert", "distill"]
    monkeypatch.setitem(run_module.STAGE_FUNCTIONS, "eval", real_eval)
    messages = []
    result = run(path, progress=False, log=messages.append)
    assert result.stages_run == ["eval"] and result.stages_skipped == ["convert", "distill"]
    assert "[convert] finished earlier: skipped" in messages


def test_skip_and_only(tmp_path, tiny):
    path = write_recipe(tmp_path / "r.yaml", tiny)
    result = run(path, only=("convert",), progress=False, log=lambda m: None)
    assert result.stages_run == ["convert"] and not (tmp_path / "model" / "distill_report.json").exists()
    with pytest.raises(ProxyVError, match="unknown stage 'distil'"):
        run(path, skip=("distil",), progress=False, log=lambda m: None)


def test_existing_folder_not_from_run_is_refused(tmp_path, tiny):
    (tmp_path / "model").mkdir()
    path = write_recipe(tmp_path / "r.yaml", tiny)
    with pytest.raises(ProxyVError, match="exists but was not written by `proxyv run`"):
        run(path, progress=False, log=lambda m: None)


def test_single_commands_take_their_options_from_the_recipe(tmp_path, tiny):
    path = write_recipe(tmp_path / "r.yaml", tiny, distill__steps=2)
    converted = cli("convert", "--recipe", str(path), "-q")
    assert converted.returncode == 0, converted.stderr
    assert f"Wrote {tmp_path / 'model'}" in converted.stdout and "from layer 2" in converted.stdout
    distilled = cli("distill", "--recipe", str(path), "--steps", "1", "-q")  # a flag wins over the recipe
    assert distilled.returncode == 0, distilled.stderr[-2000:]
    report = json.loads((tmp_path / "model" / "distill_report.json").read_text())
    assert report["steps"] == 1 and report["settings"]["batch_size"] == 4 and report["data"] == str(tiny["data"])
    missing = cli("convert", "--layer", "2")
    assert missing.returncode == 2 and "SRC is required" in missing.stderr


def test_an_interrupted_run_says_how_to_continue_it(tmp_path, tiny, monkeypatch):
    """Ctrl-C during the distill stage points to the same `proxyv run` command (run has no --resume)."""
    import os
    import signal

    from proxyv_convert import distill as distill_module

    path = write_recipe(tmp_path / "r.yaml", tiny, bench=None, distill__steps=3)
    real_step = distill_module.train_step

    def step_then_ctrl_c(*args, **kwargs):
        logged = real_step(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return logged

    monkeypatch.setattr(distill_module, "train_step", step_then_ctrl_c)
    with pytest.raises(ProxyVError) as error:
        run(path, progress=False, log=lambda m: None)
    assert error.value.exit_code == 130 and "--resume" not in str(error.value)
    assert f"continue with the same command (proxyv run {path})" in str(error.value)
