"""Distillation on tiny models: learning, frozen weights, checkpoints, resume, bad data, several processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_llava

from proxyv_convert import distill as distill_module
from proxyv_convert.config import DistillSettings
from proxyv_convert.convert import convert
from proxyv_convert.distill import distill, step_indices
from proxyv_convert.errors import ProxyVError
from proxyv_convert.model_folder import CHECKPOINT_DIR
from proxyv_convert.safetensors_stream import read_checkpoint

QUESTIONS = ["what is the colour of the circle", "how many red square", "is the blue circle left of the square"]
ANSWERS = ["red", "two", "yes"]


def random_image(seed: int, size: int = 96) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def vqa_rows(n: int, offset: int = 0) -> dict[str, list]:
    return {
        "image": [random_image(offset + i) for i in range(n)],
        "question": [QUESTIONS[i % 3] for i in range(n)],
        "answer": [ANSWERS[i % 3] for i in range(n)],
    }


def save_vqa(path: Path, train: int = 8, validation: int = 4) -> Path:
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(vqa_rows(train), features=features),
        "validation": datasets.Dataset.from_dict(vqa_rows(validation, offset=1000), features=features),
    }).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distill")
    source = save_tiny_llava(root / "source", seed=7)
    model = root / "converted"
    convert(str(source), model, layer=2, progress=False)
    return model, save_vqa(root / "data")


@pytest.fixture
def model_copy(base, tmp_path) -> tuple[Path, Path]:
    import shutil

    model, data = base
    shutil.copytree(model, tmp_path / "model")
    return tmp_path / "model", data


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    out = {}
    for name, info in read_checkpoint(folder).items():
        with open(info.path, "rb") as f:
            f.seek(info.begin)
            out[name] = f.read(info.nbytes)
    return out


SETTINGS = dict(steps=4, batch_size=8, lr=5e-3, warmup_steps=1, checkpoint_every=2, eval_examples=4)


def test_distillation_learns_and_changes_only_proxyv_tensors(model_copy):
    model, data = model_copy
    before = tensor_bytes(model)
    result = distill(model, str(data), settings=DistillSettings(**SETTINGS), progress=False)
    after = tensor_bytes(model)
    assert before.keys() == after.keys()
    changed = {name for name in before if before[name] != after[name]}
    proxyv = {name for name in before if name.startswith("model.proxyv.")}
    assert changed and changed <= proxyv, "only ProxyV tensors may change"
    assert any(name.endswith(".out.weight") for name in changed)

    report = json.loads((model / "distill_report.json").read_text())
    losses = [entry["loss"] for entry in report["loss_curve"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert {"vision", "text"} <= report["loss_curve"][0].keys()
    assert report["after"]["cosine_vision"] > report["before"]["cosine_vision"]
    assert report["after"]["kl"] < report["before"]["kl"]
    assert 0 <= report["after"]["top1"] <= 1
    assert report["after"]["task"]["examples"] == 4
    assert set(report["after"]["cosine_vision_per_layer"]) == {"2", "3"}
    assert result.steps == 4 and not (model / CHECKPOINT_DIR).exists()


def test_out_folder_leaves_the_source_alone(model_copy, tmp_path):
    model, data = model_copy
    before = tensor_bytes(model)
    out = tmp_path / "distilled"
    distill(model, str(data), settings=DistillSettings(**{**SETTINGS, "steps": 2}), out=out, progress=False)
    assert tensor_bytes(model) == before
    assert not (model / "distill_report.json").exists()
    assert (out / "distill_report.json").is_file() and (out / "modeling_proxyv.py").is_file()
    assert tensor_bytes(out) != before
    assert not list(tmp_path.glob(".distilled*")), "no checkpoint or temporary folder is left behind"


def proxyv_tensors(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in tensor_bytes(folder).items() if k.startswith("model.proxyv.")}


def test_resume_gives_the_same_result(base, tmp_path, monkeypatch):
    import shutil

    model, data = base
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    shutil.copytree(model, straight)
    shutil.copytree(model, interrupted)
    settings = DistillSettings(**{**SETTINGS, "batch_size": 4, "checkpoint_every": 1})
    distill(straight, str(data), settings=settings, progress=False)

    real_step = distill_module.train_step

    def step_then_ctrl_c(*args, **kwargs):
        logged = real_step(*args, **kwargs)
        if args[-1]["step"] == 1:  # during the second step
            os.kill(os.getpid(), signal.SIGINT)
        return logged

    monkeypatch.setattr(distill_module, "train_step", step_then_ctrl_c)
    with pytest.raises(ProxyVError, match="interrupted at step 2") as error:
        distill(interrupted, str(data), settings=settings, progress=False)
    assert error.value.exit_code == 130
    assert json.loads((interrupted / CHECKPOINT_DIR / "state.json").read_text())["step"] == 2
    assert proxyv_tensors(interrupted) == proxyv_tensors(model), "the model is untouched until the end"
    monkeypatch.setattr(distill_module, "train_step", real_step)
    with pytest.raises(ProxyVError, match="--resume"):
        distill(interrupted, str(data), settings=settings, progress=False)
    distill(interrupted, str(data), settings=settings, resume=True, progress=False)
    assert proxyv_tensors(interrupted) == proxyv_tensors(straight)
    straight_report = json.loads((straight / "distill_report.json").read_text())
    resumed_report = json.loads((interrupted / "distill_report.json").read_text())
    assert resumed_report["loss_curve"] == straight_report["loss_curve"]


def test_killed_run_resumes(base, tmp_path):
    import shutil

    model, data = base
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    shutil.copytree(model, killed)
    shutil.copytree(model, straight)
    args = ["--steps", "6", "--batch-size", "4", "--lr", "5e-3", "--checkpoint-every", "2", "--eval-examples", "4",
            "--quiet"]
    command = [sys.executable, "-m", "proxyv_convert.cli", "distill"]
    process = subprocess.Popen([*command, str(killed), "--data", str(data), *args])
    state = killed / CHECKPOINT_DIR / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert state.exists(), "a checkpoint was written before the kill"
    resumed = subprocess.run([*command, str(killed), "--data", str(data), *args, "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "%|" not in resumed.stderr, "--quiet also silences the libraries' progress bars (weight loading)"
    subprocess.run([*command, str(straight), "--data", str(data), *args], check=True, capture_output=True,
                   timeout=300)
    assert proxyv_tensors(killed) == proxyv_tensors(straight)


def test_nan_loss_stops_and_keeps_the_last_good_weights(model_copy, monkeypatch):
    model, data = model_copy
    before = proxyv_tensors(model)
    real_losses = distill_module.distill_losses

    def poisoned(*args, **kwargs):
        losses = real_losses(*args, **kwargs)
        if poisoned.calls == 1:
            losses["loss"] = losses["loss"] * float("nan")
        poisoned.calls += 1
        return losses

    poisoned.calls = 0
    monkeypatch.setattr(distill_module, "distill_losses", poisoned)
    with pytest.raises(ProxyVError, match="loss became nan at step 2") as error:
        distill(model, str(data), settings=DistillSettings(**SETTINGS), progress=False)
    assert error.value.exit_code == 1
    assert proxyv_tensors(model) == before, "the model folder keeps its weights"
    state = json.loads((model / CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == 1, "the checkpoint holds the weights after the last good step"


def test_step_indices_cover_every_example_once_per_epoch():
    seen = [i for step in range(5) for i in step_indices(10, 3, step, 2)]
    assert sorted(seen) == list(range(10))
    assert step_indices(10, 3, 7, 4) == step_indices(10, 3, 7, 4)
    assert step_indices(10, 3, 0, 10) != step_indices(10, 4, 0, 10)


@pytest.mark.parametrize(
    "data_kind,message",
    [
        ("missing", "does not exist"),
        ("no_image_column", "no image column 'image'"),
        ("empty", "empty"),
        ("undecodable", "no image could be decoded"),
    ],
)
def test_bad_data_is_a_clear_error(model_copy, tmp_path, data_kind, message):
    model, _ = model_copy
    path = tmp_path / "bad"
    if data_kind == "no_image_column":
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"question": ["a"], "answer": ["b"]})}).save_to_disk(
            str(path))
    elif data_kind == "empty":
        features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string")})
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [], "question": []},
                                                                  features=features)}).save_to_disk(str(path))
    elif data_kind == "undecodable":
        rows = {"image": [{"bytes": b"not an image", "path": None}] * 4, "question": ["a"] * 4}
        features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string")})
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(path))
    before = tensor_bytes(model)
    with pytest.raises(ProxyVError, match=message):
        distill(model, str(path), settings=DistillSettings(**SETTINGS), progress=False)
    assert tensor_bytes(model) == before
    assert not (model / CHECKPOINT_DIR).exists()


def test_undecodable_images_are_skipped_and_counted(model_copy, tmp_path):
    model, _ = model_copy
    rows = vqa_rows(8)
    rows["image"][3] = {"bytes": b"broken", "path": None}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    path = tmp_path / "partly-broken"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                          "validation": datasets.Dataset.from_dict(vqa_rows(2, 500), features=features)}
                         ).save_to_disk(str(path))
    distill(model, str(path), settings=DistillSettings(**{**SETTINGS, "steps": 2}), progress=False)
    report = json.loads((model / "distill_report.json").read_text())
    assert report["skipped"]["undecodable_images"] == 2  # the broken example, once in each of the 2 steps


def test_not_a_proxyv_folder(base, tmp_path):
    _, data = base
    source = save_tiny_llava(tmp_path / "plain")
    with pytest.raises(ProxyVError, match="is not a ProxyV model folder"):
        distill(source, str(data), progress=False)


def test_two_processes_with_accelerate(base, tmp_path):
    import shutil

    model, data = base
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    before = proxyv_tensors(copy)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "proxyv_convert.cli", "distill", str(copy), "--data", str(data), "--steps", "2",
               "--batch-size", "2", "--eval-examples", "2", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((copy / "distill_report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 2
    assert proxyv_tensors(copy) != before
    assert torch.isfinite(torch.tensor([e["loss"] for e in report["loss_curve"]])).all()


# --- the real workflow's data: LLaVA-NeXT inputs, small datasets, held-out rows, what a copy inherits ---------------


def test_llava_next_distills_with_its_image_sizes(tmp_path):
    """LLaVA-NeXT's forward needs `image_sizes` beside `pixel_values`: the batcher keeps what the family needs."""
    from tiny_models import save_tiny_llava_next

    source = save_tiny_llava_next(tmp_path / "source", seed=2)
    convert(str(source), tmp_path / "m", layer=2, progress=False)
    data = save_vqa(tmp_path / "data", train=4, validation=2)
    before = proxyv_tensors(tmp_path / "m")
    settings = DistillSettings(steps=2, batch_size=2, warmup_steps=1, eval_examples=2)
    result = distill(tmp_path / "m", str(data), settings=settings, progress=False)
    assert result.steps == 2 and proxyv_tensors(tmp_path / "m") != before
    assert result.report["after"]["cosine_vision"] > result.report["before"]["cosine_vision"]


