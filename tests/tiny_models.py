"""Tiny LLaVA checkpoints built in code (real transformers classes, random weights) for offline CPU tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2Config,
    SiglipVisionConfig,
)

WORDS = (
    ": or which user assistant what is the colour of shape in cell row column red green blue yellow circle square "
    "triangle how many left right above below a an yes no one two three four five six seven eight nine zero"
).split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
VOCAB = SPECIAL + WORDS + [f"w{i}" for i in range(200 - len(SPECIAL) - len(WORDS))]
IMAGE_TOKEN_ID = VOCAB.index("<image>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} :"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %} <image>{% else %} {{ item['text'] }}"
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} assistant :{% endif %}"
)


def tiny_llava_config(
    text: str = "llama",
    vision: str = "clip",
    *,
    grid: int = 24,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
) -> LlavaConfig:
    """A LLaVA config with a `grid` x `grid` vision token grid (24 -> 576 tokens, as LLaVA-1.5)."""
    patch = 4
    if vision == "clip":
        vision_config = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=grid * patch, patch_size=patch, projection_dim=32,
        )
        strategy = "default"
    elif vision == "siglip":
        vision_config = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=grid * patch, patch_size=patch,
        )
        strategy = "full"
    else:
        raise ValueError(vision)
    text_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text]
    text_config = text_class(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=len(VOCAB), max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=grid * grid,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2 if vision == "clip" else -1,
    )


def tiny_llava(seed: int = 0, **kwargs) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return _sharpened(LlavaForConditionalGeneration(tiny_llava_config(**kwargs)).eval())


def _sharpened(model):
    """Default init gives near-uniform logits; larger weights make the tests sensitive to real differences."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 0.5 / param.shape[1] ** 0.5)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def tiny_processor(config: LlavaConfig) -> LlavaProcessor:
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1 if config.vision_config.model_type == "clip_vision_model" else 0,
    )


def save_tiny_llava(path: Path, seed: int = 0, *, max_shard_size: str | None = None, **kwargs) -> Path:
    """Write a tiny LLaVA checkpoint with its processor, as `save_pretrained` writes one."""
    model = tiny_llava(seed, **kwargs)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kwargs)
    tiny_processor(model.config).save_pretrained(path)
    return Path(path)


def image_prompt(parts: list[str | None], grid: int = 24) -> list[int]:
    """Token ids of a prompt: each string is text (space separated words), each None one image's tokens."""
    ids: list[int] = [1]
    for part in parts:
        if part is None:
            ids += [IMAGE_TOKEN_ID] * (grid * grid)
        else:
            ids += [VOCAB.index(w) for w in part.split()]
    return ids


# --- LLaVA-NeXT (AnyRes) ---------------------------------------------------------------------------------------------

NEXT_GRID = 8  # tokens per crop side: 32-pixel crops in 4-pixel patches
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96]]


def tiny_llava_next_config(text: str = "llama", *, layers: int = 4, hidden: int = 64) -> LlavaNextConfig:
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=NEXT_GRID * 4, patch_size=4, projection_dim=32,
    )
    text_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text]
    text_config = text_class(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlavaNextConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_select_strategy="default", vision_feature_layer=-2,
    )


def tiny_llava_next(seed: int = 0, **kwargs) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    return _sharpened(LlavaNextForConditionalGeneration(tiny_llava_next_config(**kwargs)).eval())


def tiny_next_processor(config: LlavaNextConfig) -> LlavaNextProcessor:
    size = config.vision_config.image_size
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def save_tiny_llava_next(path: Path, seed: int = 0, **kwargs) -> Path:
    model = tiny_llava_next(seed, **kwargs)
    model.save_pretrained(path)
    tiny_next_processor(model.config).save_pretrained(path)
    return Path(path)


# --- LLaVA-OneVision and LLaVA-NeXT-Video (images and videos) --------------------------------------------------------

VIDEO_VOCAB = [*VOCAB[:-1], "<video>"]  # the last filler word becomes the video token; every other id is unchanged
VIDEO_TOKEN_ID = len(VOCAB) - 1
VIDEO_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if item['type'] == 'image' %} <image>", "{% if item['type'] == 'image' %} <image>"
    "{% elif item['type'] == 'video' %} <video>"
)
OV_GRID = 9  # odd, as SigLIP-384/14's 27: a video frame's grid is interpolated to ceil(9 / 2) = 5 per side
OV_PINPOINTS = [[36, 36], [36, 72], [72, 36], [72, 72], [108, 108]]
OV_ASPECT = "anyres_max_4"  # the 3x3-crop pinpoint (27x27 tokens) is shrunk, as anyres_max_9 shrinks OneVision's 6x6


