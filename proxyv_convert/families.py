"""The model families proxyv converts: one entry each, holding everything the pipeline needs to know about it.

Adding a family means adding its ProxyV classes to `remote/` and one `Family` entry here; the pipeline modules
(convert, distill, evaluate, bench, push, card) ask the entry and never branch on a model type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .remote.configuration_proxyv import (
    ProxyVLlavaConfig,
    ProxyVLlavaNextConfig,
    ProxyVLlavaNextVideoConfig,
    ProxyVLlavaOnevisionConfig,
)
from .remote.modeling_proxyv import (
    ProxyVLlavaForConditionalGeneration,
    ProxyVLlavaModel,
    ProxyVLlavaNextForConditionalGeneration,
    ProxyVLlavaNextModel,
    ProxyVLlavaNextVideoForConditionalGeneration,
    ProxyVLlavaNextVideoModel,
    ProxyVLlavaOnevisionForConditionalGeneration,
    ProxyVLlavaOnevisionModel,
)
from .remote.processing_proxyv import ProxyVLlavaNextVideoProcessor, ProxyVLlavaOnevisionProcessor

# Source checkpoint key -> native key of the ProxyV model with head; the first matching rule wins. `{vision}` is
# "vision_model." when the installed transformers keeps that level in the vision tower, else "".
LLAVA_KEY_RULES = (
    (r"^language_model\.lm_head\.", "lm_head."),  # Hub (llava-hf) and transformers 5 save layout
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.(vision_model\.)?", "model.vision_tower.{vision}"),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^model\.vision_tower\.(vision_model\.)?", "model.vision_tower.{vision}"),  # native layout
    (r"^(model\.language_model\.|model\.multi_modal_projector\.|lm_head\.)", r"\1"),
)
LLAVA_NEXT_KEY_RULES = (
    (r"^image_newline$", "model.image_newline"),
    (r"^model\.image_newline$", "model.image_newline"),
    *LLAVA_KEY_RULES,
)
# LLaVA-OneVision and LLaVA-NeXT-Video checkpoints (llava-hf) use LLaVA-NeXT's layout; NeXT-Video's frame pooler has
# weights only in its "conv" mode.
LLAVA_NEXT_VIDEO_KEY_RULES = (
    (r"^(model\.)?vision_resampler\.", "model.vision_resampler."),
    *LLAVA_NEXT_KEY_RULES,
)

# (pixel_values, extra batch inputs, image tokens per image) of `count` synthetic images for a loaded model
SyntheticImages = Callable[[torch.nn.Module, int, torch.Generator], tuple[torch.Tensor, dict, int]]


def _llava_images(model, count: int, generator: torch.Generator) -> tuple[torch.Tensor, dict, int]:
    """One crop per image: the vision tower's grid (or the learned proxies' token count)."""
    from .remote.configuration_proxyv import vision_grid

    config = model.config
    size = config.vision_config.image_size
    per_image = config.proxyv_grid**2 if config.proxyv_proxy == "spatial" else vision_grid(config)[1]
    return torch.randn(count, 3, size, size, generator=generator), {}, per_image


def _llava_next_images(model, count: int, generator: torch.Generator) -> tuple[torch.Tensor, dict, int]:
    """Every image at the largest AnyRes resolution (the most crops: 4 + the base crop for the usual pinpoints)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    size = config.vision_config.image_size
    height, width = max(config.image_grid_pinpoints, key=lambda hw: hw[0] * hw[1])
    per_image = model.model.image_layout([height, width])[0]
    crops = image_size_to_num_patches([height, width], config.image_grid_pinpoints, size)
    pixel_values = torch.randn(count, crops, 3, size, size, generator=generator)
    return pixel_values, {"image_sizes": torch.tensor([[height, width]] * count)}, per_image


def _llava_onevision_images(model, count: int, generator: torch.Generator) -> tuple[torch.Tensor, dict, int]:
    """Every image at the largest AnyRes resolution, each counted as alone in its prompt (so it gets its crops: 36 +
    the base crop for OneVision's pinpoints, the high-resolution grid shrunk to `anyres_max_9`)."""
    pixel_values, extra, _ = _llava_next_images(model, count, generator)
    per_image = model.model.image_layout(extra["image_sizes"][0].tolist())[0]
    return pixel_values, {**extra, "batch_num_images": torch.ones(count, dtype=torch.long)}, per_image


