"""Files a command writes: temporary names that planted symlinks cannot redirect, checkpoints that are never
unpickled, temporary folders of killed commands cleaned up, one writer per model folder at a time, and an unwritable
destination refused before any long work."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distill import SETTINGS, proxyv_tensors, save_vqa
from tiny_models import save_tiny_llava
from typer.testing import CliRunner

from proxyv_convert import distill as distill_module
from proxyv_convert.atomic import atomic_output, folder_lock, write_text
from proxyv_convert.cli import app
from proxyv_convert.config import DistillSettings
from proxyv_convert.convert import PROXYV_FILE, convert
from proxyv_convert.distill import distill
from proxyv_convert.errors import ProxyVError
from proxyv_convert.model_folder import CHECKPOINT_DIR
from proxyv_convert.weights import write_proxyv_weights

CLI = [sys.executable, "-m", "proxyv_convert.cli"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A converted tiny model and a small VQA dataset, as test_distill's."""
    root = tmp_path_factory.mktemp("hardening")
    model = root / "converted"
    convert(str(save_tiny_llava(root / "source", seed=7)), model, layer=2, progress=False)
    return model, save_vqa(root / "data")


@pytest.fixture
def model_copy(base, tmp_path) -> tuple[Path, Path]:
    model, data = base
    return shutil.copytree(model, tmp_path / "model"), data


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root` (dot files included): a file's bytes, a link's target, '<dir>' for a folder."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            entries[name] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            entries[name] = "<dir>"
        else:
            entries[name] = path.read_bytes()
    return entries


def plant(folder: Path, name: str, outside: Path) -> Path:
    """A symlink `folder/name` to a file outside the folder that holds something precious."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_text(f"precious: {outside.name}\n")
    (folder / name).symlink_to(outside)
    return outside


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- 1. temporary names: created exclusively under unpredictable names, never through a planted symlink ---------------


def test_card_write_does_not_follow_a_planted_temporary_symlink(model_copy, tmp_path):
    folder, _ = model_copy
    outside = plant(folder, ".README.md.tmp", tmp_path / "outside" / "bashrc")
    written = CliRunner().invoke(app, ["card", str(folder), "--write"])
    assert written.exit_code == 0, written.output
    assert outside.read_text() == "precious: bashrc\n", "the file outside the folder is unchanged"
    card = folder / "README.md"
    assert not card.is_symlink() and card.read_text().startswith("---")
    assert (card.stat().st_mode & 0o777) == 0o666 & ~umask(), "the card has the mode open() gives a new file"
    assert sorted(p.name for p in folder.glob(".README*")) == [".README.md.tmp"], "no temporary file is left"


def test_write_text_replaces_a_symlink_and_never_writes_through_one(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    planted = plant(folder, ".eval_report.json.tmp", tmp_path / "outside" / "planted")
    target = plant(folder, "run_state.json", tmp_path / "outside" / "target")
    write_text(folder / "eval_report.json", '{"accuracy": 1}')
    write_text(folder / "run_state.json", '{"done": []}')
    assert planted.read_text() == "precious: planted\n" and target.read_text() == "precious: target\n"
    assert (folder / "eval_report.json").read_text() == '{"accuracy": 1}'
    state = folder / "run_state.json"
    assert not state.is_symlink() and state.read_text() == '{"done": []}', "the link is replaced, not followed"
    assert sorted(p.name for p in folder.iterdir()) == [".eval_report.json.tmp", "eval_report.json", "run_state.json"]


def test_write_text_leaves_no_temporary_file_when_it_fails(tmp_path, monkeypatch):
    (tmp_path / "recipe.yaml").write_text("old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text(tmp_path / "recipe.yaml", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    assert (tmp_path / "recipe.yaml").read_text() == "old"


def test_new_proxyv_weights_do_not_follow_a_planted_temporary_symlink(model_copy, tmp_path):
    folder, _ = model_copy
    outside = plant(folder, f".{PROXYV_FILE}.tmp", tmp_path / "outside" / "weights")
    params = {name: tensor + 1 for name, tensor in load_file(folder / PROXYV_FILE).items()}
    write_proxyv_weights(folder, params)
    assert outside.read_text() == "precious: weights\n"
    shard = folder / PROXYV_FILE
    assert not shard.is_symlink() and (shard.stat().st_mode & 0o777) == 0o666 & ~umask()
    stored = load_file(shard)
    assert all(torch.equal(stored[name], params[name]) for name in params)


def test_distillation_does_not_follow_planted_temporary_symlinks(model_copy, tmp_path):
    folder, data = model_copy
    planted = {name: plant(folder, name, tmp_path / "outside" / name.strip("."))
               for name in (f".{PROXYV_FILE}.tmp", ".distill.tmp", ".distill.old", ".distill_report.json.tmp",
                            ".recipe.yaml.tmp")}
    before = proxyv_tensors(folder)
    distill(folder, str(data), settings=DistillSettings(**{**SETTINGS, "steps": 2, "checkpoint_every": 1}),
            progress=False)
    for name, outside in planted.items():
        assert outside.read_text() == f"precious: {name.strip('.')}\n", name
        assert (folder / name).is_symlink(), f"{name} is left alone"
    assert proxyv_tensors(folder) != before and not (folder / PROXYV_FILE).is_symlink()
    assert json.loads((folder / "distill_report.json").read_text())["steps"] == 2


# --- 2. checkpoints hold no pickle, and resuming unpickles nothing ----------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: what a crafted optimizer.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


_opened: list[str] = []


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and args and str(args[0]).endswith(".pt"):
        _opened.append(str(args[0]))


sys.addaudithook(_record_opens)  # every open() in this process, torch.load's included


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C during optimizer step `step + 1` of the next distillation (it then saves and stops)."""
    real = distill_module.train_step

    def then_ctrl_c(*args, **kwargs):
        logged = real(*args, **kwargs)
        if args[-1]["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return logged

    monkeypatch.setattr(distill_module, "train_step", then_ctrl_c)


def test_resume_never_unpickles_a_file_of_the_checkpoint(base, tmp_path, monkeypatch):
    model, data = base
    folder = shutil.copytree(model, tmp_path / "model")
    settings = DistillSettings(**{**SETTINGS, "steps": 3, "batch_size": 4, "checkpoint_every": 1})
    interrupt_at_step(monkeypatch, 0)
    with pytest.raises(ProxyVError, match="interrupted at step 1"):
        distill(folder, str(data), settings=settings, progress=False)
    monkeypatch.undo()
    checkpoint = folder / CHECKPOINT_DIR
    assert not list(checkpoint.glob("*.pt")), "the checkpoint holds no pickle"
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _Payload(marker), "scheduler": _Payload(marker)}, checkpoint / "optimizer.pt")
    (checkpoint / "extra.pt").write_bytes(pickle.dumps(_Payload(marker)))
    _opened.clear()
    result = distill(folder, str(data), settings=settings, resume=True, progress=False)
    assert not marker.exists(), "no code from the checkpoint ran"
    assert _opened == [], "no .pt file was even opened"
    assert result.steps == 3 and not checkpoint.exists()


def test_a_pickled_checkpoint_of_an_older_version_is_refused_unopened(model_copy, tmp_path, monkeypatch):
    folder, data = model_copy
    checkpoint = folder / CHECKPOINT_DIR
    checkpoint.mkdir()
    marker = tmp_path / "code-ran"
    params = {name.removeprefix("model.proxyv."): tensor for name, tensor in load_file(folder / PROXYV_FILE).items()}
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() for k, v in params.items()}, checkpoint / "proxyv.safetensors")
    torch.save({"optimizer": _Payload(marker), "scheduler": _Payload(marker)}, checkpoint / "optimizer.pt")
    (checkpoint / "state.json").write_text(json.dumps({"step": 1}))
    before = snapshot(folder)
    _opened.clear()
    with pytest.raises(ProxyVError, match=r"lacks optimizer.safetensors, optimizer.json .*delete .* to start over"):
        distill(folder, str(data), settings=DistillSettings(**SETTINGS), resume=True, progress=False)
    assert not marker.exists() and _opened == []
    assert snapshot(folder) == before


def test_optimizer_and_scheduler_states_round_trip_exactly():
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=0.01, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    for _ in range(2):
        param.grad = torch.randn(3, 2)
        optimizer.step()
        scheduler.step()
    for state in (optimizer.state_dict(), scheduler.state_dict()):
        tensors: dict[str, torch.Tensor] = {}
        text = json.dumps(distill_module._encode(state, tensors))
        back = distill_module._decode(json.loads(text), tensors)
        assert repr(back) == repr(state)  # int keys, tuples, floats and tensors exactly as they were


# --- 3. temporary folders of killed commands are removed by the next run to the same output ---------------------------


KILLED_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from proxyv_convert.atomic import atomic_output
context = atomic_output(Path(sys.argv[1]), overwrite=False)
tmp = context.__enter__()
(tmp / "model-00001-of-00002.safetensors").write_bytes(b"half a model")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_conversion_removes_what_killed_ones_left(tmp_path):
    source = save_tiny_llava(tmp_path / "source")
    out = tmp_path / "m"
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(out)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    left = list(tmp_path.glob(".m.proxyv-tmp-*"))
    assert len(left) == 1, "a killed command leaves its temporary folder"
    older = tmp_path / ".m.proxyv-tmp-0123abcd"  # as older versions left them: no lock file
    older.mkdir()
    (older / "model.safetensors").write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    os.utime(older, (an_hour_ago, an_hour_ago))
    with pytest.raises(ProxyVError, match="already exists"), atomic_output(out, overwrite=False) as live:
        (live / "config.json").write_text("{}")  # a command still running: its folder stays
        convert(str(source), out, layer=2, progress=False)
        assert live.is_dir() and (live / "config.json").is_file()
        assert not left[0].exists() and not older.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "source"]
    assert not list(out.glob(".*")), "the finished folder holds no lock or temporary file"

    replaced = tmp_path / ".m.proxyv-old-0123abcd"  # a replaced folder that a killed --overwrite left
    replaced.mkdir()
    os.utime(replaced, (an_hour_ago, an_hour_ago))
    convert(str(source), out, layer=2, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "source"]
    assert not list(out.glob(".*"))


# --- 4. one writer per model folder -----------------------------------------------------------------------------------


HOLD_THE_LOCK = """
import fcntl, os, sys
fd = os.open(os.path.join(sys.argv[1], ".proxyv.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def locked_by_another_process(folder: Path) -> Iterator[int]:
    """Another process holds the folder's lock (a flock on `.proxyv.lock`, its pid in it) until the context ends."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_second_distill_on_a_folder_in_use_is_refused(model_copy):
    folder, data = model_copy
    with locked_by_another_process(folder) as pid:
        before = snapshot(folder)
        result = subprocess.run([*CLI, "distill", str(folder), "--data", str(data), "--steps", "1", "--quiet"],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr == (f"error: {folder} is in use by another proxyv command (pid {pid}); "
                                 "wait for it to finish\n")
        assert snapshot(folder) == before, "nothing changed"


def test_every_writer_refuses_a_folder_in_use(model_copy, tmp_path):
    from proxyv_convert.bench import write_report as write_bench_report
    from proxyv_convert.evaluate import write_report as write_eval_report
    from proxyv_convert.run import run

    folder, data = model_copy
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output": str(folder), "model": {"source": "unused"},
                                      "proxyv": {"start_layer": 2}}))
    (folder / "run_state.json").write_text(json.dumps({"recipe": "x", "done": []}))
    with locked_by_another_process(folder) as pid:
        before = snapshot(folder)
        message = f"{folder} is in use by another proxyv command (pid {pid}); wait for it to finish"
        card = CliRunner().invoke(app, ["card", str(folder), "--write"])
        assert card.exit_code == 2 and card.stderr == f"error: {message}\n"
        for write in (lambda: write_eval_report(folder, None), lambda: write_bench_report(folder, None),
                      lambda: run(recipe, restart=True, log=lambda m: None, progress=False),
                      lambda: distill(folder, str(data), settings=DistillSettings(**SETTINGS), progress=False)):
            with pytest.raises(ProxyVError) as error:
                write()
            assert str(error.value) == message
        assert snapshot(folder) == before, "nothing changed"
    card = CliRunner().invoke(app, ["card", str(folder), "--write"])
    assert card.exit_code == 0 and not (folder / ".proxyv.lock").exists(), "the lock file goes with its holder"


def test_the_lock_is_shared_by_nested_writers_of_one_process_and_refuses_a_symlink(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    with folder_lock(folder), folder_lock(folder):  # `proxyv run` holds it while its stages take it again
        assert (folder / ".proxyv.lock").read_text() == f"{os.getpid()}\n"
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from proxyv_convert.atomic import "
             "folder_lock\nwith folder_lock(Path(sys.argv[1])): pass", str(folder)], capture_output=True, text=True)
        assert f"is in use by another proxyv command (pid {os.getpid()})" in other.stderr
    assert list(folder.iterdir()) == []
    outside = plant(folder, ".proxyv.lock", tmp_path / "outside")
    with pytest.raises(ProxyVError, match="is a symbolic link, not a proxyv lock file; remove it"):
        with folder_lock(folder):
            pass
    assert outside.read_text() == "precious: outside\n"


# --- 5. an unwritable destination is refused before the model loads ---------------------------------------------------


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """Make `folder` unwritable for this process: chmod for a user; for root, whom chmod does not stop, the
    immutable attribute (chattr +i), which stops root too. Skips the test where neither works."""
    mode = folder.stat().st_mode
    immutable = os.geteuid() == 0
    if immutable:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            pytest.skip("running as root on a filesystem without chattr +i: cannot make a folder unwritable")
    else:
        folder.chmod(0o555)
    try:
        probe = folder / "probe"
        with pytest.raises(OSError):
            probe.write_text("x")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(mode)


@pytest.fixture
def no_long_work(monkeypatch):
    """Loading the data or the model fails the test: the checks must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("the long work started before the destination was checked")

    monkeypatch.setattr(distill_module, "load_data", fail)
    monkeypatch.setattr(distill_module, "load_model", fail)


def test_an_unwritable_model_folder_is_refused_before_the_distillation(model_copy, no_long_work):
    folder, data = model_copy
    before = snapshot(folder)
    with unwritable(folder):
        with pytest.raises(ProxyVError, match=f"^{folder} is not writable; make it writable or choose another"):
            distill(folder, str(data), settings=DistillSettings(**SETTINGS), progress=False)
        result = subprocess.run([*CLI, "distill", str(folder), "--data", str(data), "--quiet"],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 2 and result.stderr == (
            f"error: {folder} is not writable; make it writable or choose another folder\n")
    assert snapshot(folder) == before


def test_an_unwritable_out_parent_or_checkpoint_is_refused_before_the_distillation(model_copy, tmp_path,
                                                                                   no_long_work):
    folder, data = model_copy
    parent = tmp_path / "results"
    parent.mkdir()
    with unwritable(parent), pytest.raises(ProxyVError, match=f"^{parent} is not writable"):
        distill(folder, str(data), settings=DistillSettings(**SETTINGS), out=parent / "new" / "m", progress=False)
    assert list(parent.iterdir()) == []

    checkpoint = folder / CHECKPOINT_DIR
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text("{}")
    with unwritable(checkpoint), pytest.raises(ProxyVError, match=f"^{checkpoint} is not writable"):
        distill(folder, str(data), settings=DistillSettings(**SETTINGS), resume=True, progress=False)
