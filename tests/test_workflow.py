"""The real-model workflow, as users run it: a Hub (tests/hub_server.py on 127.0.0.1) serves tiny LLaVA-1.5 and
LLaVA-NeXT checkpoints in the llava-hf layout under the llava-hf ids and a dataset in the layout of merve/vqav2-small;
the README's commands and `proxyv run` of every shipped real-model recipe run against it in subprocesses, from the
Hub id to a pushed model that a fresh process without proxyv loads by repo id."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hub_fixtures import publish_folder, publish_vqa_dataset, save_llava_hf
from hub_server import LocalHub

from proxyv_convert.config import load_recipe
from proxyv_convert.families import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_workflowTestToken0123456789"
ROWS = 512  # the recipes hold out the last 500 rows of the only split: 12 are left to train on
# Tiny stand-ins with enough layers for the recipes' start layers (12 of 32, 16 of 40).
MODELS = {
    "llava-hf/llava-1.5-7b-hf": dict(family="llava", layers=14),
    "llava-hf/llava-1.5-13b-hf": dict(family="llava", layers=17),
    "llava-hf/llava-v1.6-vicuna-7b-hf": dict(family="llava_next", layers=14),
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": dict(family="llava_onevision", layers=14),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": dict(family="llava_onevision", layers=14),
    "llava-hf/LLaVA-NeXT-Video-7B-hf": dict(family="llava_next_video", layers=14),
}
# Size overrides that keep a run to a minute on a CPU; everything else is as written.
SMALL_OPTIONS = {
    "distill": ["--steps", "2", "--eval-examples", "2", "--checkpoint-every", "1"],
    "eval": ["--limit", "3"],
    "bench": ["--repeats", "1", "--warmup", "0", "--text-tokens", "8"],
}
SMALL_OVERRIDES = ["distill.steps=2", "distill.eval_examples=2", "eval.limit=3", "bench.repeats=1", "bench.warmup=0",
                   "bench.text_tokens=8", "bench.batch_sizes=[1]"]

USER_SCRIPT = """
import json, sys
sys.modules["proxyv_convert"] = None  # a user without proxyv: any import of it fails
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
repo, revision, image = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(repo, revision=revision, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(repo, revision=revision, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt").to(dtype=model.dtype)
output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "dtype": str(model.dtype),
                  "new_tokens": output.shape[1] - inputs["input_ids"].shape[1]}))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The loopback Hub with the three checkpoints and the dataset, for the whole module."""
    root = tmp_path_factory.mktemp("hub-content")
    with LocalHub() as server:
        for number, (repo_id, spec) in enumerate(MODELS.items()):
            folder = save_llava_hf(root / repo_id.replace("/", "--"), spec["family"], seed=number,
                                   layers=spec["layers"], hidden=32, shards=2)
            publish_folder(server, repo_id, folder)
        publish_vqa_dataset(server, "merve/vqav2-small", n=ROWS, split="validation")
        yield server


def environment(hub: LocalHub, home: Path) -> dict[str, str]:
    """A user's environment: the Hub at HF_ENDPOINT, a token for pushing, an empty cache, one CPU thread each."""
    return hub.env(home) | {"HF_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}


def proxyv(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "proxyv_convert.cli", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def readme_commands() -> list[list[str]]:
    """The README's real-model workflow, one argument list per command, as a shell would split it."""
    section = (ROOT / "README.md").read_text().split("## The workflow on a real model", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def load_as_a_user(hub: LocalHub, repo_id: str, revision: str, tmp_path: Path) -> dict:
    """A fresh process without proxyv loads the pushed model by repo id and generates."""
    from hub_fixtures import vqa_rows

    image = tmp_path / "image.png"
    image.write_bytes(vqa_rows(1, seed=5)[0]["image"]["bytes"])
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    user = subprocess.run([sys.executable, str(script), repo_id, revision, str(image)], cwd=tmp_path,
                          env=hub.env(tmp_path / "user-hf"), capture_output=True, text=True, timeout=300)
    assert user.returncode == 0, user.stderr[-3000:]
    return json.loads(user.stdout.strip().splitlines()[-1])


def check_model_folder(folder: Path, held_out: str) -> None:
    """What every stage left in the folder: disjoint training and held-out rows, reports of this model."""
    distill = json.loads((folder / "distill_report.json").read_text())
    assert distill["steps"] == 2 and len(distill["loss_curve"]) == 2
    assert distill["held_out_split"] == held_out == "validation[-500:]"
    assert distill["settings"]["train_split"] == "validation[:-500]"
    assert {"cosine_vision", "top1"} <= distill["after"].keys() and distill["after"]["task"]["examples"] == 2
    evaluation = json.loads((folder / "eval_report.json").read_text())
    assert evaluation["split"] == "validation[-500:]" and evaluation["n"] == 3 and evaluation["other"] == "original"
    assert evaluation["data"] == "merve/vqav2-small" and evaluation["agreement"] is not None
    bench = json.loads((folder / "bench_report.json").read_text())
    assert bench["cases"] and 0 < bench["cases"][0]["flops_ratio"] < 1


@pytest.mark.slow
@pytest.mark.longest
def test_the_readme_workflow_runs_as_written(hub, tmp_path):
    env = environment(hub, tmp_path / "hf")
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["proxyv", "convert"], ["proxyv", "distill"], ["proxyv", "eval"],
                                        ["proxyv", "bench"], ["proxyv", "push"]]
    outputs = {}
    for command in commands:
        name = command[1]
        # click takes the last of a repeated option: the size overrides come after the README's own values
        extra = ["--batch-sizes", "1"] if name == "bench" else []
        outputs[name] = proxyv(command[1:] + SMALL_OPTIONS.get(name, []) + extra, tmp_path, env).stdout
    folder = tmp_path / "m"
    assert "Next: proxyv distill" in outputs["convert"]
    assert "Next: proxyv eval m --data merve/vqav2-small --split 'validation[-500:]'" in outputs["distill"]
    assert "--answer-column multiple_choice_answer --against-original" in outputs["distill"]
    assert "original model: accuracy" in outputs["eval"]
    check_model_folder(folder, "validation[-500:]")
    recipe = (folder / "recipe.yaml").read_text()
    assert "# proxyv convert llava-hf/llava-1.5-7b-hf" in recipe and "train_split: validation[:-500]" in recipe

    repo = "me/llava-1.5-7b-proxyv-l12"
    pin = re.search(r'revision="([0-9a-f]{40})"', outputs["push"]).group(1)
    card = hub.files(repo)["README.md"].decode()
    assert "## Quality" in card and "## Evaluation" in card and "## Speed" in card
    assert "base_model: llava-hf/llava-1.5-7b-hf" in card and "license: llama2" in card
    user = load_as_a_user(hub, repo, pin, tmp_path)
    assert user["class"].startswith("transformers_modules.") and user["class"].endswith(
        "ProxyVLlavaForConditionalGeneration")
    assert user["new_tokens"] == 3


REAL_RECIPES = ("llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "llava-onevision-0.5b", "llava-onevision-7b",
                "llava-next-video-7b")


def test_every_shipped_real_model_recipe_is_covered():
    sources = {load_recipe(name)[0].model.source for name in REAL_RECIPES}
    assert sources == set(MODELS), "each shipped real-model recipe runs against a tiny model under its Hub id"


@pytest.mark.slow
@pytest.mark.longest
@pytest.mark.parametrize("name", REAL_RECIPES)
def test_shipped_recipe_runs_end_to_end_against_the_hub(hub, tmp_path, name):
    recipe, _ = load_recipe(name)
    repo = f"me/{name}-proxyv"
    env = environment(hub, tmp_path / "hf")
    overrides = [*SMALL_OVERRIDES, "bench.compile=false", f"push.repo_id={repo}"]  # compiling is a GPU matter
    result = proxyv(["run", name, *overrides], tmp_path, env)
    folder = tmp_path / recipe.output
    assert "Ran convert, distill, eval, bench, push in" in result.stdout, result.stdout
    assert f"the model is in {folder.relative_to(tmp_path)}" in result.stdout
    check_model_folder(folder, "validation[-500:]")
    config = json.loads((folder / "config.json").read_text())
    assert config["proxyv_start_layer"] == recipe.proxyv.start_layer
    assert config["proxyv_base_model"] == recipe.model.source

    pin = re.search(r"^  commit: ([0-9a-f]{40})$", result.stdout, re.M).group(1)  # the run's summary
    files = hub.files(repo, revision=pin)
    assert {"model-proxyv.safetensors", "modeling_proxyv.py", "recipe.yaml", "eval_report.json"} <= set(files)
    user = load_as_a_user(hub, repo, pin, tmp_path)
    head = FAMILIES[MODELS[recipe.model.source]["family"]].head.__name__
    assert user["class"].endswith(head) and user["dtype"] == "torch.bfloat16" and user["new_tokens"] == 3
