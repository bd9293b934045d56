"""`proxyv_convert.convert`: streamed conversion of tiny LLaVA checkpoints, checked against transformers."""

from __future__ import annotations

import functools
import json
import shutil
import struct
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import IMAGE_TOKEN_ID, image_prompt, save_tiny_llava, tiny_llava_config
from transformers import AutoProcessor, LlamaConfig, LlavaForConditionalGeneration

from proxyv_convert import convert as convert_module
from proxyv_convert import safetensors_stream
from proxyv_convert.config import read_recipe
from proxyv_convert.convert import convert
from proxyv_convert.errors import ProxyVError
from proxyv_convert.families import FAMILIES
from proxyv_convert.model_folder import canonical_code, load_model
from proxyv_convert.remote.modeling_proxyv import ProxyVModules

PROXYV = "model.proxyv."


def raw_tensors(folder: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes), parsed independently of the code under test."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        data = (folder / name).read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        assert header.pop("__metadata__") == {"format": "pt"}
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            tensors[key] = (entry["dtype"], entry["shape"], data[8 + length + begin : 8 + length + end])
    return tensors


def native_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The source's tensors under native names, as transformers itself loads them (the oracle for key renaming)."""
    return LlavaForConditionalGeneration.from_pretrained(folder, dtype="auto").state_dict()


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def logits(model, disabled: bool = False) -> torch.Tensor:
    ids = torch.tensor([image_prompt(["user what is", None, "the colour of the circle"])])
    pixels = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if disabled:
            with model.proxyv_disabled():
                return model(input_ids=ids, pixel_values=pixels).logits
        return model(input_ids=ids, pixel_values=pixels).logits


