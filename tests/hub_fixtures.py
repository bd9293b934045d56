"""Hub-shaped fixtures for end-to-end tests: tiny LLaVA / LLaVA-NeXT checkpoints laid out like the `llava-hf/*` repos
on the Hugging Face Hub, and a VQA dataset laid out like `merve/vqav2-small`, published to a `LocalHub`.

Why not `save_pretrained`: transformers 5.x saves a LLaVA vision tower as `vision_tower.<...>`, without the
`vision_model.` level that every llava-hf checkpoint has (`vision_tower.vision_model.<...>`, written by transformers
4.36-4.39 when the tower was a `CLIPVisionModel`), and writes a 5.x-style config.json (`dtype`, `rope_parameters`).
A user converting `llava-hf/llava-1.5-7b-hf` gets the Hub's layout, so that is what these fixtures write: the keys
are mapped explicitly (`llava_hf_state_dict`) and config.json uses the field names of the Hub's files.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hub_server import LocalHub
from huggingface_hub import HfApi
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tiny_models import (
    VIDEO_CHAT_TEMPLATE,
    tiny_llava,
    tiny_llava_next,
    tiny_next_processor,
    tiny_next_video,
    tiny_next_video_processor,
    tiny_onevision,
    tiny_onevision_processor,
    tiny_processor,
)
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, PreTrainedConfig

# The top-level key prefixes of every tensor in a llava-hf checkpoint.
LLAVA_HF_PREFIXES = (
    "language_model.model.",
    "language_model.lm_head.",
    "vision_tower.vision_model.",
    "multi_modal_projector.",
    "image_newline",
)
# transformers 5.x state_dict name -> llava-hf Hub name, by prefix; the first match wins. The second rule covers a
# transformers that keeps `vision_model.` inside the tower (4.x), so that the level is never doubled.
STATE_DICT_TO_LLAVA_HF = (
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)
FAMILIES = ("llava", "llava_next", "llava_onevision", "llava_next_video")
VIDEO_FAMILIES = ("llava_onevision", "llava_next_video")  # processors with a video processor (needs torchvision)
# What the Hub repos name: their config.json's transformers_version and the model card's paper.
HUB_TRANSFORMERS_VERSION = {"llava": "4.36.0.dev0", "llava_next": "4.39.0.dev0", "llava_onevision": "4.45.0.dev0",
                            "llava_next_video": "4.42.0.dev0"}
ARXIV = {"llava": "2304.08485", "llava_next": "2310.03744", "llava_onevision": "2408.03326",
         "llava_next_video": "2310.03744"}
TEXT_MODELS = {  # text model_type -> (architecture, the base model llava-hf's text_config names)
    "llama": ("LlamaForCausalLM", "lmsys/vicuna-7b-v1.5"),
    "mistral": ("MistralForCausalLM", "mistralai/Mistral-7B-Instruct-v0.2"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen/Qwen2-7B-Instruct"),
}
TEXT_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "hidden_size", "intermediate_size",
             "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers",
             "num_key_value_heads", "rms_norm_eps", "vocab_size")  # fmt: skip
VISION_KEYS = ("hidden_size", "image_size", "intermediate_size", "model_type", "num_attention_heads",
               "num_hidden_layers", "patch_size", "projection_dim")  # fmt: skip

if TYPE_CHECKING:
    from datasets import Features

LlavaModel = LlavaForConditionalGeneration | LlavaNextForConditionalGeneration

# --- checkpoints -----------------------------------------------------------------------------------------------------


def llava_hf_state_dict(model: LlavaModel) -> dict[str, torch.Tensor]:
    """`model`'s tensors under the llava-hf Hub names (see `STATE_DICT_TO_LLAVA_HF`): detached contiguous copies,
    so that safetensors can save them (no shared storage even if embeddings were tied)."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for name, tensor in state.items():
        rule = next(((old, new) for old, new in STATE_DICT_TO_LLAVA_HF if name.startswith(old)), None)
        if rule is None:
            raise ValueError(f"no llava-hf name for state_dict key {name!r}")
        hub_name = rule[1] + name[len(rule[0]):]
        if hub_name in out:
            raise ValueError(f"{name!r} maps to {hub_name!r}, which another key already took")
        out[hub_name] = tensor.detach().clone().contiguous()
    assert len(out) == len(state), (len(out), len(state))
    return out


