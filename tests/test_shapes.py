"""The shapes task generator, its processor, and the shipped small LLaVA trained on it."""

import hashlib
import json
from collections import Counter

import datasets
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from proxyv_convert.evaluate import evaluate
from proxyv_convert.shapes import MODEL_DIR, build_split, load_shapes, shapes_dataset
from proxyv_convert.shapes.processor import build_processor, prompt_messages
from proxyv_convert.shapes.task import (
    COLOURS,
    EMPTY_ANSWER,
    KINDS,
    SHAPES,
    ShapeObject,
    answer,
    generate,
    png_bytes,
    render,
)

SUBSET = 150  # shipped-model checks: the first 150 test examples (50 of each kind)


def image_hashes(dataset: datasets.Dataset) -> list[str]:
    column = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    return [hashlib.sha256(image["bytes"]).hexdigest() for image in column]


def test_generation_is_deterministic():
    first, second = build_split("test", 30, seed=0), build_split("test", 30, seed=0)
    assert image_hashes(first) == image_hashes(second)
    assert first["question"] == second["question"] and first["answer"] == second["answer"]
    # An example does not depend on what else is generated: example 7 alone is example 7 of the split.
    scene, (question,) = generate("test", 7, seed=0)
    assert hashlib.sha256(png_bytes(render(scene))).hexdigest() == image_hashes(first)[7]
    assert question.question == first[7]["question"]


def test_splits_and_seeds_are_disjoint():
    train, test = build_split("train", 300), build_split("test", 300)
    other_seed = build_split("test", 300, seed=1)
    assert not set(image_hashes(train)) & set(image_hashes(test))
    assert not set(image_hashes(test)) & set(image_hashes(other_seed))


def test_answers_follow_from_the_scene():
    dataset = build_split("validation", 300)
    for row in dataset:
        scene = [ShapeObject(**o) for o in json.loads(row["scene"])]
        assert answer(scene, row["question"]) == row["answer"], row["question"]
        assert len({(o.row, o.col) for o in scene}) == len(scene)  # one object per cell
        assert len({o.name for o in scene}) == len(scene)  # each kind once, so "the red circle" is unique


def test_every_answer_class_is_present_and_kinds_are_balanced():
    dataset = build_split("test")
    assert len(dataset) == 600 and Counter(dataset["kind"]) == {k: 200 for k in KINDS}
    pairs = list(zip(dataset["kind"], dataset["answer"], strict=True))
    answers = {k: Counter(a for kind, a in pairs if kind == k) for k in KINDS}
    assert set(answers["cell"]) == {f"{c} {s}" for c in COLOURS for s in SHAPES} | {EMPTY_ANSWER}
    assert {"0", "1", "2", "3"} <= set(answers["count"]) <= {"0", "1", "2", "3", "4"}
    assert set(answers["compare"]) == set(COLOURS) | set(SHAPES)
    # The object mentioned first is the answer about half the time.
    compare = [(q, a) for q, a, k in zip(dataset["question"], dataset["answer"], dataset["kind"], strict=True)
               if k == "compare"]
    first = sum(q.split(" , the ")[1].startswith(a) for q, a in compare)
    assert 70 <= first <= 130
    # No answer dominates: the most common answer of each kind makes up under 30% of the split.
    assert sum(c.most_common(1)[0][1] for c in answers.values()) / 600 < 0.3


def test_dataset_round_trips_and_cache_regenerates_identically(tmp_path):
    splits = shapes_dataset({"train": 12, "test": 9})
    splits.save_to_disk(str(tmp_path / "saved"))
    loaded = datasets.load_from_disk(str(tmp_path / "saved"))
    assert image_hashes(loaded["test"]) == image_hashes(splits["test"])
    assert set(loaded["train"].column_names) >= {"image", "question", "answer", "kind", "scene"}

    built = load_shapes("test", 9, cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = load_shapes("test", 9, cache=tmp_path / "cache")  # from the cache
    assert image_hashes(built) == image_hashes(again) == image_hashes(splits["test"])


def test_processor_loads_with_auto_processor_and_formats_llava_prompts(tmp_path):
    build_processor().save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert build_processor().tokenizer.get_vocab() == processor.tokenizer.get_vocab()  # BPE training is deterministic
    scene, (question,) = generate("test", 0)
    prompt = processor.apply_chat_template(prompt_messages(question.question), add_generation_prompt=True)
    assert prompt == f"<s>USER: {question.question}\n<image> ASSISTANT:"  # the image after the question
    inputs = processor(images=[render(scene)], text=[prompt], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 64  # 8x8 grid
    full = processor.apply_chat_template(prompt_messages(question.question, question.answer))
    ids = processor.tokenizer(full)["input_ids"]
    assert ids[-1] == processor.tokenizer.eos_token_id and processor.tokenizer.unk_token_id not in ids
    assert processor.tokenizer.decode(ids[len(processor.tokenizer(prompt)["input_ids"]):], skip_special_tokens=True) \
        == question.answer


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(2)
    model = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR).eval()  # plain transformers, no remote code
    return model, AutoProcessor.from_pretrained(MODEL_DIR)


def test_shipped_model_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "processor_config.json",
            "chat_template.jinja", "training_report.json"} <= set(files)
    assert sum(files.values()) < 25 * 2**20
    report = json.loads((MODEL_DIR / "training_report.json").read_text())
    assert report["command"].startswith("python -m proxyv_convert.shapes.train")


def test_shipped_model_answers_as_its_report_says(shipped):
    """With plain transformers, offline, the shipped model scores what its training report records (99.8% on the
    test split) and at least 95% on every kind of question."""
    model, processor = shipped
    report = json.loads((MODEL_DIR / "training_report.json").read_text())
    result = evaluate(model, "shapes", limit=SUBSET, processor=processor, progress=False)
    assert abs(result.accuracy - report["test"]["all"]) < 0.05, result.summary()
    assert min(result.per_kind.values()) >= 0.95, result.summary()


def test_shipped_model_fails_on_noise_images(shipped):
    model, processor = shipped
    result = evaluate(model, "shapes", limit=SUBSET, processor=processor, noise_images=True, progress=False)
    # Without the image the best guess per kind ("nothing", "1", one of the two named objects) gets about a third.
    assert result.accuracy <= 0.6, result.summary()


def test_drop_layer_leaves_a_working_smaller_model():
    from proxyv_convert.shapes.train import ModelShape, drop_layer, llava_config

    torch.manual_seed(0)
    processor = build_processor()
    model = LlavaForConditionalGeneration(llava_config(ModelShape(layers=3, hidden=32, ffn=64), processor)).eval()
    layers = model.model.language_model.layers
    kept = [layers[0].mlp.up_proj.weight.clone(), layers[2].mlp.up_proj.weight.clone()]
    drop_layer(model, 1)
    layers = model.model.language_model.layers
    assert len(layers) == model.config.text_config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1]
    assert all(torch.equal(layer.mlp.up_proj.weight, w) for layer, w in zip(layers, kept, strict=True))
    # Cached generation uses the renumbered layers: it must match recomputing the whole sequence each step.
    scene, (question,) = generate("test", 0)
    prompt = processor.apply_chat_template(prompt_messages(question.question), add_generation_prompt=True)
    inputs = processor(images=[render(scene)], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with pytest.raises(SystemExit, match="--drop-layer 5: the model has 2 decoder layers"):
        drop_layer(model, 5)
