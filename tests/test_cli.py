"""The `proxyv` command line: exit codes, one-line errors that leave the filesystem as it was, the real entry points."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from tiny_models import save_tiny_llava
from transformers import LlamaConfig
from typer.testing import CliRunner

from proxyv_convert import __version__, safetensors_stream
from proxyv_convert.cli import app


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("sources") / "tiny-llava")


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode) for p in root.rglob("*")
    }


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def run_python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxyv_convert.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_convert_prints_a_summary_and_the_next_command(source, tmp_path):
    result = run("convert", source, "--layer", "2", "--out", tmp_path / "m", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert f"Wrote {tmp_path / 'm'}" in result.stdout
    assert "16,704 new parameters" in result.stdout  # 2 VisionMLPs: 2*32 norms + 2*64*32 + 64*32 + 32 + 32*64
    assert f"Next: proxyv distill {tmp_path / 'm'} --data" in result.stdout
    assert (tmp_path / "m" / "model-proxyv.safetensors").is_file()


def _truncate(source: Path, tmp_path: Path) -> list[str]:
    copy = shutil.copytree(source, tmp_path / "src")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["convert", copy, "-l", "2", "-o", tmp_path / "m"]


def _not_llava(source: Path, tmp_path: Path) -> list[str]:
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(LlamaConfig(num_hidden_layers=2).to_json_string())
    return ["convert", tmp_path / "llama", "-l", "1", "-o", tmp_path / "m"]


def _out_exists(source: Path, tmp_path: Path) -> list[str]:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.txt").write_text("someone's model")
    return ["convert", source, "-l", "2", "-o", tmp_path / "m"]


def _out_unwritable(source: Path, tmp_path: Path) -> list[str]:
    # chmod does not stop root, so the parent is a regular file, which nobody can create a folder in.
    (tmp_path / "file").write_text("")
    assert not os.access(tmp_path / "file", os.X_OK)
    return ["convert", source, "-l", "2", "-o", tmp_path / "file" / "m"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda s, t: ["convert", t / "missing", "-l", "2", "-o", t / "m"], "does not exist"),
        (lambda s, t: ["convert", "./missing", "-l", "2", "-o", t / "m"], "SRC ./missing does not exist"),
        (
            lambda s, t: ["convert", s, "-l", "7", "-o", t / "m"],
            "start layer 7 is out of range: the model has 4 decoder layers",
        ),
        (
            lambda s, t: ["convert", s, "-l", "2", "--reduce-factor", "5", "-o", t / "m"],
            "does not divide the 24x24 vision grid",
        ),
        (lambda s, t: ["convert", s, "-l", "2", "-o", t / "m", "--revision", "v1"], "--revision applies to Hub ids"),
        (_truncate, "is not a valid safetensors file"),
        (_not_llava, "is a 'llama' checkpoint; proxyv converts model types: llava"),
        (_out_exists, "already exists; pass --overwrite"),
        (_out_unwritable, "is a file, not a folder"),
    ],
    ids=[
        "missing",
        "missing-relative",
        "layer",
        "factor",
        "revision-of-folder",
        "truncated",
        "not-llava",
        "out-exists",
        "out-unwritable",
    ],
)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(source, tmp_path, setup, message):
    args = setup(source, tmp_path)
    before = tree(tmp_path)
    result = run(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert result.stdout == ""
    assert tree(tmp_path) == before


def test_unknown_hub_id_suggests_the_hf_id(source, tmp_path, local_hub, monkeypatch):
    download = functools.partial(huggingface_hub.snapshot_download, endpoint=local_hub.url, cache_dir=tmp_path / "c")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    result = run("convert", "llava-hf/llava-1.5-7b", "-l", "12", "-o", tmp_path / "m")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: model 'llava-hf/llava-1.5-7b' was not found on the Hub and is not a local folder; "
        "did you mean 'llava-hf/llava-1.5-7b-hf'?\n"
    )
    assert not (tmp_path / "m").exists()


def test_ctrl_c_exits_130_and_leaves_nothing(source, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_stream, "write_shard", interrupted)
    result = run("convert", source, "-l", "2", "-o", tmp_path / "m", "--quiet")
    assert result.exit_code == 130
    assert result.stderr.startswith("error: interrupted") and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_unexpected_errors_keep_their_traceback(source, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(safetensors_stream, "write_shard", broken)
    result = run("convert", source, "-l", "2", "-o", tmp_path / "m", "--quiet")
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_flag(source, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old.txt").write_text("old")
    result = run("convert", source, "-l", "2", "-o", tmp_path / "m", "--overwrite", "--dtype", "bfloat16", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert not (tmp_path / "m" / "old.txt").exists()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"


def test_python_dash_m_converts_and_fails_cleanly(source, tmp_path):
    ok = run_python("convert", source, "--layer", "3", "--out", tmp_path / "m", "--reduce-factor", "6")
    assert ok.returncode == 0, ok.stderr
    assert f"Wrote {tmp_path / 'm'}" in ok.stdout
    assert "Writing: 100%" in ok.stderr  # the progress bar goes to stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["proxyv_reduce_factor"] == 6

    bad = run_python("convert", source, "--layer", "-1", "--out", tmp_path / "n")
    assert bad.returncode == 2
    assert bad.stderr == (
        f"error: cannot convert {source}: start layer -1 is out of range: the model has 4 decoder layers (0-3)\n"
    )
    assert not (tmp_path / "n").exists()


def test_convert_a_hub_id_through_hf_endpoint(source, tmp_path, local_hub):
    api = huggingface_hub.HfApi(endpoint=local_hub.url)
    api.create_repo("local-user/tiny-llava")
    api.upload_folder(repo_id="local-user/tiny-llava", folder_path=source)
    result = run_python(
        "convert", "local-user/tiny-llava", "-l", "2", "-o", tmp_path / "m", "-q", env=local_hub.env(tmp_path / "hf")
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "model-proxyv.safetensors").is_file()
    assert (tmp_path / "hf" / "hub" / "models--local-user--tiny-llava").is_dir()  # went through the client's cache


def test_installed_script_version_without_torch():
    script = Path(sys.executable).parent / "proxyv"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout == f"proxyv {__version__}\n"
    probe = "import sys, proxyv_convert.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout == "False\n"


def test_convert_and_bench_run_where_datasets_cannot_be_imported(source, tmp_path):
    """Only the commands that read a dataset import `datasets` (a serving machine may lack it)."""
    block = "import runpy, sys; sys.modules['datasets'] = None; sys.argv[0] = 'proxyv'; "
    main = "runpy.run_module('proxyv_convert.cli', run_name='__main__')"
    for args in (["convert", source, "--layer", "2", "--out", tmp_path / "m", "--quiet"],
                 ["bench", tmp_path / "m", "--repeats", "1", "--warmup", "0"]):
        result = subprocess.run([sys.executable, "-c", block + main, *map(str, args)], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "bench_report.json").is_file()
    blocked = subprocess.run([sys.executable, "-c", block + "import datasets"], capture_output=True, text=True)
    assert blocked.returncode != 0 and "import of datasets halted" in blocked.stderr  # the block itself works


def test_distill_option_defaults_are_the_library_defaults():

    import typer

    from proxyv_convert.config import DistillSettings

    command = typer.main.get_command(app).commands["distill"]
    defaults = {param.name: param.default for param in command.params}
    for name in DistillSettings.model_fields:
        assert defaults[name] == getattr(DistillSettings(), name), name


def test_builtin_model_names_work_where_a_model_folder_does(tmp_path):
    """`builtin:NAME` (as in recipes) is accepted by convert and eval; an unknown name is one clear line."""
    converted = run("convert", "builtin:llava-shapes", "--layer", "3", "--out", tmp_path / "m", "--quiet")
    assert converted.exit_code == 0, converted.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["proxyv_start_layer"] == 3
    evaluated = run("eval", "builtin:llava-shapes", "--data", "shapes", "--limit", "30", "--quiet")
    assert evaluated.exit_code == 0 and "builtin:llava-shapes: accuracy" in evaluated.output, evaluated.output
    for command in (["convert", "builtin:nope", "--layer", "2", "--out", tmp_path / "n"],
                    ["eval", "builtin:nope", "--data", "shapes"]):
        result = run_python(*command)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "unknown built-in model 'nope'; built-in models: llava-shapes" in result.stderr
    assert not (tmp_path / "n").exists()


def test_every_help_example_parses():
    """Each command's `Example:` lines parse as that command's arguments (nothing is run)."""
    import typer

    commands = typer.main.get_command(app).commands
    examples = 0
    for name, command in commands.items():
        for example in (command.epilog or "").replace("Examples:", "Example:").split("Example:")[1:]:
            for line in filter(None, (part.strip() for part in example.split("    "))):
                words = line.split()
                assert words[:2] == ["proxyv", name], line
                command.make_context(name, words[2:])  # a rejected option raises click's UsageError
                examples += 1
    assert examples >= len(commands) - 1


def test_an_offline_hub_id_without_the_hf_suffix_gets_the_suggestion(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_python("convert", "llava-hf/llava-1.5-7b", "--layer", "12", "--out", tmp_path / "m", env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "could not reach the Hub" in result.stderr and "did you mean 'llava-hf/llava-1.5-7b-hf'?" in result.stderr
    assert not (tmp_path / "m").exists()


def test_threads_option_and_the_busy_machine_hint(monkeypatch):
    import torch

    from proxyv_convert import threads

    assert threads.busy_hint(threads=2, cores=2, load=0.3) is None
    hint = threads.busy_hint(threads=2, cores=2, load=1.2)
    assert hint and "--threads 1" in hint and "load average 1.2 on 2 cores" in hint
    assert threads.busy_hint(threads=1, cores=2, load=3.0) is None, "one thread never waits on another"
    messages = []
    monkeypatch.setattr(threads, "_chosen", False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    threads.warn_if_busy(messages.append)
    assert len(messages) == 1
    result = run("distill", "./nothing", "--data", "shapes", "--threads", "0")
    assert result.exit_code == 2 and "--threads must be at least 1" in result.output