@functools.cache
def _tiny(root: Path, text: str, vision: str, max_shard_size: str | None) -> Path:
    name = f"{text}-{vision}-{max_shard_size or 'single'}"
    return save_tiny_llava(root / name, text=text, vision=vision, max_shard_size=max_shard_size)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(text="llama", vision="clip", max_shard_size=None) -> a saved tiny LLaVA checkpoint (built once)."""
    root = tmp_path_factory.mktemp("sources")

    def make(text: str = "llama", vision: str = "clip", max_shard_size: str | None = None) -> Path:
        return _tiny(root, text, vision, max_shard_size)

    return make


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode) for p in root.rglob("*")
    }


@pytest.mark.parametrize(
    ("text", "vision"), [("llama", "clip"), ("mistral", "clip"), ("qwen2", "clip"), ("llama", "siglip")]
)
def test_convert_keeps_original_tensors_and_computes_the_same(tiny, tmp_path, text, vision):
    source = tiny(text, vision)
    result = convert(str(source), tmp_path / "m", layer=2, reduce_factor=4, progress=False)

    out = raw_tensors(tmp_path / "m")
    original = native_state_dict(source)
    for name, tensor in original.items():
        assert out[name][2] == as_bytes(tensor), f"{name} changed"
    added = {name for name in out if name.startswith(PROXYV)}
    assert set(out) == set(original) | added
    assert len(added) == result.tensors_added == 7 * 2  # 7 tensors per VisionMLP, layers 2 and 3
    assert result.tensors_copied == len(original)
    assert all(
        out[f"{PROXYV}vision_mlps.{i}.out.weight"][2] == bytes(len(out[f"{PROXYV}vision_mlps.{i}.out.weight"][2]))
        for i in (2, 3)
    )

    model = load_model(tmp_path / "m", dtype=torch.float32)
    reference = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    assert torch.equal(logits(model, disabled=True), logits(reference))
    assert torch.isfinite(logits(model)).all()


def test_source_weights_load_into_converted_model_missing_exactly_the_proxyv_keys(tiny, tmp_path):
    convert(str(tiny()), tmp_path / "m", layer=1, progress=False)
    model = load_model(tmp_path / "m")
    loaded = model.load_state_dict(native_state_dict(tiny()), strict=False)
    assert loaded.unexpected_keys == []
    assert loaded.missing_keys and all(key.startswith(PROXYV) for key in loaded.missing_keys)
    assert set(loaded.missing_keys) == {name for name, _ in model.proxyv_parameters()}


def test_output_folder_files(tiny, tmp_path):
    source = tiny()
    convert(str(source), tmp_path / "m", layer=2, reduce_factor=6, progress=False)
    out = tmp_path / "m"

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == FAMILIES["llava"].auto_map()
    assert config["architectures"] == ["ProxyVLlavaForConditionalGeneration"]
    assert config["model_type"] == "proxyv_llava"
    assert (config["proxyv_start_layer"], config["proxyv_reduce_factor"]) == (2, 6)
    assert config["proxyv_base_model"] == str(source)
    for name, data in canonical_code().items():
        assert (out / name).read_bytes() == data
    copied = {"tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
              "generation_config.json"}  # fmt: skip
    assert {p.name for p in source.iterdir()} == copied | {"config.json", "model.safetensors"}
    for name in copied:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    weights = {"model-00001-of-00001.safetensors", "model-proxyv.safetensors", "model.safetensors.index.json"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        copied | weights | {"config.json", "recipe.yaml"} | set(canonical_code())
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k for k, v in index.items() if v == "model-proxyv.safetensors"} == {
        k for k in index if k.startswith("model.proxyv.")
    }, "the ProxyV tensors, and only they, are in a file of their own"
    assert AutoProcessor.from_pretrained(out).tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID

    sections, commands = read_recipe(out)
    assert commands == [f"proxyv convert {source} --layer 2 --reduce-factor 6 --dtype auto --out {out}"]
    assert sections["model"] == {"source": str(source), "revision": None, "dtype": "float32"}
    assert sections["proxyv"] == {"start_layer": 2, "reduce_factor": 6, "vision_mlp": "residual", "proxy": "spatial"}
    assert set(sections["provenance"]) == {"proxyv_version", "transformers_version", "torch_version", "created"}


def test_proxyv_tensors_equal_a_seeded_reset_of_the_whole_module(tiny, tmp_path):
    convert(str(tiny()), tmp_path / "m", layer=1, progress=False)
    model = load_model(tmp_path / "m")
    expected = ProxyVModules(model.config)
    torch.manual_seed(0)
    expected.reset_parameters(model.config.text_config.initializer_range)
    for name, param in expected.named_parameters():
        assert torch.equal(model.model.proxyv.get_parameter(name), param), name
    assert not torch.equal(*[model.model.proxyv.get_parameter(f"vision_mlps.{i}.fuse.weight") for i in (1, 2)])


def test_tied_embeddings_absent_from_the_source_stay_tied(tmp_path):
    config = tiny_llava_config()
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "tied")
    assert "language_model.lm_head.weight" not in raw_tensors(tmp_path / "tied")

    convert(str(tmp_path / "tied"), tmp_path / "m", layer=2, progress=False)
    assert "lm_head.weight" not in raw_tensors(tmp_path / "m")
    model = load_model(tmp_path / "m", dtype=torch.float32)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "tied", dtype=torch.float32).eval()
    assert torch.equal(logits(model, disabled=True), logits(reference))


def test_sharded_source_and_sharded_output(tiny, tmp_path):
    source = tiny(max_shard_size="200KB")
    assert len(list(source.glob("*.safetensors"))) > 1
    result = convert(str(source), tmp_path / "m", layer=2, progress=False, max_shard_size="300KB")

    out = tmp_path / "m"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == len(result.files) - 1 > 3
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 300_000 + 20_000 for p in shards)  # data limit + header
    tensors = raw_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(len(t[2]) for t in tensors.values())
    for name, tensor in native_state_dict(source).items():
        assert tensors[name][2] == as_bytes(tensor), name
    model = load_model(out, dtype=torch.float32)
    reference = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    assert torch.equal(logits(model, disabled=True), logits(reference))


def test_dtype_bfloat16_casts_every_tensor(tiny, tmp_path):
    source = tiny()
    convert(str(source), tmp_path / "m", layer=2, dtype="bfloat16", progress=False)

    tensors = raw_tensors(tmp_path / "m")
    assert {dtype for dtype, _, _ in tensors.values()} == {"BF16"}
    for name, tensor in native_state_dict(source).items():
        assert tensors[name][2] == as_bytes(tensor.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert read_recipe(tmp_path / "m")[0]["model"]["dtype"] == "bfloat16"
    model = load_model(tmp_path / "m")
    assert model.dtype == torch.bfloat16
    assert torch.isfinite(logits(model).float()).all()


def test_legacy_hub_layout_gives_the_same_output(tiny, tmp_path):
    """llava-hf checkpoints on the Hub keep the vision tower's `vision_model.` level and stale position_ids."""
    source = tiny()
    legacy = tmp_path / "legacy"
    shutil.copytree(source, legacy)
    tensors = {
        (key.replace("vision_tower.", "vision_tower.vision_model.", 1)): torch.frombuffer(
            bytearray(data), dtype=torch.float32
        ).reshape(shape)
        for key, (_, shape, data) in raw_tensors(source).items()
    }
    tensors["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    assert any(key.startswith("vision_tower.vision_model.encoder.") for key in tensors)
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})

    convert(str(source), tmp_path / "a", layer=2, progress=False)
    convert(str(legacy), tmp_path / "b", layer=2, progress=False)
    assert raw_tensors(tmp_path / "a") == raw_tensors(tmp_path / "b")