def tiny_video_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VIDEO_VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tokenizer


def _text_config(text: str, layers: int, hidden: int):
    text_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text]
    return text_class(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def tiny_onevision_config(text: str = "qwen2", *, layers: int = 4, hidden: int = 64) -> LlavaOnevisionConfig:
    vision_config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=OV_GRID * 4, patch_size=4, vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision_config.to_dict(), text_config=_text_config(text, layers, hidden).to_dict(),
        image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID, image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio=OV_ASPECT, vision_feature_select_strategy="full", vision_feature_layer=-1,
    )


def tiny_onevision(seed: int = 0, **kwargs) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    return _sharpened(LlavaOnevisionForConditionalGeneration(tiny_onevision_config(**kwargs)).eval())


@contextlib.contextmanager
def _without_video_processor() -> Iterator[None]:
    """A video-capable processor built with `video_processor=None`: transformers checks every sub-processor's class,
    and without torchvision the video processor's class cannot even be looked up (a real one needs torchvision)."""
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, argument: None):
        yield


def tiny_onevision_processor(config: LlavaOnevisionConfig) -> LlavaOnevisionProcessor:
    """The image processor and tokenizer (no video processor: it needs torchvision; tests build video inputs)."""
    size = config.vision_config.image_size
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints,
    )
    with _without_video_processor():
        return LlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tiny_video_tokenizer(), num_image_tokens=OV_GRID * OV_GRID,
            vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=VIDEO_CHAT_TEMPLATE,
            vision_aspect_ratio=config.vision_aspect_ratio,
        )


def tiny_next_video_config(text: str = "llama", *, layers: int = 4, hidden: int = 64) -> LlavaNextVideoConfig:
    """LLaVA-NeXT's tiny AnyRes model plus video: each frame's 8x8 grid average-pooled to 4x4."""
    next_config = tiny_llava_next_config(text, layers=layers, hidden=hidden)
    return LlavaNextVideoConfig(
        vision_config=next_config.vision_config.to_dict(), text_config=next_config.text_config.to_dict(),
        image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID, image_grid_pinpoints=NEXT_PINPOINTS,
        vision_feature_select_strategy="default", vision_feature_layer=-2, spatial_pool_stride=2,
    )


def tiny_next_video(seed: int = 0, **kwargs) -> LlavaNextVideoForConditionalGeneration:
    torch.manual_seed(seed)
    return _sharpened(LlavaNextVideoForConditionalGeneration(tiny_next_video_config(**kwargs)).eval())


def tiny_next_video_processor(config: LlavaNextVideoConfig) -> LlavaNextVideoProcessor:
    size = config.vision_config.image_size
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    with _without_video_processor():
        return LlavaNextVideoProcessor(
            image_processor=image_processor, tokenizer=tiny_video_tokenizer(),
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=VIDEO_CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )


def video_tokens(model_config, frames: int) -> int:
    """Video tokens of one video of `frames` frames, as the family's processor counts them."""
    side = model_config.vision_config.image_size // model_config.vision_config.patch_size
    stride = getattr(model_config, "spatial_pool_stride", None)
    if stride is None:  # OneVision: frames interpolated to ceil(side / 2), one newline per video
        return frames * (-(-side // 2)) ** 2 + 1
    return frames * (side // stride) ** 2


VIDEO_MARK = VIDEO_VOCAB[-2]  # a plain word standing for a video in prompt text, see `expand_videos`


def expand_videos(batch: dict, config, frames: int, side: str = "left") -> dict:
    """A processor batch whose prompts hold the word VIDEO_MARK where a video goes, with each turned into the video
    tokens of a video of `frames` frames (the processors' video path needs torchvision) and the padding redone on
    `side`."""
    count, mark = video_tokens(config, frames), VIDEO_VOCAB.index(VIDEO_MARK)
    rows = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        real = ids[mask.bool()].tolist()
        expanded = []
        for token in real:
            expanded += [VIDEO_TOKEN_ID] * count if token == mark else [token]
        rows.append(expanded)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, place], mask[i, place] = torch.tensor(row), 1
    return {**batch, "input_ids": ids, "attention_mask": mask}