def save_jsonl(folder: Path, rows: int) -> Path:
    """A jsonl file whose image column holds paths relative to it (one split, 'train')."""
    folder.mkdir()
    lines = []
    for i in range(rows):
        random_image(i).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": QUESTIONS[i % 3], "answer": ANSWERS[i % 3]}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_a_one_row_dataset_is_refused_before_anything_is_written(model_copy, tmp_path):
    model, _ = model_copy
    data = save_jsonl(tmp_path / "one", 1)
    before = {p: p.stat().st_mtime_ns for p in model.rglob("*")}
    with pytest.raises(ProxyVError, match="has 1 row.*at least 2"):
        distill(model, str(data), settings=DistillSettings(**SETTINGS), progress=False)
    assert {p: p.stat().st_mtime_ns for p in model.rglob("*")} == before


def test_a_three_row_dataset_holds_one_out_and_reports(model_copy, tmp_path):
    model, _ = model_copy
    data = save_jsonl(tmp_path / "three", 3)
    result = distill(model, str(data), settings=DistillSettings(**{**SETTINGS, "steps": 1}), progress=False)
    assert result.report["held_out_split"] == "train[-1:]" and result.report["after"]["examples"] == 1
    assert {"cosine_vision", "top1"} <= result.report["after"].keys()


