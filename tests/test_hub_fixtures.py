"""tests/hub_fixtures.py: llava-hf-style checkpoints load in transformers with every tensor in place, and they and the
merve/vqav2-small-style dataset load by repo id through the loopback Hub, in a fresh interpreter."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_fixtures import (
    LLAVA_HF_PREFIXES,
    llava_hf_state_dict,
    publish_folder,
    publish_vqa_dataset,
    save_llava_hf,
    save_vqa_parquet,
    vqa_rows,
)
from hub_server import LocalHub
from PIL import Image
from safetensors import safe_open
from tiny_models import VOCAB, tiny_llava, tiny_llava_next, tiny_next_processor, tiny_processor

SMALL = {"layers": 2, "hidden": 32}
BUILD = {"llava": (tiny_llava, tiny_processor), "llava_next": (tiny_llava_next, tiny_next_processor)}


def _model_and_processor(family: str, seed: int = 0):
    build, processor = BUILD[family]
    model = build(seed, **SMALL)
    return model, processor(model.config)


def _image(row: dict) -> Image.Image:
    return Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")


def _logits(model, processor, image: Image.Image, question: str) -> torch.Tensor:
    """Logits of the chat prompt `question` with one image, through the processor (its image token expansion too)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def _weight_keys(folder: Path) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it, over every weight file of `folder`."""
    keys: dict[str, str] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                assert key not in keys, f"{key} in both {keys[key]} and {file.name}"
                keys[key] = file.name
    return keys


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_llava_hf_state_dict_renames_every_tensor_once_to_the_hub_names(family: str) -> None:
    model, _ = _model_and_processor(family)
    native = model.state_dict()

    hub = llava_hf_state_dict(model)

    assert len(hub) == len(native)
    assert all(key.startswith(LLAVA_HF_PREFIXES) for key in hub), sorted(hub)
    assert "language_model.lm_head.weight" in hub
    assert torch.equal(hub["language_model.lm_head.weight"], native["lm_head.weight"])
    assert torch.equal(hub["vision_tower.vision_model.post_layernorm.weight"],
                       native["model.vision_tower.post_layernorm.weight"])
    assert ("image_newline" in hub) == (family == "llava_next")
    # every tensor survives unchanged (as a multiset of values: the renaming neither drops nor duplicates one)
    digest = sorted(hashlib.sha1(t.numpy().tobytes()).hexdigest() for t in native.values())
    assert sorted(hashlib.sha1(t.numpy().tobytes()).hexdigest() for t in hub.values()) == digest


@pytest.mark.parametrize(("family", "shards"), [("llava", 1), ("llava", 3), ("llava_next", 1), ("llava_next", 2)])
def test_saved_folder_loads_every_tensor_and_gives_the_same_logits(family: str, shards: int, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = save_llava_hf(tmp_path / "ckpt", family, shards=shards, **SMALL)
    reference, reference_processor = _model_and_processor(family)

    weights = _weight_keys(folder)
    assert sorted(weights) == sorted(llava_hf_state_dict(reference))
    assert all(key.startswith(LLAVA_HF_PREFIXES) for key in weights)
    assert any(key.startswith("vision_tower.vision_model.encoder.layers.") for key in weights)
    if shards == 1:
        assert set(weights.values()) == {"model.safetensors"}
        assert not (folder / "model.safetensors.index.json").exists()
    else:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == weights  # every key, each in the file that holds it
        assert sorted(set(weights.values())) == [f"model-{i:05d}-of-{shards:05d}.safetensors"
                                                 for i in range(1, shards + 1)]
        assert not (folder / "model.safetensors").exists()
        total = 0
        for file in set(weights.values()):
            with safe_open(str(folder / file), "pt") as f:
                total += sum(f.get_tensor(k).nbytes for k in f.keys())
        assert index["metadata"]["total_size"] == total

    model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(folder)

    assert type(model) is type(reference)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    loaded, expected = model.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected), [
        k for k in expected if not torch.equal(loaded[k], expected[k])
    ]
    row = vqa_rows(1)[0]
    got = _logits(model.eval(), processor, _image(row), row["question"])
    want = _logits(reference, reference_processor, _image(row), row["question"])
    assert torch.equal(got, want), (got - want).abs().max()
    other = _logits(_model_and_processor(family, seed=1)[0], reference_processor, _image(row), row["question"])
    assert not torch.allclose(other, want, atol=1e-3)  # the comparison can tell two checkpoints apart


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_folder_has_the_llava_hf_files_config_and_card(family: str, tmp_path: Path) -> None:
    from transformers import AutoConfig

    folder = save_llava_hf(tmp_path / "ckpt", family, license="apache-2.0", **SMALL)
    reference, _ = _model_and_processor(family)

    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json"} <= files
    assert files & {"chat_template.jinja", "chat_template.json"}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == family
    assert config["architectures"] == [type(reference).__name__]
    assert config["image_token_index"] == VOCAB.index("<image>")
    assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]
    assert "torch_dtype" in config and "dtype" not in config and "rope_parameters" not in config["text_config"]
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert ("image_grid_pinpoints" in config) == (family == "llava_next")
    loaded = AutoConfig.from_pretrained(folder)
    ignore = {"_name_or_path", "architectures", "dtype", "transformers_version", "vocab_size"}
    for sub in ("text_config", "vision_config"):
        got, want = getattr(loaded, sub).to_dict(), getattr(reference.config, sub).to_dict()
        assert {k: v for k, v in got.items() if k not in ignore} == {k: v for k, v in want.items() if k not in ignore}
    assert loaded.vision_feature_layer == reference.config.vision_feature_layer
    assert loaded.tie_word_embeddings is False
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "apache-2.0"


def test_vqa_rows_are_deterministic_consistent_and_in_the_tiny_vocabulary() -> None:
    rows = vqa_rows(16)

    assert rows == vqa_rows(16) and rows != vqa_rows(16, seed=1)
    assert all(list(row) == ["image", "question", "multiple_choice_answer"] for row in rows)
    for row in rows:
        assert set(row["question"].split()) <= set(VOCAB), row["question"]
        assert row["multiple_choice_answer"] in VOCAB
        assert row["image"]["path"] is None and row["image"]["bytes"].startswith(b"\x89PNG")
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert (image.size, image.mode) == ((48, 48), "RGB")
    kinds = {" ".join(row["question"].split()[:2]) for row in rows}
    assert kinds == {"what is", "which shape", "is the"}
    colours = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 30)}
    for row in rows:
        if row["question"].startswith("what is the colour"):  # the answer colour is in the picture
            assert colours[row["multiple_choice_answer"]] in {c for _, c in _image(row).getcolors()}


def test_vqa_parquet_reads_back_as_image_features(tmp_path: Path) -> None:
    from datasets import Dataset
    from datasets import Image as ImageFeature

    path = save_vqa_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", 5, seed=3)
    ds = Dataset.from_parquet(str(path))

    assert ds.column_names == ["image", "question", "multiple_choice_answer"]
    assert isinstance(ds.features["image"], ImageFeature)
    rows = vqa_rows(5, seed=3)
    assert list(ds["question"]) == [r["question"] for r in rows]
    assert list(ds["multiple_choice_answer"]) == [r["multiple_choice_answer"] for r in rows]
    assert ds[0]["image"].tobytes() == _image(rows[0]).tobytes()
    assert path.read_bytes() == save_vqa_parquet(tmp_path / "again.parquet", 5, seed=3).read_bytes()


HUB_CLIENT = r"""
import hashlib, json, sys
import datasets, torch
from transformers import AutoModelForImageTextToText, AutoProcessor