def _text_config(text: PreTrainedConfig) -> dict[str, Any]:
    """text_config as llava-hf writes it: the base model's name, architecture and the fields that differ from the
    defaults, with the 4.x names (`torch_dtype`, a flat `rope_theta`) instead of 5.x's `dtype`/`rope_parameters`."""
    architecture, base = TEXT_MODELS[text.model_type]
    out: dict[str, Any] = {"_name_or_path": base, "architectures": [architecture]}
    out.update({key: getattr(text, key) for key in TEXT_KEYS})
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"llava-hf configs have plain RoPE; got {rope}")
    out["rope_theta"] = rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))
    if text.model_type == "mistral":
        out["sliding_window"] = text.sliding_window
    out["torch_dtype"] = "float32"
    return dict(sorted(out.items()))


def _vision_config(vision: PreTrainedConfig) -> dict[str, Any]:
    """vision_config as llava-hf writes it (CLIP ViT-L/14-336 fields, its unused `vocab_size` included)."""
    out = {key: getattr(vision, key) for key in VISION_KEYS if hasattr(vision, key)}
    if vision.model_type == "clip_vision_model":
        out["vocab_size"] = 32000
    if vision.model_type == "siglip_vision_model":  # OneVision's SigLIP without its pooling head
        out["vision_use_head"] = vision.vision_use_head
    return dict(sorted(out.items()))