def test_held_out_rows_of_one_split_must_not_overlap_the_training_rows(model_copy, tmp_path):
    model, _ = model_copy
    data = save_jsonl(tmp_path / "rows", 8)
    overlapping = DistillSettings(**{**SETTINGS, "train_split": "train[:6]", "eval_split": "train[4:]"})
    with pytest.raises(ProxyVError, match="shares 2 row"):
        distill(model, str(data), settings=overlapping, progress=False)
    disjoint = DistillSettings(**{**SETTINGS, "steps": 1, "train_split": "train[:6]", "eval_split": "train[6:]"})
    result = distill(model, str(data), settings=disjoint, progress=False)
    assert result.report["held_out_split"] == "train[6:]" and result.report["after"]["examples"] == 2
    assert result.report["before"]["task"]["examples"] == 2


def test_a_distilled_copy_inherits_no_report_of_the_source(model_copy, tmp_path):
    """Reports, run state and card describe the source's weights: `--out` does not copy them, and distilling in place
    removes the evaluation of the old weights."""
    model, data = model_copy
    stale = {"eval_report.json": "{}", "bench_report.json": "{}", "run_state.json": "{}", "README.md": "old card"}
    for name, text in stale.items():
        (model / name).write_text(text)
    out = tmp_path / "copy"
    distill(model, str(data), settings=DistillSettings(**{**SETTINGS, "steps": 1}), out=out, progress=False)
    assert not any((out / name).exists() for name in stale)
    assert all((model / name).read_text() == text for name, text in stale.items()), "the source is untouched"
    distill(model, str(data), settings=DistillSettings(**{**SETTINGS, "steps": 1}), progress=False)
    assert not (model / "eval_report.json").exists() and (model / "bench_report.json").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_precision_bf16(tmp_path, dtype):
    """`--mixed-precision bf16` (what the real recipes use) on a float32 and on a bfloat16 model: float32 ProxyV
    weights under autocast, the held-out report and its generations in the same precision."""
    source = save_tiny_llava(tmp_path / "source", seed=5)
    convert(str(source), tmp_path / "m", layer=2, dtype=dtype, progress=False)
    data = save_vqa(tmp_path / "data", train=4, validation=2)
    settings = DistillSettings(steps=2, batch_size=2, warmup_steps=1, eval_examples=2, mixed_precision="bf16")
    result = distill(tmp_path / "m", str(data), settings=settings, progress=False)
    assert result.report["after"]["task"]["examples"] == 2 and 0 <= result.report["after"]["top1"] <= 1
    stored = {info.dtype for name, info in read_checkpoint(tmp_path / "m").items() if name.startswith("model.proxyv.")}
    assert stored == {"F32" if dtype == "float32" else "BF16"}, "the ProxyV tensors keep their stored dtype"