def test_convert_from_the_hub(tiny, tmp_path, local_hub, monkeypatch):
    api = huggingface_hub.HfApi(endpoint=local_hub.url)
    api.create_repo("local-user/tiny-llava")
    api.upload_folder(repo_id="local-user/tiny-llava", folder_path=tiny())
    download = functools.partial(
        huggingface_hub.snapshot_download, endpoint=local_hub.url, cache_dir=tmp_path / "cache"
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)

    with pytest.raises(ProxyVError, match="start layer 9 is out of range"):
        convert("local-user/tiny-llava", tmp_path / "m", layer=9, progress=False)
    assert (tmp_path / "cache").is_dir() and not list((tmp_path / "cache").rglob("*.safetensors"))  # config only

    result = convert("local-user/tiny-llava", tmp_path / "m", layer=2, progress=False)
    sha = local_hub.refs("local-user/tiny-llava")["main"]
    assert result.source == "local-user/tiny-llava"
    assert read_recipe(tmp_path / "m")[0]["model"] == {
        "source": "local-user/tiny-llava",
        "revision": sha,
        "dtype": "float32",
    }
    assert json.loads((tmp_path / "m" / "config.json").read_text())["proxyv_base_model"] == "local-user/tiny-llava"
    convert(str(tiny()), tmp_path / "local", layer=2, progress=False)
    assert raw_tensors(tmp_path / "m") == raw_tensors(tmp_path / "local")

    with pytest.raises(
        ProxyVError, match=r"'llava-hf/llava-1.5-7b' was not found .* did you mean 'llava-hf/llava-1.5-7b-hf'\?"
    ):
        convert("llava-hf/llava-1.5-7b", tmp_path / "x", layer=2, progress=False)
    with pytest.raises(ProxyVError, match="revision 'nope' of model 'local-user/tiny-llava' was not found"):
        convert("local-user/tiny-llava", tmp_path / "x", layer=2, revision="nope", progress=False)
    assert not (tmp_path / "x").exists()


