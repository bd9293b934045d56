"""Malformed and hostile input, one kind at a time: images that do not decode (decompression bombs included), damaged
files (tables, recipes, model configs, safetensors headers), tensors whose stored dtype is wrong, prompts longer than
--max-length, settings out of any sane range, and image paths that leave their table's folder. Each is either
skipped and counted (where the README promises it) or a one-line ProxyVError that leaves every file as it was."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import datasets
import pytest
from PIL import Image
from test_distill import QUESTIONS, random_image, tensor_bytes
from tiny_models import save_tiny_llava
from typer.testing import CliRunner

from proxyv_convert import distill as distill_module
from proxyv_convert import evaluate as evaluate_module
from proxyv_convert.cli import app
from proxyv_convert.config import (
    BenchSection,
    DistillSettings,
    EvalSection,
    ProxyVSection,
    build,
    load_recipe,
    read_recipe,
)
from proxyv_convert.convert import convert
from proxyv_convert.data import decode_image, load_data
from proxyv_convert.distill import distill
from proxyv_convert.errors import ProxyVError
from proxyv_convert.model_folder import CHECKPOINT_DIR
from proxyv_convert.remote.configuration_proxyv import ProxyVLlavaConfig
from proxyv_convert.safetensors_stream import read_checkpoint

IMAGE_TOKENS = 576  # the tiny models' 24x24 grid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hardening")
    source = save_tiny_llava(root / "source", seed=5)
    convert(str(source), root / "model", layer=2, progress=False)
    return {"root": root, "source": source, "model": root / "model"}


@pytest.fixture
def model_copy(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny["model"], tmp_path / "model"))


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def one_line_error(*args) -> str:
    """The CLI's message for a bad input: exit code 2 and a single `error: ...` line."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output[-2000:])
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny greyscale PNG whose header claims width x height pixels (one zlib-compressed row of zeros as data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (width + 1), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# --- images that do not decode are skipped, whatever they hold -----------------------------------------------------


def _undecodable(kind: str, tmp_path: Path, monkeypatch):
    good = png_bytes(random_image(1, 40))
    if kind == "bomb-error":
        return bomb_png()
    if kind == "bomb-error-as-path":
        (tmp_path / "bomb.png").write_bytes(bomb_png(30000, 30000))
        return str(tmp_path / "bomb.png")
    if kind == "bomb-warning":  # above MAX_IMAGE_PIXELS but below twice it: PIL only warns, then decodes it all
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        return good  # 40x40 = 1600 pixels
    if kind == "bomb-dict":
        return {"bytes": bomb_png(), "path": None}
    if kind == "a-fifo":  # opening it for reading would block for ever
        os.mkfifo(tmp_path / "fifo.png")
        return {"bytes": None, "path": str(tmp_path / "fifo.png")}
    values = {
        "truncated-png": good[: len(good) // 2],
        "header-only": good[:33],
        "zero-bytes": b"",
        "wrong-bytes": b"GIF89a but not really an image",
        "none": None,
        "an-int": 7,
        "a-list": [1, 2, 3],
        "dict-without-keys": {},
        "missing-path": str(tmp_path / "nope.png"),
        "a-directory": str(tmp_path),
    }
    return values[kind]


@pytest.mark.parametrize("kind", ["bomb-error", "bomb-error-as-path", "bomb-warning", "bomb-dict", "truncated-png",
                                  "header-only", "zero-bytes", "wrong-bytes", "none", "an-int", "a-list",
                                  "dict-without-keys", "missing-path", "a-directory", "a-fifo"])
def test_an_image_that_does_not_decode_is_none_and_warns_nothing(kind, tmp_path, monkeypatch):
    value = _undecodable(kind, tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert decode_image(value) is None
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_an_image_within_the_limits_still_decodes():
    image = decode_image(png_bytes(random_image(2, 40)))
    assert image is not None and image.size == (40, 40) and image.mode == "RGB"


def _table_with_a_bomb(folder: Path, fmt: str) -> Path:
    """9 rows, the first a decompression bomb: 8 train on the first step, the last is held out."""
    folder.mkdir()
    rows = [{"image": f"{i}.png", "question": QUESTIONS[i % 3], "answer": "red"} for i in range(9)]
    (folder / "0.png").write_bytes(bomb_png())
    for i in range(1, 9):
        random_image(i).save(folder / f"{i}.png")
    if fmt == "jsonl":
        (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder / "data.jsonl"
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    embedded = {"image": [{"bytes": (folder / r["image"]).read_bytes(), "path": None} for r in rows],
                "question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}
    datasets.Dataset.from_dict(embedded, features=features).to_parquet(folder / "data.parquet")
    return folder / "data.parquet"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_distill_skips_and_counts_a_decompression_bomb(model_copy, tmp_path, fmt, capfd):
    data = _table_with_a_bomb(tmp_path / "data", fmt)
    settings = DistillSettings(steps=1, batch_size=8, warmup_steps=1, eval_examples=1)
    result = distill(model_copy, str(data), settings=settings, progress=False)
    assert result.steps == 1
    assert result.report["skipped"]["undecodable_images"] == 1  # the bomb, in the one step's 8 examples
    err = capfd.readouterr().err
    assert "Traceback" not in err and "DecompressionBomb" not in err


# --- damaged files are one-line errors ----------------------------------------------------------------------------


TABLES = {
    "empty.jsonl": (b"", "is empty"),
    "blank.jsonl": (b"\n  \n\n", "holds no rows"),
    "latin1.jsonl": ('{"image": "0.png", "question": "caf\xe9"}\n'.encode("latin-1"), "line 1 is not UTF-8"),
    "latin1-line3.jsonl": (b'{"image": "0.png"}\n\n{"image": "1.png", "question": "\xe9t\xe9"}\n',
                           "line 3 is not UTF-8"),
    "utf16.jsonl": ('{"image": "0.png"}\n'.encode("utf-16"), "line 1 is not UTF-8"),
    "malformed.jsonl": (b'{"image": "0.png"}\n{"image": \n', "line 2 is not valid JSON"),
    "array-row.jsonl": (b'{"image": "0.png"}\n[1, 2]\n', "line 2 is a JSON list"),
    "string-row.jsonl": (b'"0.png"\n', "line 1 is a JSON str"),
    "nested.jsonl": (b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "line 1 is not valid JSON"),
    "empty.json": (b"", "is empty"),
    "latin1.json": ('[{"image": "0.png", "question": "caf\xe9"}]'.encode("latin-1"), "is not UTF-8"),
    "cut.json": (b'[{"image": "0.png", "question": "a"', "could not be read as json"),
    "empty.parquet": (b"", "is empty"),
    "junk.parquet": (b"PAR1 this is no parquet file", "could not be read as parquet"),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_a_damaged_table_is_a_one_line_error(name, tmp_path, capfd):
    content, message = TABLES[name]
    (tmp_path / name).write_bytes(content)
    random_image(0).save(tmp_path / "0.png")
    before = files(tmp_path)
    with pytest.raises(ProxyVError, match=message) as error:
        load_data(str(tmp_path / name), split="train")
    assert "\n" not in str(error.value) and name.split(".")[0] in str(error.value)
    assert files(tmp_path) == before
    assert "Failed to load" not in capfd.readouterr().err  # the datasets library's own log line is not repeated


def test_the_cli_says_a_damaged_table_in_one_line(model_copy, tmp_path):
    (tmp_path / "data.jsonl").write_bytes(TABLES["latin1.jsonl"][0])
    before = files(model_copy)
    assert "not UTF-8" in one_line_error("distill", model_copy, "--data", tmp_path / "data.jsonl")
    assert files(model_copy) == before


RECIPES = {
    "latin1": ("# caf\xe9\nmodel: {source: x}\nproxyv: {start_layer: 1}\n".encode("latin-1"), "not UTF-8 text"),
    "utf16": ("model: {source: x}\n".encode("utf-16"), "not UTF-8 text"),
    "binary": (bytes(range(256)), "not UTF-8 text"),
    "nested-lists": (b"model: " + b"[" * 20_000 + b"]" * 20_000 + b"\n", "nests too deeply"),
    "nested-maps": (b"model: " + b"{a: " * 10_000 + b"1" + b"}" * 10_000 + b"\n", "nests too deeply"),
    "tab-indented": (b"model:\n\tsource: x\n", "not valid YAML"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_damaged_recipe_is_a_one_line_error(name, tmp_path):
    content, message = RECIPES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    with pytest.raises(ProxyVError, match=message) as error:
        load_recipe(path)
    assert "\n" not in str(error.value)
    assert message in one_line_error("validate", path)


def test_a_model_folder_recipe_that_is_not_utf8(model_copy):
    (model_copy / "recipe.yaml").write_bytes("# proxyv convert caf\xe9\nmodel: {}\n".encode("latin-1"))
    with pytest.raises(ProxyVError, match="not UTF-8 text"):
        read_recipe(model_copy)


def _edit_config(**changes):
    def edit(config: dict) -> object:
        config.update(changes)
        return config
    return edit


def _edit_sub(part: str, **changes):
    def edit(config: dict) -> object:
        config[part].update(changes)
        return config
    return edit


CONFIGS = {
    "a-list": (lambda config: [config], "must hold a JSON object"),
    "a-string": (lambda config: "llava", "must hold a JSON object"),
    "null": (lambda config: None, "must hold a JSON object"),
    "text-config-a-string": (_edit_config(text_config="llama"), "'text_config' must be a JSON object"),
    "text-config-a-list": (_edit_config(text_config=[1]), "'text_config' must be a JSON object"),
    "vision-config-a-list": (_edit_config(vision_config=[1, 2]), "'vision_config' must be a JSON object"),
    "vision-config-a-number": (_edit_config(vision_config=3), "'vision_config' must be a JSON object"),
    "auto-map-a-string": (_edit_config(auto_map="AutoConfig"), "'auto_map' must be a JSON object"),
    "auto-map-a-number": (_edit_config(auto_map=5), "'auto_map' must be a JSON object"),
    "auto-map-a-list": (_edit_config(auto_map=["AutoConfig"]), "'auto_map' must be a JSON object"),
    "model-type-a-list": (_edit_config(model_type=["llava"]), "'model_type' must be a JSON string"),
    "unknown-text-model": (_edit_sub("text_config", model_type="nonexistent"), "could not be read as a model"),
    "layers-a-string": (_edit_sub("text_config", num_hidden_layers="four"), "could not be read as a model"),
    "negative-hidden-size": (_edit_sub("text_config", hidden_size=-64), "hidden_size must be a positive integer"),
    "zero-patch-size": (_edit_sub("vision_config", patch_size=0), "patch_size must be a positive integer"),
    "image-size-a-string": (_edit_sub("vision_config", image_size="big"), "could not be read as a model"),
}
RAW_CONFIGS = {
    "not-utf8": (b'{"model_type": "llava", "x": "\xff"}', "is not valid JSON"),
    "nested": (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),
    "huge-number": (b'{"model_type": "llava", "n": 1' + b"0" * 5000 + b"}", "is not valid JSON"),
}


@pytest.mark.parametrize("name", [*CONFIGS, *RAW_CONFIGS])
def test_a_damaged_source_config_is_a_one_line_error(name, tiny, tmp_path):
    source = Path(shutil.copytree(tiny["source"], tmp_path / "source"))
    if name in CONFIGS:
        change, message = CONFIGS[name]
        (source / "config.json").write_text(json.dumps(change(json.loads((source / "config.json").read_text()))))
    else:
        content, message = RAW_CONFIGS[name]
        (source / "config.json").write_bytes(content)
    before = files(tmp_path)
    with pytest.raises(ProxyVError, match=message) as error:
        convert(str(source), tmp_path / "out", layer=2, progress=False)
    assert "\n" not in str(error.value) and "config.json" in str(error.value)
    assert files(tmp_path) == before


def test_validate_reads_a_damaged_source_config_the_same_way(tiny, tmp_path):
    source = Path(shutil.copytree(tiny["source"], tmp_path / "source"))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vision_config": [1, 2]}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"source": str(source)}, "proxyv": {"start_layer": 2}}))
    assert "'vision_config' must be a JSON object" in one_line_error("validate", recipe)


def _safetensors(header: object = None, data: bytes = b"", *, raw: bytes | None = None,
                 length: int | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _tensor(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


HEADERS = {
    "nested-lists": (_safetensors(raw=b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"), "header is not JSON"),
    "nested-objects": (_safetensors(raw=b'{"a": ' + b'{"b": ' * 10_000 + b"1" + b"}" * 10_001),
                       "header is not JSON"),
    "huge-integer": (_safetensors(raw=b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b"]}}"),
                     "header is not JSON"),
    "not-utf8": (_safetensors(raw=b'{"a": "\xff\xfe"}'), "header is not JSON"),
    "length-past-the-end": (_safetensors({"a": _tensor("F32", [1], [0, 4])}, b"\0" * 4, length=10**6),
                            "does not fit"),
    "length-2**63": (_safetensors({}, length=2**63), "does not fit"),
    "a-list": (_safetensors([1, 2, 3]), "not a JSON object"),
    "a-string": (_safetensors("F32"), "not a JSON object"),
    "entry-a-number": (_safetensors({"a": 5}), "no valid data_offsets"),
    "overlapping": (_safetensors({"a": _tensor("F32", [2], [0, 8]), "b": _tensor("F32", [2], [4, 12])}, b"\0" * 12),
                    "do not match its shape"),
    "past-the-data": (_safetensors({"a": _tensor("F32", [2], [0, 8])}, b"\0" * 4), "truncated"),
    "a-hole": (_safetensors({"a": _tensor("F32", [1], [100, 104])}, b"\0" * 104), "do not match its shape"),
    "negative-shape": (_safetensors({"a": _tensor("F32", [-1, -2], [0, 8])}, b"\0" * 8), "shape"),
    "negative-shape-and-offsets": (_safetensors({"a": _tensor("F32", [-2, 2], [0, -16])}), "data_offsets"),
    "negative-offsets": (_safetensors({"a": _tensor("F32", [0], [-4, -4]), "b": _tensor("F32", [1], [-4, 0])}),
                         "data_offsets"),
    "boolean-shape": (_safetensors({"a": _tensor("F32", [True, 2], [0, 8])}, b"\0" * 8), "shape"),
    "boolean-offsets": (_safetensors({"a": _tensor("U8", [1], [False, True])}, b"\0"), "data_offsets"),
    "float-shape": (_safetensors({"a": _tensor("F32", [2.0], [0, 8])}, b"\0" * 8), "shape"),
    "dtype-a-list": (_safetensors({"a": _tensor(["F32"], [2], [0, 8])}, b"\0" * 8), "dtype"),
    "unknown-dtype": (_safetensors({"a": _tensor("F33", [2], [0, 8])}, b"\0" * 8), "dtype"),
}


@pytest.mark.parametrize("name", list(HEADERS))
def test_a_hostile_safetensors_header_is_a_one_line_error(name, tmp_path):
    content, message = HEADERS[name]
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ProxyVError, match=message) as error:
        read_checkpoint(tmp_path)
    assert "\n" not in str(error.value) and "model.safetensors" in str(error.value)


INDEXES = {
    "weight-map-a-list": ({"weight_map": ["model.safetensors"]}, "weight_map must map names to file names"),
    "shard-a-number": ({"weight_map": {"a": 5}}, "weight_map must map names to file names"),
    "absolute-shard": ({"weight_map": {"a": "/etc/passwd"}}, "outside the checkpoint folder"),
    "escaping-shard": ({"weight_map": {"a": "../outside.safetensors"}}, "outside the checkpoint folder"),
    "deep-escaping-shard": ({"weight_map": {"a": "x/../../outside.safetensors"}}, "outside the checkpoint folder"),
    "nul-in-shard": ({"weight_map": {"a": "model\0.safetensors"}}, "outside the checkpoint folder"),
    "nested": ("[" * 100_000 + "]" * 100_000, "not a valid safetensors index"),
}


@pytest.mark.parametrize("name", list(INDEXES))
def test_a_hostile_index_is_a_one_line_error(name, tmp_path):
    index, message = INDEXES[name]
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(_safetensors({"a": _tensor("F32", [1], [0, 4])}, b"\0" * 4))
    (folder / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(ProxyVError, match=message):
        read_checkpoint(folder)


def test_shards_linked_to_blobs_elsewhere_are_read(tmp_path):
    """The Hub's cache keeps each shard as a symlink into a blobs folder: the shard's name is what must stay inside."""
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "1234").write_bytes(_safetensors({"a": _tensor("F32", [1], [0, 4])}, b"\0" * 4))
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "blobs" / "1234")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    assert list(read_checkpoint(folder)) == ["a"]


def source_config(tiny):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny["source"])


@pytest.mark.parametrize("count", [10**9, 2**31, IMAGE_TOKENS + 1])
def test_learned_proxies_are_bounded_by_the_grid(tiny, tmp_path, count):
    message = f"learned proxies must be between 1 and the {IMAGE_TOKENS} tokens of an image grid, got {count}"
    with pytest.raises(ProxyVError, match=message):
        convert(str(tiny["source"]), tmp_path / "out", layer=2, proxy="learned", learned_proxies=count,
                progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=message):
        ProxyVLlavaConfig.from_llava_config(source_config(tiny), proxyv_start_layer=2, proxyv_proxy="learned",
                                            proxyv_learned_proxies=count)


def test_a_recipe_with_too_many_learned_proxies_fails_validation(tiny, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"source": str(tiny["source"])},
                                  "proxyv": {"start_layer": 2, "proxy": "learned", "learned_proxies": 1000}}))
    assert "learned proxies must be between 1 and the 576 tokens" in one_line_error("validate", recipe)


def test_learned_proxies_up_to_the_grid_are_accepted(tiny):
    config = ProxyVLlavaConfig.from_llava_config(source_config(tiny), proxyv_start_layer=2,
                                                 proxyv_proxy="learned", proxyv_learned_proxies=IMAGE_TOKENS)
    assert config.proxyv_learned_proxies == IMAGE_TOKENS


def test_the_cli_bounds_learned_proxies_in_one_line(tiny, tmp_path):
    line = one_line_error("convert", tiny["source"], "--layer", "2", "--proxy", "learned", "--learned-proxies",
                          str(10**9), "--out", tmp_path / "out")
    assert "learned proxies" in line and not (tmp_path / "out").exists()


# --- a stored dtype that lies is refused --------------------------------------------------------------------------


def _retype(path: Path, dtype: str, scale: int = 1, pick: str = "F32") -> str:
    """Declare the first `pick` tensor of a safetensors file as `dtype`, its last dimension times `scale` (the same
    bytes): a header that lies about what the bytes are. Returns the tensor's name."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == pick and len(v["shape"]) == 2)
    header[name]["dtype"] = dtype
    header[name]["shape"][-1] *= scale
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    return name


@pytest.mark.parametrize("dtype,scale", [("I32", 1), ("U32", 1), ("I16", 2), ("U16", 2), ("U8", 4), ("I8", 4),
                                         ("BOOL", 4), ("F8_E4M3", 4), ("F8_E5M2", 4)])
def test_a_weight_stored_with_a_non_float_dtype_is_refused(tiny, tmp_path, dtype, scale):
    source = Path(shutil.copytree(tiny["source"], tmp_path / "source"))
    name = _retype(source / "model.safetensors", dtype, scale)
    before = files(tmp_path)
    with pytest.raises(ProxyVError, match=rf"dtypes differ \(.*{name} is {dtype}, expected F64/F32/F16/BF16") as error:
        convert(str(source), tmp_path / "out", layer=2, progress=False)
    assert "\n" not in str(error.value)
    assert files(tmp_path) == before


def test_a_half_precision_source_still_converts(tmp_path):
    import torch
    from tiny_models import tiny_llava, tiny_processor

    model = tiny_llava(5).to(torch.float16)
    model.save_pretrained(tmp_path / "source")
    tiny_processor(model.config).save_pretrained(tmp_path / "source")
    convert(str(tmp_path / "source"), tmp_path / "out", layer=2, progress=False)
    stored = {info.dtype for name, info in read_checkpoint(tmp_path / "out").items()}
    assert stored == {"F16"}


def test_the_cli_names_the_lying_tensor(tiny, tmp_path):
    source = Path(shutil.copytree(tiny["source"], tmp_path / "source"))
    name = _retype(source / "model.safetensors", "I32")
    line = one_line_error("convert", source, "--layer", "2", "--out", tmp_path / "out")
    assert name in line and "is I32, expected F64/F32/F16/BF16" in line


# --- prompts longer than --max-length ------------------------------------------------------------------------------


def save_jsonl(folder: Path, questions: list[str]) -> Path:
    folder.mkdir()
    for i in range(len(questions)):
        random_image(i).save(folder / f"{i}.png")
    rows = [{"image": f"{i}.png", "question": q, "answer": "red"} for i, q in enumerate(questions)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "data.jsonl"


@pytest.mark.parametrize("max_length", [1, 100, IMAGE_TOKENS])
def test_a_max_length_no_example_fits_is_refused_before_training(model_copy, tmp_path, max_length):
    data = save_jsonl(tmp_path / "data", [QUESTIONS[i % 3] for i in range(8)])
    before = tensor_bytes(model_copy)
    settings = DistillSettings(steps=2, batch_size=4, warmup_steps=1, eval_examples=2, max_length=max_length)
    with pytest.raises(ProxyVError, match=rf"all of the first 7 examples are longer than --max-length {max_length} "
                                          rf"\(the image alone takes {IMAGE_TOKENS} tokens.*raise --max-length"):
        distill(model_copy, str(data), settings=settings, progress=False)
    assert tensor_bytes(model_copy) == before and not (model_copy / CHECKPOINT_DIR).exists()
    assert not (model_copy / "distill_report.json").exists()


class _Batcher:
    """A stand-in for the length probe: each example's image ends at the given token."""

    def __init__(self, ends: list[int], max_length: int):
        self.ends, self.max_length = ends, max_length

    def image_ends(self, indices: list[int]) -> list[tuple[int, int]]:
        return [(self.ends[i], IMAGE_TOKENS) for i in indices]


def test_most_examples_too_long_is_refused_and_some_are_warned_about():
    with pytest.raises(ProxyVError, match="3 of the first 4 examples are longer than --max-length 600"):
        distill_module.check_lengths(_Batcher([590, 700, 800, 900], 600), [0, 1, 2, 3], seed=0)
    heard = []
    distill_module.check_lengths(_Batcher([590, 595, 599, 900], 600), [0, 1, 2, 3], seed=0, log=heard.append)
    assert len(heard) == 1 and "1 of the first 4 examples" in heard[0] and "at least 900" in heard[0]
    distill_module.check_lengths(_Batcher([590] * 4, 600), [0, 1, 2, 3], seed=0, log=heard.append)
    assert len(heard) == 1, "nothing to say when every example fits"


def test_an_image_that_just_fits_trains_with_a_finite_loss(model_copy, tmp_path):
    """max_length ending right after the image leaves no text position for the KL term: the loss stays finite."""
    data = save_jsonl(tmp_path / "data", [QUESTIONS[i % 3] for i in range(4)])
    settings = DistillSettings(steps=1, batch_size=3, warmup_steps=1, eval_examples=1, max_length=IMAGE_TOKENS + 2)
    result = distill(model_copy, str(data), settings=settings, progress=False)
    assert result.steps == 1 and result.report["loss_curve"][0]["loss"] > 0


def test_held_out_examples_longer_than_max_length_are_skipped_not_generated(model_copy, tmp_path, monkeypatch):
    long = " ".join(["what"] * 3000)  # 3000 tokens: far beyond --max-length 700
    data = save_jsonl(tmp_path / "data", [QUESTIONS[i % 3] for i in range(6)] + [long, long])
    prompts: list[int] = []
    generate = evaluate_module.generate_answers

    def recording(model, processor, images, questions, *, max_new_tokens):
        prompts.extend(len(q.split()) for q in questions)
        assert max_new_tokens <= evaluate_module.MAX_NEW_TOKENS
        return generate(model, processor, images, questions, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(evaluate_module, "generate_answers", recording)
    settings = DistillSettings(steps=1, batch_size=4, warmup_steps=1, eval_examples=2, max_length=700,
                               train_split="train[:6]", eval_split="train[6:]")
    report = distill(model_copy, str(data), settings=settings, progress=False).report
    for side in ("before", "after"):
        assert report[side]["task"]["examples"] == 0
        assert report[side]["task"]["skipped"] == {"too_long": 2}
    assert prompts == [], "no generation over a prompt longer than --max-length"


@pytest.mark.parametrize("tokens", [0, -1, 10**6])
def test_generation_is_bounded(tokens):
    with pytest.raises(ProxyVError, match="max_new_tokens must be between 1 and"):
        evaluate_module.generate_answers(None, None, [], [], max_new_tokens=tokens)


# --- settings out of any sane range --------------------------------------------------------------------------------


BAD_SETTINGS = [
    (DistillSettings, {"steps": 10**29}, "--steps: Input should be less than or equal to 10000000"),
    (DistillSettings, {"steps": 10_000_001}, "--steps"),
    (DistillSettings, {"lr": float("inf")}, "--lr: Input should be a finite number"),
    (DistillSettings, {"lr": float("nan")}, "--lr: Input should be a finite number"),
    (DistillSettings, {"lr": float("-inf")}, "--lr"),
    (DistillSettings, {"lr": 2.0}, "--lr: Input should be less than or equal to 1"),
    (DistillSettings, {"weight_decay": float("inf")}, "--weight-decay"),
    (DistillSettings, {"vision_weight": float("nan")}, "--vision-weight: Input should be a finite number"),
    (DistillSettings, {"text_weight": 1e9}, "--text-weight"),
    (DistillSettings, {"kl_weight": float("inf")}, "--kl-weight"),
    (DistillSettings, {"vision_weight": 0, "text_weight": 0, "kl_weight": 0}, "--kl-weight: the vision, text and KL"),
    (DistillSettings, {"max_grad_norm": float("inf")}, "--max-grad-norm"),
    (DistillSettings, {"batch_size": 4097}, "--batch-size: Input should be less than or equal to 4096"),
    (DistillSettings, {"max_length": 2**20 + 1}, "--max-length: Input should be less than or equal to 1048576"),
    (DistillSettings, {"eval_examples": 10**6 + 1}, "--eval-examples"),
    (DistillSettings, {"steps": 10, "warmup_steps": 20}, r"--warmup-steps: must not exceed steps \(10\)"),
    (DistillSettings, {"warmup_steps": 10**8}, "--warmup-steps"),
    (DistillSettings, {"checkpoint_every": 10**8}, "--checkpoint-every"),
    (DistillSettings, {"gradient_accumulation": 10**6}, "--gradient-accumulation"),
    (DistillSettings, {"seed": -1}, "--seed"),
    (DistillSettings, {"seed": 2**64}, "--seed"),
    (BenchSection, {"batch_sizes": [10_000]}, "--batch-sizes: Input should be less than or equal to 1024"),
    (BenchSection, {"batch_sizes": [1, 0]}, "--batch-sizes: Input should be greater than or equal to 1"),
    (BenchSection, {"batch_sizes": list(range(1, 101))}, "--batch-sizes: List should have at most 64 items"),
    (BenchSection, {"images": [65]}, "--images: Input should be less than or equal to 64"),
    (BenchSection, {"text_tokens": 65_537}, "--text-tokens"),
    (BenchSection, {"repeats": 10_001}, "--repeats"),
    (BenchSection, {"warmup": 10**5}, "--warmup"),
    (EvalSection, {"limit": 10**7}, "--limit"),
    (EvalSection, {"batch_size": 10**5}, "--batch-size"),
    (ProxyVSection, {"start_layer": 10**6}, "--start-layer"),
    (ProxyVSection, {"start_layer": 2, "reduce_factor": 10**5}, "--reduce-factor"),
    (ProxyVSection, {"start_layer": 2, "learned_proxies": 10**9}, "--learned-proxies"),
    (ProxyVSection, {"start_layer": 2, "video_frames": 0}, "--video-frames"),
]


@pytest.mark.parametrize("section,values,message", BAD_SETTINGS,
                         ids=[f"{s.__name__}-{'-'.join(v)}-{i}" for i, (s, v, _) in enumerate(BAD_SETTINGS)])
def test_settings_out_of_bounds_are_one_line_errors(section, values, message):
    with pytest.raises(ProxyVError, match=message) as error:
        build(section, values)
    assert "\n" not in str(error.value) and len(str(error.value)) < 300


def test_the_bounds_themselves_are_accepted():
    build(DistillSettings, {"steps": 10_000_000, "lr": 1.0, "batch_size": 4096, "max_length": 2**20,
                            "warmup_steps": 10_000_000, "eval_examples": 10**6, "seed": 2**32 - 1})
    build(DistillSettings, {"steps": 10, "warmup_steps": 10})
    build(DistillSettings, {"steps": 2})  # the default warm-up (10) of a short run is cut short, not refused
    build(DistillSettings, {"kl_weight": 0, "text_weight": 0})
    build(BenchSection, {"batch_sizes": [1, 1024], "images": [64], "text_tokens": 65_536, "repeats": 10_000})


@pytest.mark.parametrize("override,message", [
    ("distill.steps=100000000000000000000000000000", "distill.steps: Input should be less than or equal to"),
    ("distill.lr=.inf", "distill.lr: Input should be a finite number"),
    ("distill.lr=.nan", "distill.lr: Input should be a finite number"),
    ("distill.text_weight=-.inf", "distill.text_weight"),
    ("distill.warmup_steps=500", "distill.warmup_steps: must not exceed steps (100)"),
    ("bench.batch_sizes=[1, 10000]", "bench.batch_sizes.1: Input should be less than or equal to 1024"),
    ("bench.images=[100]", "bench.images.0"),
    ("eval.limit=100000000", "eval.limit"),
    ("proxyv.learned_proxies=1000000000", "proxyv.learned_proxies"),
])
def test_recipe_values_out_of_bounds_are_one_line_errors(tmp_path, override, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"source": "builtin:llava-shapes"}, "proxyv": {"start_layer": 1},
                                  "distill": {"data": "shapes", "steps": 100}, "eval": {}, "bench": {}}))
    with pytest.raises(ProxyVError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(recipe, [override])
    assert message in one_line_error("validate", recipe, override)
    assert message in one_line_error("run", recipe, override)


@pytest.mark.parametrize("command,message", [
    (["bench", "{model}", "--batch-sizes", "10000"], "--batch-sizes: Input should be less than or equal to 1024"),
    (["bench", "{model}", "--images", "1000"], "--images"),
    (["bench", "{model}", "--text-tokens", "10000000"], "--text-tokens"),
    (["bench", "{model}", "--repeats", "1000000"], "--repeats"),
    (["distill", "{model}", "--data", "shapes", "--lr", "inf"], "--lr: Input should be a finite number"),
    (["distill", "{model}", "--data", "shapes", "--lr", "nan"], "--lr"),
    (["distill", "{model}", "--data", "shapes", "--steps", "100000000000"], "--steps"),
    (["distill", "{model}", "--data", "shapes", "--kl-weight", "-inf"], "--kl-weight"),
    (["eval", "{model}", "--batch-size", "100000"], "--batch-size"),
    (["eval", "{model}", "--limit", "100000000"], "--limit"),
])
def test_cli_options_out_of_bounds_are_one_line_errors(model_copy, command, message):
    before = files(model_copy)
    assert message in one_line_error(*[part.format(model=model_copy) for part in command])
    assert files(model_copy) == before


# --- image paths must stay inside the table's folder ---------------------------------------------------------------


@pytest.fixture
def table_folder(tmp_path) -> tuple[Path, Path]:
    """A table folder with one good image, and an image outside it (beside the folder)."""
    folder, outside = tmp_path / "table", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    random_image(0).save(folder / "ok.png")
    random_image(1).save(outside / "secret.png")
    return folder, outside


def _paths_table(folder: Path, fmt: str, paths: list) -> Path:
    if fmt == "jsonl":
        rows = [{"image": p, "question": "what"} for p in paths]
        (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder / "data.jsonl"
    if fmt == "struct-jsonl":  # {"path": ...} objects, as an image value without bytes
        rows = [{"image": {"path": p}, "question": "what"} for p in paths]
        (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder / "data.jsonl"
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        table = pa.table({"image": paths, "question": ["what"] * len(paths)})
    else:  # image-parquet: datasets' Image feature, {bytes: null, path}
        values = pa.array([{"bytes": None, "path": p} for p in paths],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": values, "question": ["what"] * len(paths)}).replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"},
                                                              "question": {"dtype": "string", "_type": "Value"}}}})})
    pq.write_table(table, folder / "data.parquet")
    return folder / "data.parquet"


ESCAPES = ["absolute", "etc-passwd", "dot-dot", "deep-dot-dot", "symlinked-file", "symlinked-folder", "nul-byte"]


def _escaping_path(kind: str, folder: Path, outside: Path) -> str:
    if kind == "symlinked-file":
        os.symlink(outside / "secret.png", folder / "link.png")
        return "link.png"
    if kind == "symlinked-folder":
        os.symlink(outside, folder / "more")
        return "more/secret.png"
    return {"absolute": str(outside / "secret.png"), "etc-passwd": "/etc/passwd", "dot-dot": "../outside/secret.png",
            "deep-dot-dot": "ok/../../outside/secret.png", "nul-byte": "ok\0.png"}[kind]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "struct-jsonl", "image-parquet"])
