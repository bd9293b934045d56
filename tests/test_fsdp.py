"""Distillation with the frozen weights sharded (FSDP2) over two CPU processes (gloo), launched with the shipped
accelerate config: the same ProxyV tensors as one process, checkpoints and --resume, the saved folder's layout, and
the launch options it refuses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from test_distill import base, proxyv_tensors, vqa_rows  # noqa: F401 (a fixture)

from proxyv_convert.config import DistillSettings, recipes_dir
from proxyv_convert.distill import distill
from proxyv_convert.errors import ProxyVError
from proxyv_convert.model_folder import CHECKPOINT_DIR
from proxyv_convert.safetensors_stream import read_checkpoint

# Two processes with micro-batches of 1 take the same 2 examples per step, in the same micro-batches, as one process
# accumulating two micro-batches of 1: the gradients agree up to float32 summation order. One training image does not
# decode: the process that draws it runs its forward on another example, at zero loss (its gathers are collective).
# Gradient checkpointing is on: its recomputation in the backward runs FSDP's gathers again.
STEPS = 6  # the SIGTERM after the first checkpoint lands with steps to spare; 12 examples cover the 8 rows
ARGS = ["--steps", str(STEPS), "--batch-size", "1", "--lr", "5e-3", "--warmup-steps", "1", "--checkpoint-every", "1",
        "--eval-examples", "2", "--gradient-checkpointing", "--quiet"]
ONE_PROCESS = DistillSettings(steps=STEPS, batch_size=1, gradient_accumulation=2, lr=5e-3, warmup_steps=1,
                              checkpoint_every=1, eval_examples=2, gradient_checkpointing=True)
TOLERANCE = 1e-6  # max abs difference of every ProxyV tensor (measured: 6e-8 after 6 steps, values up to 1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_launch(model: Path, data: Path, *extra: str, config: Path | None = None, processes: int = 2) -> list[str]:
    config = config or recipes_dir() / "accelerate" / "fsdp.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(processes),
            "--main_process_port", str(free_port()), "-m", "proxyv_convert.cli", "distill", str(model),
            "--data", str(data), *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def broken_image_data(tmp_path_factory) -> Path:
    rows = vqa_rows(8)
    rows["image"][3] = {"bytes": b"not an image", "path": None}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    path = tmp_path_factory.mktemp("fsdp") / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                          "validation": datasets.Dataset.from_dict(vqa_rows(2, 500), features=features)}
                         ).save_to_disk(str(path))
    return path


def max_difference(first: Path, second: Path) -> float:
    a, b = proxyv_tensors_loaded(first), proxyv_tensors_loaded(second)
    assert a.keys() == b.keys() and a
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def proxyv_tensors_loaded(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(path).items() if k.startswith("model.proxyv.")})
    return tensors


def layout(folder: Path) -> dict:
    """Files of a model folder and every stored tensor's dtype and shape (none sharded, none missing)."""
    tensors = {name: (info.dtype, tuple(info.shape)) for name, info in read_checkpoint(folder).items()}
    return {"files": sorted(p.name for p in folder.iterdir()), "tensors": tensors}


@pytest.mark.slow
def test_two_fsdp_processes_match_one_process_through_a_checkpoint_and_resume(base, broken_image_data,  # noqa: F811
                                                                             tmp_path):
    model, data = base[0], broken_image_data
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    shutil.copytree(model, one)
    shutil.copytree(model, sharded)
    distill(one, str(data), settings=ONE_PROCESS, progress=False)

    # A sharded run stopped by SIGTERM (what a scheduler sends) after its first checkpoint: it saves and exits
    process = subprocess.Popen(fsdp_launch(sharded, data, *ARGS), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    state = sharded / CHECKPOINT_DIR / "state.json"
    deadline = time.time() + 180
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert state.exists(), stderr[-3000:]
    stopped_at = json.loads(state.read_text())["step"]
    assert 1 <= stopped_at < STEPS and process.returncode != 0, "stopped mid-run"
    assert proxyv_tensors(sharded) == proxyv_tensors(model), "the model is untouched until the end"
    saved = load_file(sharded / CHECKPOINT_DIR / "proxyv.safetensors")  # gathered: whole tensors, as one process saves
    assert {f"model.proxyv.{k}": tuple(v.shape) for k, v in saved.items()} == {
        k: v[1] for k, v in layout(model)["tensors"].items() if k.startswith("model.proxyv.")}

    resumed = subprocess.run(fsdp_launch(sharded, data, *ARGS, "--resume"), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    difference = max_difference(one, sharded)
    assert difference <= TOLERANCE, difference
    assert layout(sharded) == layout(one), "the same files and full (unsharded) tensors as a one-process run"
    assert not (sharded / CHECKPOINT_DIR).exists()

    report, reference = (json.loads((folder / "distill_report.json").read_text()) for folder in (sharded, one))
    assert [e["step"] for e in report["loss_curve"]] == list(range(1, STEPS + 1))
    for mine, theirs in zip(report["loss_curve"], reference["loss_curve"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    sharding = report["sharding"]
    # units: 4 decoder layers, 2 vision encoder layers, 2 VisionMLPs (layers 2-3), the embedding, the root
    assert sharding["strategy"] == "fsdp2" and sharding["processes"] == 2 and sharding["units"] == 10
    assert sharding["frozen_bytes_per_process"] < 0.55 * sharding["frozen_bytes"], "each holds half the frozen weights"
    assert reference["sharding"] is None
    assert report["skipped"] == reference["skipped"] and report["skipped"]["undecodable_images"] >= 1


@pytest.mark.slow
def test_fsdp1_launch_is_refused_in_one_line(base, tmp_path):  # noqa: F811
    model, data = base
    config = tmp_path / "fsdp1.yaml"
    config.write_text((recipes_dir() / "accelerate" / "fsdp.yaml").read_text().replace("fsdp_version: 2",
                                                                                        "fsdp_version: 1"))
    result = subprocess.run(fsdp_launch(model, data, *ARGS, config=config, processes=1), env=ENV,
                            capture_output=True, text=True, timeout=300)  # refused before the world size is looked at
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith("error: --fsdp_version 1 is not supported"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split(errors[0])[0]
    assert not (model / CHECKPOINT_DIR).exists()


@pytest.mark.parametrize(
    "env,settings,message",
    [
        ({"FSDP_VERSION": "1"}, {}, "--fsdp_version 1 is not supported"),
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, {}, "--fsdp_cpu_ram_efficient_loading true is not supported"),
        ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, {}, "pass --gradient-checkpointing"),
        ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, {}, "SIZE_BASED_WRAP is not supported"),
        ({}, {"mixed_precision": "fp16"}, "fp16 is not supported with FSDP"),
        ({"WORLD_SIZE": "1"}, {}, "FSDP needs at least 2 processes"),
        ({"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_DEEPSPEED": "true"}, {}, "DeepSpeed is not supported"),
    ],
)
def test_launch_options_distill_cannot_honour_are_refused(base, monkeypatch, env, settings, message):  # noqa: F811
    """The environment `accelerate launch` gives each process (the FSDP1 case above runs the real launcher)."""
    model, data = base
    valid = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
             "WORLD_SIZE": "2"}
    for name, value in {**valid, **env}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ProxyVError, match=message):
        distill(model, str(data), settings=DistillSettings(steps=1, **settings), progress=False)
    assert not (model / CHECKPOINT_DIR).exists()
