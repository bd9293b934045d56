"""evaluate(): exact match with greedy decoding, answer agreement between two models, data loading and its errors."""

import json

import datasets
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from proxyv_convert.config import Columns
from proxyv_convert.errors import ProxyVError
from proxyv_convert.evaluate import evaluate, normalise
from proxyv_convert.model_folder import canonical_code
from proxyv_convert.remote.configuration_proxyv import ProxyVLlavaConfig
from proxyv_convert.remote.modeling_proxyv import ProxyVLlavaForConditionalGeneration
from proxyv_convert.shapes import MODEL_DIR, build_split

N = 30  # 10 examples of each kind


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(2)
    return LlavaForConditionalGeneration.from_pretrained(MODEL_DIR).eval()


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def undistilled(teacher):
    """The ProxyV conversion at the middle layer before distillation (VisionMLPs at zero): a different model."""
    config = ProxyVLlavaConfig.from_llava_config(teacher.config, proxyv_reduce_factor=4)
    model = ProxyVLlavaForConditionalGeneration(config)
    model.load_state_dict(teacher.state_dict(), strict=False)
    return model.eval()


def test_normalise():
    assert normalise("  Red   Circle \n") == "red circle"


def test_model_folder_and_agreement_with_itself(teacher, processor):
    result = evaluate(MODEL_DIR, "shapes", limit=N, other=teacher, other_processor=processor, progress=False)
    assert result.n == N and len(result.predictions) == N and result.seconds > 0
    assert result.agreement == 1.0 and result.other_accuracy == result.accuracy
    assert set(result.per_kind) == {"cell", "count", "compare"}
    assert result.accuracy == sum(result.correct) / N
    assert "accuracy" in result.summary() and "agreement 100.0%" in result.summary()


def test_agreement_with_a_different_model_is_below_one(teacher, undistilled, processor):
    result = evaluate(teacher, "shapes", limit=60, processor=processor, other=undistilled,
                      other_processor=processor, progress=False)
    assert result.agreement < 1.0
    changed = [p != q for p, q in zip(result.predictions, result.other_predictions, strict=True)]
    assert result.agreement == 1 - sum(changed) / 60


def test_proxyv_folder_loads_through_load_model(tmp_path, undistilled, processor):
    undistilled.save_pretrained(tmp_path)
    for name, code in canonical_code().items():
        (tmp_path / name).write_bytes(code)
    processor.save_pretrained(tmp_path)
    from_folder = evaluate(tmp_path, "shapes", limit=N, progress=False)
    in_memory = evaluate(undistilled, "shapes", limit=N, processor=processor, progress=False)
    assert from_folder.predictions == in_memory.predictions


def test_saved_dataset_folders_and_column_names(tmp_path, teacher, processor):
    split = build_split("test", N)
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "dict"))
    renamed = split.rename_columns({"image": "picture", "question": "prompt", "answer": "label"})
    renamed.save_to_disk(str(tmp_path / "renamed"))
    builtin = evaluate(teacher, "shapes", limit=N, processor=processor, progress=False)
    from_dict = evaluate(teacher, tmp_path / "dict", processor=processor, progress=False)
    from_renamed = evaluate(teacher, str(tmp_path / "renamed"), processor=processor, progress=False,
                            columns=Columns(image="picture", prompt="prompt", answer="label"))
    assert builtin.predictions == from_dict.predictions == from_renamed.predictions
    assert from_renamed.per_kind  # the "kind" column is still there


def test_bad_data_gives_a_clear_error(tmp_path, teacher, processor):
    with pytest.raises(ProxyVError, match="does not exist"):
        evaluate(teacher, tmp_path / "missing", processor=processor)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ProxyVError, match="save_to_disk"):
        evaluate(teacher, tmp_path / "empty_folder", processor=processor)
    split = build_split("test", 3)
    with pytest.raises(ProxyVError, match="no column 'label'"):
        evaluate(teacher, split, processor=processor, columns=Columns(answer="label"))
    with pytest.raises(ProxyVError, match="no 'test' split"):
        evaluate(teacher, datasets.DatasetDict({"train": split}), processor=processor)
    with pytest.raises(ProxyVError, match="empty"):
        evaluate(teacher, split.select([]), processor=processor)
    with pytest.raises(ProxyVError, match="limit"):
        evaluate(teacher, split, processor=processor, limit=0)
    teacher.save_pretrained(tmp_path / "weights_only")
    with pytest.raises(ProxyVError, match="no processor"):
        evaluate(tmp_path / "weights_only", split)


def test_eval_reads_what_distill_reads_with_split_slices(tmp_path, teacher, processor):
    """A jsonl file with relative image paths and an image folder with metadata.jsonl, as distill reads them; a slice
    of a split evaluates exactly those rows."""
    split = build_split("test", 6)
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, row in enumerate(split):
        row["image"].save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "question": row["question"], "answer": row["answer"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = tmp_path / "table.jsonl"
    table.write_text("".join(json.dumps({**r, "image": f"images/{r.pop('file_name')}"}) + "\n" for r in rows))
    whole = evaluate(teacher, split, split="train", processor=processor, progress=False)
    from_table = evaluate(teacher, str(table), split="train[2:5]", processor=processor, progress=False)
    from_folder = evaluate(teacher, str(folder), split="train[-3:]", processor=processor, progress=False)
    assert from_table.predictions == whole.predictions[2:5] and from_table.split == "train[2:5]"
    assert from_folder.predictions == whole.predictions[3:] and from_folder.n == 3
    with pytest.raises(ProxyVError, match="neither a split name nor NAME"):
        evaluate(teacher, str(table), split="train[1:2:3]", processor=processor)