@pytest.mark.parametrize("kind", ESCAPES)
def test_an_image_path_that_leaves_the_table_folder_is_refused(table_folder, fmt, kind):
    folder, outside = table_folder
    path = _escaping_path(kind, folder, outside)
    table = _paths_table(folder, fmt, ["ok.png", path])
    with pytest.raises(ProxyVError, match=r"row 2 of .*data\.(jsonl|parquet) names the image .*outside the table's "
                                          r"folder") as error:
        load_data(str(table), split="train")
    assert "\n" not in str(error.value)


def test_the_cli_refuses_an_escaping_image_path_in_one_line(model_copy, table_folder):
    folder, outside = table_folder
    table = _paths_table(folder, "jsonl", ["ok.png", "../outside/secret.png"])
    line = one_line_error("distill", model_copy, "--data", table)
    assert "row 2" in line and "../outside/secret.png" in line


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "struct-jsonl", "image-parquet"])
def test_image_paths_inside_the_table_folder_are_read_from_it(table_folder, fmt, monkeypatch, tmp_path):
    folder, _ = table_folder
    (folder / "sub").mkdir()
    random_image(2).save(folder / "sub" / "two.png")
    os.symlink(folder / "sub" / "two.png", folder / "inner-link.png")
    monkeypatch.chdir(tmp_path)  # paths are relative to the table, not to the working folder
    table = _paths_table(folder, fmt, ["ok.png", "./sub/two.png", "sub/../ok.png", "inner-link.png", "missing.png"])
    data = load_data(str(table), split="train")
    decoded = [data.example(i)[0] is not None for i in range(len(data))]
    assert decoded == [True, True, True, True, False]  # the missing file is skipped as undecodable, not an error