report = {}
ds = datasets.load_dataset("merve/vqav2-small", split="validation")
report["rows"] = ds.num_rows
report["columns"] = ds.column_names
report["image_feature"] = type(ds.features["image"]).__name__
report["images"] = sorted({(type(r["image"]).__name__, r["image"].size, r["image"].mode) for r in ds})
report["pixels"] = hashlib.sha1(ds[0]["image"].tobytes()).hexdigest()
report["questions"] = list(ds["question"])
report["answers"] = list(ds["multiple_choice_answer"])
for repo, out in (("llava-hf/llava-1.5-7b-hf", sys.argv[1]), ("llava-hf/llava-v1.6-vicuna-7b-hf", sys.argv[2])):
    model, info = AutoModelForImageTextToText.from_pretrained(repo, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(repo)
    row = ds[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    with torch.no_grad():
        torch.save(model(**processor(images=row["image"], text=prompt, return_tensors="pt")).logits, out)
    report[repo] = [type(model).__name__, type(processor).__name__, {k: sorted(v) for k, v in info.items()}]
print(json.dumps(report))
"""


@pytest.mark.slow
def test_llava_hf_repos_and_vqa_dataset_load_by_id_through_the_hub(local_hub: LocalHub, tmp_path: Path) -> None:
    llava = save_llava_hf(tmp_path / "llava", "llava", shards=3, **SMALL)
    next_ = save_llava_hf(tmp_path / "next", "llava_next", **SMALL)
    shas = [
        publish_folder(local_hub, "llava-hf/llava-1.5-7b-hf", llava),
        publish_folder(local_hub, "llava-hf/llava-v1.6-vicuna-7b-hf", next_),
        publish_vqa_dataset(local_hub, n=12),
    ]
    assert all(len(sha) == 40 for sha in shas)
    assert set(local_hub.files("llava-hf/llava-1.5-7b-hf")) == {".gitattributes"} | {p.name for p in llava.iterdir()}
    assert set(local_hub.files("merve/vqav2-small", repo_type="dataset")) == {
        ".gitattributes", "README.md", "data/validation-00000-of-00001.parquet"}

    outs = [tmp_path / "llava.pt", tmp_path / "next.pt"]
    done = subprocess.run([sys.executable, "-c", HUB_CLIENT, *map(str, outs)], env=local_hub.env(tmp_path / "hf"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    rows = vqa_rows(12)
    assert report["rows"] == 12
    assert report["columns"] == ["image", "question", "multiple_choice_answer"]
    assert report["image_feature"] == "Image"
    assert report["images"] == [["PngImageFile", [48, 48], "RGB"]]
    assert report["pixels"] == hashlib.sha1(_image(rows[0]).tobytes()).hexdigest()
    assert report["questions"] == [r["question"] for r in rows]
    assert report["answers"] == [r["multiple_choice_answer"] for r in rows]
    no_problems = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert report["llava-hf/llava-1.5-7b-hf"] == ["LlavaForConditionalGeneration", "LlavaProcessor", no_problems]
    assert report["llava-hf/llava-v1.6-vicuna-7b-hf"] == [
        "LlavaNextForConditionalGeneration", "LlavaNextProcessor", no_problems]
    for family, out in zip(("llava", "llava_next"), outs, strict=True):
        model, processor = _model_and_processor(family)
        want = _logits(model, processor, _image(rows[0]), rows[0]["question"])
        assert torch.equal(torch.load(out), want), family
    prefix = "/llava-hf/llava-1.5-7b-hf/resolve/"  # then the revision (a branch or commit sha) and the file
    resolved = {r.path[len(prefix):].split("/", 1)[1] for r in local_hub.requests
                if r.path.startswith(prefix) and r.method == "GET" and r.status == 200}
    assert {"model.safetensors.index.json", *(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))} <= resolved