@dataclass(frozen=True)
class Family:
    """What the pipeline needs to know about one model family."""

    model_type: str  # the source checkpoint's model_type
    config: type  # the ProxyV config class
    base: type  # the ProxyV model without head (AutoModel)
    head: type  # the ProxyV model with its language-model head (AutoModelForImageTextToText)
    key_rules: tuple[tuple[str, str], ...]  # checkpoint key -> native key (see LLAVA_KEY_RULES)
    image_inputs: tuple[str, ...]  # processor outputs a forward with images needs beside the token ids and mask
    synthetic_images: SyntheticImages  # benchmark inputs
    label: str  # the model card's architecture row
    tags: tuple[str, ...]  # the model card's Hub tags for the family
    proxies_note: str  # the model card's proxy row, after the per-grid count ("" when nothing to add)
    video: bool = False  # prompts may hold videos (`pixel_values_videos`); their proxies may span frames
    video_inputs: tuple[str, ...] = ()  # processor outputs a forward with videos needs beside the token ids and mask
    # The processor class its checkpoints load with (remote/processing_proxyv.py, written into processor_config.json's
    # auto_map): None for transformers' own, which loads everywhere
    processor: type | None = None
    vllm: str = ""  # its model class for vLLM in vllm_model.py ("": vLLM serving not supported)

    def video_settings(self, video_frames: int) -> dict:
        """The ProxyV config fields of the frames per video proxy group (`proxyv.video_frames`); ValueError for a
        family without video when it asks for groups of frames."""
        if self.video:
            return {"proxyv_video_frames": video_frames}
        if video_frames != 1:
            raise ValueError(f"video_frames {video_frames} applies to video families only; '{self.model_type}' "
                             "takes no video (use 1)")
        return {}

    @property
    def proxyv_model_type(self) -> str:
        return self.config.model_type

    def auto_map(self) -> dict[str, str]:
        """The `auto_map` of the family's config.json: where transformers finds the classes in the code files."""
        return {
            "AutoConfig": f"configuration_proxyv.{self.config.__name__}",
            "AutoModel": f"modeling_proxyv.{self.base.__name__}",
            "AutoModelForImageTextToText": f"modeling_proxyv.{self.head.__name__}",
        }

    def visual_token_ids(self, config) -> tuple[int, ...]:
        """The ids of the tokens that stand for image (and video) features in a prompt of this family's config."""
        return (config.image_token_id, *((config.video_token_id,) if self.video else ()))

    def processor_auto_map(self) -> dict[str, str]:
        """The `auto_map` of the family's processor config ({} when transformers' own processor serves it)."""
        return {"AutoProcessor": f"processing_proxyv.{self.processor.__name__}"} if self.processor else {}


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(
            model_type="llava", config=ProxyVLlavaConfig, base=ProxyVLlavaModel,
            head=ProxyVLlavaForConditionalGeneration, key_rules=LLAVA_KEY_RULES, image_inputs=("pixel_values",),
            synthetic_images=_llava_images, label="LLaVA", tags=("llava",), proxies_note="",
            vllm="ProxyVLlavaForConditionalGeneration",
        ),
        Family(
            model_type="llava_next", config=ProxyVLlavaNextConfig, base=ProxyVLlavaNextModel,
            head=ProxyVLlavaNextForConditionalGeneration, key_rules=LLAVA_NEXT_KEY_RULES,
            image_inputs=("pixel_values", "image_sizes"), synthetic_images=_llava_next_images,
            label="LLaVA-NeXT (AnyRes crops, newline tokens computed like text)", tags=("llava", "llava_next"),
            proxies_note=" per crop grid; the high-resolution grid is downsampled by the same factor",
            vllm="ProxyVLlavaNextForConditionalGeneration",
        ),
        Family(
            model_type="llava_onevision", config=ProxyVLlavaOnevisionConfig, base=ProxyVLlavaOnevisionModel,
            head=ProxyVLlavaOnevisionForConditionalGeneration, key_rules=LLAVA_NEXT_KEY_RULES,
            image_inputs=("pixel_values", "image_sizes", "batch_num_images"),
            synthetic_images=_llava_onevision_images,
            label="LLaVA-OneVision (AnyRes crops up to anyres_max_9, newline tokens computed like text; video)",
            tags=("llava", "llava_onevision", "video-text-to-text"),
            proxies_note=" per crop grid and per video frame group; the high-resolution grid and the frames are "
            "downsampled by the same factor", video=True, video_inputs=("pixel_values_videos",),
            processor=ProxyVLlavaOnevisionProcessor,
        ),
        Family(
            model_type="llava_next_video", config=ProxyVLlavaNextVideoConfig, base=ProxyVLlavaNextVideoModel,
            head=ProxyVLlavaNextVideoForConditionalGeneration, key_rules=LLAVA_NEXT_VIDEO_KEY_RULES,
            image_inputs=("pixel_values", "image_sizes"), synthetic_images=_llava_next_images,
            label="LLaVA-NeXT-Video (AnyRes crops, newline tokens computed like text; video)",
            tags=("llava", "llava_next_video", "video-text-to-text"),
            proxies_note=" per crop grid and per video frame group; the high-resolution grid and the frames are "
            "downsampled by the same factor", video=True, video_inputs=("pixel_values_videos",),
            processor=ProxyVLlavaNextVideoProcessor,
        ),
    )
}
PROXYV_FAMILIES: dict[str, Family] = {family.proxyv_model_type: family for family in FAMILIES.values()}


def family_of(config) -> Family:
    """The family of a config (a source config, a ProxyV config, or their config.json as a dict)."""
    model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
    family = FAMILIES.get(model_type) or PROXYV_FAMILIES.get(model_type)
    if family is None:
        raise KeyError(f"'{model_type}' is not a model type proxyv knows ({', '.join(FAMILIES)})")
    return family
