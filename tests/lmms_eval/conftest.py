"""The lmms-eval tests run in their own environment (`.ci/lmms-eval-env`: lmms-eval beside proxyv):
`.venv-lmms/bin/python -m pytest -q -n0 tests/lmms_eval`.

Their model: a tiny LLaVA-1.5 converted to ProxyV from layer 2 of 4, with random ProxyV tensors (a fresh conversion's
VisionMLPs start at zero) so that ProxyV on and off answer differently. Their task: a few coloured-shape images with a
question each (a parquet file), in a task YAML of lmms-eval's format, scored by exact match. Half the answers are what
the ProxyV model generates, the other half what the original model generates, so both score between 0 and 1."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from hub_fixtures import randomize_proxyv, save_llava_hf, vqa_rows
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from proxyv_convert.convert import convert

HERE = Path(__file__).parent
TASK = "proxyv_tiny_vqa"
ROWS = 6
MAX_NEW_TOKENS = 3
TASK_YAML = """\
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    """lmms-eval caches the task's dataset under a temporary folder, not in ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("lmms-eval-datasets")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(the original llava-hf folder, its ProxyV conversion)."""
    root = tmp_path_factory.mktemp("models")
    original = save_llava_hf(root / "original", "llava")
    converted = root / "proxyv"
    convert(str(original), converted, layer=2, progress=False)
    randomize_proxyv(converted)
    return original, converted


def questions() -> list[tuple[Image.Image, str]]:
    return [(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"), row["question"])
            for row in vqa_rows(ROWS, seed=3)]


def generations(folder: Path, proxyv_enabled: bool = True) -> list[str]:
    """What the model in `folder` answers to each question: greedy `generate` on the chat-formatted prompt."""
    kwargs = {} if proxyv_enabled else {"proxyv_enabled": False}
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    answers = []
    for image, question in questions():
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


@pytest.fixture(scope="session")
def answers(folders) -> dict[str, list[str]]:
    """The answers of transformers `generate`: ProxyV on ("proxyv"), off ("off") and the original model."""
    original, converted = folders
    return {"proxyv": generations(converted), "off": generations(converted, proxyv_enabled=False),
            "original": generations(original)}


@pytest.fixture(scope="session")
def task(tmp_path_factory, answers) -> tuple[Path, list[str]]:
    """(the folder to pass as lmms-eval's `--include_path`, the task's answers)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    folder = tmp_path_factory.mktemp("tasks")
    targets = [answers["proxyv" if i % 2 == 0 else "original"][i] for i in range(ROWS)]
    rows = [{"image": row["image"], "question": row["question"], "answer": target}
            for row, target in zip(vqa_rows(ROWS, seed=3), targets, strict=True)]
    features = Features({"image": ImageFeature(), "question": Value("string"), "answer": Value("string")})
    data = folder / "data" / "test.parquet"
    data.parent.mkdir()
    Dataset.from_list(rows, features=features).to_parquet(str(data))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data, max_new_tokens=MAX_NEW_TOKENS))
    shutil.copy(HERE / "task_utils.py", folder / "utils.py")
    return folder, targets