def test_unreachable_hub_says_how_to_use_a_local_folder(tmp_path, monkeypatch):
    download = functools.partial(
        huggingface_hub.snapshot_download, cache_dir=tmp_path / "cache", endpoint="http://127.0.0.1:9"
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with pytest.raises(ProxyVError, match=r"could not reach the Hub .* pass a local folder"):
        convert("someone/model", tmp_path / "m", layer=1, progress=False)


def _truncated(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"
    path.write_bytes(bytes(data))


def _drop_a_tensor(folder: Path) -> None:
    tensors = raw_tensors(folder)
    del tensors["multi_modal_projector.linear_1.bias"]
    save_file({k: torch.frombuffer(bytearray(d), dtype=torch.float32).reshape(s) for k, (_, s, d) in tensors.items()},
              folder / "model.safetensors")  # fmt: skip


def _llama_only(folder: Path) -> None:
    (folder / "config.json").write_text(LlamaConfig(num_hidden_layers=2).to_json_string())


def _bin_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _custom_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "kwargs", "message"),
    [
        (
            _truncated,
            {},
            r"model.safetensors is not a valid safetensors file \(the header describes \d+ bytes but the file has \d+",
        ),
        (_corrupt_header, {}, r"model.safetensors is not a valid safetensors file \(header is not JSON"),
        (
            _drop_a_tensor,
            {},
            r"do not match its config: 1 missing tensors \(model.multi_modal_projector.linear_1.bias\)",
        ),
        (_llama_only, {}, r"is a 'llama' checkpoint; proxyv converts model types: llava"),
        (_bin_only, {}, r"has no safetensors weights; .* \(found pytorch_model.bin"),
        (
            _custom_code,
            {},
            r"needs custom code to read its config \(configuration_x.XConfig\); pass --trust-remote-code",
        ),
        (None, {"layer": 4}, r"start layer 4 is out of range: the model has 4 decoder layers \(0-3\)"),
        (
            None,
            {"reduce_factor": 5},
            r"reduce factor 5 does not divide the 24x24 vision grid; use one of 1, 2, 3, 4, 6, 8, 12, 24",
        ),
        (None, {"dtype": "int8"}, r"--dtype int8 is not one of auto, float32, bfloat16, float16"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tiny, tmp_path, damage, kwargs, message):
    source = shutil.copytree(tiny(), tmp_path / "source")
    if damage:
        damage(source)
    before = tree(tmp_path)
    with pytest.raises(ProxyVError, match=message) as error:
        convert(str(source), tmp_path / "m", **{"layer": 2, "progress": False, **kwargs})
    assert "\n" not in str(error.value)
    assert tree(tmp_path) == before


def test_output_inside_the_source_is_refused(tiny, tmp_path):
    source = shutil.copytree(tiny(), tmp_path / "source")
    before = tree(tmp_path)
    with pytest.raises(ProxyVError, match="is inside the source folder"):
        convert(str(source), source / "m", layer=2, progress=False)
    assert tree(tmp_path) == before


def test_interrupted_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    real = safetensors_stream.write_shard

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_stream, "write_shard", interrupted)
    before = tree(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny()), tmp_path / "new" / "parents" / "m", layer=2, progress=False)
    assert tree(tmp_path) == before

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("old model")
    before = tree(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny()), tmp_path / "m", layer=2, overwrite=True, progress=False)
    assert tree(tmp_path) == before


def test_overwrite_replaces_an_existing_folder(tiny, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.txt").write_text("old")
    with pytest.raises(ProxyVError, match="already exists; pass --overwrite"):
        convert(str(tiny()), tmp_path / "m", layer=2, progress=False)
    assert (tmp_path / "m" / "stale.txt").exists()

    convert(str(tiny()), tmp_path / "m", layer=2, overwrite=True, progress=False)
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert (tmp_path / "m" / "model-proxyv.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unwritable_output_is_refused(tiny, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert not (tmp_path / "file").is_dir()
    before = tree(tmp_path)
    with pytest.raises(ProxyVError, match=r"cannot create .*/file/m: .*/file is a file, not a folder"):
        convert(str(tiny()), tmp_path / "file" / "m", layer=2, progress=False)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_copy_and_cast_in_many_small_chunks_is_exact(tiny, tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(safetensors_stream, "COPY_CHUNK_BYTES", 1000)
    convert(str(tiny()), tmp_path / "m", layer=2, dtype=dtype, progress=False)
    tensors = raw_tensors(tmp_path / "m")
    for name, tensor in native_state_dict(tiny()).items():
        assert tensors[name][2] == as_bytes(tensor if dtype == "auto" else tensor.to(torch.bfloat16)), name


def test_key_rules_cover_every_layout():
    next_rules = FAMILIES["llava_next"].key_rules
    rules = functools.partial(convert_module.target_name, vision="", rules=next_rules)
    assert rules("language_model.lm_head.weight") == "lm_head.weight"
    assert (
        rules("language_model.model.layers.0.mlp.up_proj.weight") == "model.language_model.layers.0.mlp.up_proj.weight"
    )
    assert (
        rules("vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias")
        == "model.vision_tower.encoder.layers.0.mlp.fc1.bias"
    )
    assert (
        rules("vision_tower.embeddings.patch_embedding.weight")
        == "model.vision_tower.embeddings.patch_embedding.weight"
    )
    assert rules("multi_modal_projector.linear_1.weight") == "model.multi_modal_projector.linear_1.weight"
    assert rules("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert (
        convert_module.target_name("vision_tower.post_layernorm.bias", "vision_model.", next_rules)
        == "model.vision_tower.vision_model.post_layernorm.bias"
    )
    assert rules("image_newline") == "model.image_newline"  # LLaVA-NeXT
    assert rules("model.image_newline") == "model.image_newline"
    assert convert_module.target_name("image_newline", "", FAMILIES["llava"].key_rules) is None  # not LLaVA's
    assert rules("something_else") is None