def llava_hf_config(model: LlavaModel) -> dict[str, Any]:
    """config.json of a llava-hf repo (`llava-hf/llava-1.5-7b-hf`, `llava-hf/llava-v1.6-*-hf`) for `model`'s
    config: the same keys as the Hub's files, with this model's values."""
    config = model.config
    family = config.model_type
    if family not in FAMILIES:
        raise ValueError(f"not a LLaVA / LLaVA-NeXT model: {family}")
    out: dict[str, Any] = {
        "architectures": [type(model).__name__],
        "ignore_index": -100,
        "image_token_index": config.image_token_index,
        "model_type": family,
        "projector_hidden_act": config.projector_hidden_act,
        "text_config": _text_config(config.text_config),
        "torch_dtype": "float32",
        "transformers_version": HUB_TRANSFORMERS_VERSION[family],
        "vision_config": _vision_config(config.vision_config),
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vocab_size": config.text_config.vocab_size,
    }
    if family == "llava":  # LLaVA-1.5 names its pad token and untied head; NeXT relies on the defaults
        out["pad_token_id"] = config.text_config.pad_token_id
        out["tie_word_embeddings"] = bool(config.tie_word_embeddings)
        if config.image_seq_length != 576:  # the Hub's LLaVA-1.5 relies on the default
            out["image_seq_length"] = config.image_seq_length
    elif config.tie_word_embeddings:
        out["tie_word_embeddings"] = True
    if family != "llava":
        out["image_grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints]
        out["use_image_newline_parameter"] = True
    if family in VIDEO_FAMILIES:
        out["video_token_index"] = config.video_token_index
    if family == "llava_onevision":
        out["vision_aspect_ratio"] = config.vision_aspect_ratio
    if family == "llava_next_video":
        out.update(spatial_pool_mode=config.spatial_pool_mode, spatial_pool_stride=config.spatial_pool_stride)
    if not getattr(config, "multimodal_projector_bias", True):
        out["multimodal_projector_bias"] = False
    return dict(sorted(out.items()))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` (the Hub's
    sharded layout: `metadata.total_size` in bytes, `weight_map` key -> file)."""
    if shards < 1 or shards > len(tensors):
        raise ValueError(f"shards must be in 1..{len(tensors)}, got {shards}")
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata=metadata)
        return
    keys = sorted(tensors)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = keys[i * len(keys) // shards: (i + 1) * len(keys) // shards]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(path / name), metadata=metadata)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(path / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _model_card(family: str, license: str) -> str:
    """A llava-hf-style README.md: YAML front matter (licence, pipeline tag, paper), then a short body."""
    title = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-Onevision",
             "llava_next_video": "LLaVA-NeXT-Video"}[family]
    return (
        f"---\nlanguage:\n- en\npipeline_tag: image-text-to-text\ninference: false\narxiv: {ARXIV[family]}\n"
        f"license: {license}\ntags:\n- vision\n- image-text-to-text\n---\n\n# {title} Model Card (tiny test copy)\n\n"
        "Random weights in the file layout of the llava-hf repos, for offline tests.\n"
    )


def save_llava_hf(
    path: Path,
    family: str = "llava",
    *,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 64,
    license: str = "llama2",
    shards: int = 1,
) -> Path:
    """Write a complete llava-hf-style checkpoint folder of the tiny `family` model (`tiny_llava`: 24x24 grid, 576
    image tokens; `tiny_llava_next`: AnyRes) built from `seed`: config.json, the weights under the Hub's key names,
    processor and tokenizer files, generation_config.json and a README.md whose front matter names `license`."""
    if family == "llava":
        model: LlavaModel = tiny_llava(seed, layers=layers, hidden=hidden)
        processor = tiny_processor(model.config)
    elif family == "llava_next":
        model = tiny_llava_next(seed, layers=layers, hidden=hidden)
        processor = tiny_next_processor(model.config)
    elif family == "llava_onevision":
        model = tiny_onevision(seed, layers=layers, hidden=hidden)
        processor = tiny_onevision_processor(model.config)
    elif family == "llava_next_video":
        model = tiny_next_video(seed, layers=layers, hidden=hidden)
        processor = tiny_next_video_processor(model.config)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if family in VIDEO_FAMILIES:
        _save_video_processor(path, processor)
    else:
        processor.save_pretrained(path)
    _write_json(path / "config.json", llava_hf_config(model))
    text = model.config.text_config
    _write_json(path / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id, "transformers_version": HUB_TRANSFORMERS_VERSION[family],
    })  # fmt: skip
    _write_weights(path, llava_hf_state_dict(model), shards)
    (path / "README.md").write_text(_model_card(family, license))
    return path


def randomize_proxyv(folder: Path, seed: int = 1) -> None:
    """Random ProxyV tensors in a converted folder (norm weights around 1; a fresh conversion's VisionMLPs start at
    zero), so that ProxyV changes the outputs."""
    path = folder / "model-proxyv.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        noise = torch.randn(tensor.shape, generator=generator) * 0.3 / tensor.shape[-1] ** 0.5
        one = 1.0 if name.endswith(("norm_vision.weight", "norm_proxy.weight")) else 0.0
        tensors[name] = (noise + one).to(tensor.dtype).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def _save_video_processor(path: Path, processor) -> None:
    """The processor files of a llava-hf video-family repo. transformers cannot save (or load) these processors without
    torchvision, for want of their video processor: the parts are written one by one, with the Hub's file names."""
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    fields = {key: getattr(processor, key) for key in ("image_token", "video_token", "num_image_tokens",
                                                      "vision_aspect_ratio", "patch_size",
                                                      "vision_feature_select_strategy", "num_additional_image_tokens")
              if getattr(processor, key, None) is not None}
    _write_json(path / "processor_config.json", {"processor_class": type(processor).__name__, **fields})
    _write_json(path / "chat_template.json", {"chat_template": VIDEO_CHAT_TEMPLATE})
    # every setting, as the Hub's files hold them (the image processor's: the tiny frames are its crops)
    images = processor.image_processor
    video_class = type(processor).__name__.replace("Processor", "VideoProcessor")
    settings = {key: getattr(images, key) for key in ("do_convert_rgb", "do_resize", "resample", "do_center_crop",
                                                      "do_rescale", "rescale_factor", "do_normalize")}
    settings.update(size=dict(images.size), image_mean=list(images.image_mean), image_std=list(images.image_std))
    if getattr(images, "crop_size", None):
        settings["crop_size"] = dict(images.crop_size)
    _write_json(path / "video_preprocessor_config.json", {
        "video_processor_type": video_class, "processor_class": type(processor).__name__,
        **{k: int(v) if k == "resample" else v for k, v in settings.items() if v is not None}})


def publish_folder(hub: LocalHub, repo_id: str, folder: Path, repo_type: str = "model") -> str:
    """Create `repo_id` on `hub` and upload `folder` with the real `HfApi` client, as a user would;
    returns the commit sha. Sends the hub's token when it has one."""
    api = HfApi(endpoint=hub.url, token=hub.token or False)
    api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type,
                             commit_message=f"Upload {Path(folder).name}")
    return info.oid


# --- VQA dataset -----------------------------------------------------------------------------------------------------

VQA_SIZE = 48  # image side, pixels
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 30)}
SHAPES = ("circle", "square", "triangle")
VQA_COLUMNS = ("image", "question", "multiple_choice_answer")


def _draw(shape: str, colour: str, cx: int, cy: int, r: int, background: tuple[int, int, int]) -> bytes:
    """PNG bytes of one `colour` `shape` of radius `r` centred at (cx, cy) on a plain `background`."""
    image = Image.new("RGB", (VQA_SIZE, VQA_SIZE), background)
    draw = ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def vqa_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows with merve/vqav2-small's columns: `image` ({"bytes": PNG, "path": None}, one coloured shape on a grey
    background), `question` and `multiple_choice_answer`, in words the tiny tokenizer knows (`tiny_models.VOCAB`).
    Questions ask the colour, the shape, yes/no about the colour, or left/right; deterministic for `seed`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        side = rng.choice(("left", "right"))
        cx = rng.randint(10, 16) if side == "left" else rng.randint(32, 38)
        cy, r = rng.randint(12, 36), rng.randint(7, 9)
        grey = rng.randint(90, 160)
        kind = i % 4
        if kind == 0:
            question, answer = f"what is the colour of the {shape}", colour
        elif kind == 1:
            question, answer = f"which shape is {colour}", shape
        elif kind == 2:
            asked = rng.choice(sorted(COLOURS))
            question, answer = f"is the {shape} {asked}", "yes" if asked == colour else "no"
        else:
            question, answer = f"is the {shape} left or right", side
        png = _draw(shape, colour, cx, cy, r, (grey, grey, grey))
        rows.append({"image": {"bytes": png, "path": None}, "question": question, "multiple_choice_answer": answer})
    return rows


def vqa_features() -> Features:
    """The `datasets.Features` of the rows: an `Image()` column and two strings."""
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    return Features({"image": ImageFeature(), "question": Value("string"), "multiple_choice_answer": Value("string")})


def save_vqa_parquet(path: Path, n: int, seed: int = 0) -> Path:
    """Write `vqa_rows(n, seed)` as one parquet file the way `datasets` writes Hub shards (the `huggingface` schema
    metadata carries the features, so `image` reads back as an `Image()` column)."""
    from datasets import Dataset

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(vqa_rows(n, seed), features=vqa_features()).to_parquet(str(path))
    return path


def _dataset_card(split: str, n: int, num_bytes: int, download_size: int) -> str:
    """README.md front matter as `push_to_hub` writes it: `dataset_info` (features, splits) and `configs`."""
    return (
        "---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: question\n    dtype: string\n"
        "  - name: multiple_choice_answer\n    dtype: string\n  splits:\n"
        f"  - name: {split}\n    num_bytes: {num_bytes}\n    num_examples: {n}\n"
        f"  download_size: {download_size}\n  dataset_size: {num_bytes}\n"
        f"configs:\n- config_name: default\n  data_files:\n  - split: {split}\n    path: data/{split}-*\n---\n"
    )


def publish_vqa_dataset(
    hub: LocalHub, repo_id: str = "merve/vqav2-small", n: int = 24, split: str = "validation", seed: int = 0
) -> str:
    """Publish `vqa_rows(n, seed)` as dataset `repo_id` in the Hub's parquet layout
    (`data/<split>-00000-of-00001.parquet` and a README.md with `dataset_info`); returns the commit sha."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="vqa-") as tmp:
        folder = Path(tmp)
        shard = save_vqa_parquet(folder / "data" / f"{split}-00000-of-00001.parquet", n, seed)
        num_bytes = pq.read_table(shard).nbytes
        (folder / "README.md").write_text(_dataset_card(split, n, num_bytes, shard.stat().st_size))
        return publish_folder(hub, repo_id, folder, repo_type="dataset")
