"""Turning (image or video, prompt, answer) examples into model inputs with the model's own processor and chat
template."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from .data import ImageTextData, TextOnly, Visual
from .errors import ProxyVError
from .video import Video, same_length, with_frame_processor


def chat_text(processor: ProcessorMixin, prompt: str, answer: str | None = None, visual: Visual | None = None) -> str:
    """The prompt (its image or video, then the question) and, when known, the answer, in the processor's chat
    template. `visual` says what the prompt shows (an image when not given)."""
    content = [] if isinstance(visual, TextOnly) else [{"type": "video" if isinstance(visual, Video) else "image"}]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
    if answer is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages)


def encode(processor: ProcessorMixin, visuals: list[Visual], texts: list[str], padding_side: str = "right"
           ) -> BatchFeature:
    """The processor's batch of prompts `texts`, each showing its visual (an image, a video or nothing). The videos of
    a batch are cut to one frame count (evenly spaced frames of the shortest); where the processor has no video
    processor, videos go through the data loader's (`video.FrameProcessor`)."""
    images = [[v] if isinstance(v, Image.Image) else [] for v in visuals]
    videos = same_length([v for v in visuals if isinstance(v, Video)])
    processor = with_frame_processor(processor)
    if videos and getattr(processor, "video_processor", None) is None:
        raise ProxyVError(
            "the data holds videos, and this processor cannot process them (it needs torchvision, or load it with "
            "proxyv_convert.model_folder.load_processor)" if hasattr(processor, "video_processor") else
            "the data holds videos, and this model takes none (only LLaVA-OneVision and LLaVA-NeXT-Video models "
            "do); use data without videos"
        )
    return processor(
        images=images if any(images) else None, videos=[list(v.frames) for v in videos] or None, text=texts,
        padding=True, padding_side=padding_side, return_tensors="pt",
    )


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask and the family's image inputs (pixel_values, ...)
    image_mask: torch.Tensor  # (B, T) bool: image tokens
    used: int  # examples in the batch
    skipped_images: int  # examples dropped because their image did not decode
    skipped_long: int  # examples dropped because the image would not fit in max_length


class Batcher:
    """Builds right-padded batches (teacher-forced sequences) from example indices of one split."""

    def __init__(self, data: ImageTextData, processor: ProcessorMixin, image_token_id: int | tuple[int, ...],
                 max_length: int, image_inputs: tuple[str, ...], video_inputs: tuple[str, ...] = ()):
        self.data = data
        self.image_inputs = image_inputs  # the processor outputs the model's forward needs with the images
        self.video_inputs = video_inputs  # ... and with the videos
        self.processor = processor
        # the tokens that stand for image (and video) features
        self.token_ids = torch.tensor(image_token_id if isinstance(image_token_id, tuple) else (image_token_id,))
        self.max_length = max_length

    def __call__(self, indices: list[int]) -> Batch:
        visuals: list[Visual] = []
        texts: list[str] = []
        skipped_images = 0
        for index in indices:
            visual, prompt, answer = self.data.example(index)
            if visual is None:
                skipped_images += 1
                continue
            visuals.append(visual)
            texts.append(chat_text(self.processor, prompt, answer, visual))
        if not visuals:
            return Batch({}, torch.zeros(0, 0, dtype=torch.bool), 0, skipped_images, 0)
        inputs = encode(self.processor, visuals, texts)
        keep, skipped_long = self._fit(inputs["input_ids"])
        width = min(int(inputs["attention_mask"][keep].sum(1).max()) if keep.any() else 0, self.max_length)
        tokens = {k: inputs[k][keep, :width] for k in ("input_ids", "attention_mask")}
        # pixel inputs are per image (or video), a few (OneVision's image counts) per example
        per_image = keep[[i for i, v in enumerate(visuals) if isinstance(v, Image.Image)]]
        per_video = keep[[i for i, v in enumerate(visuals) if isinstance(v, Video)]]
        pixels = {}
        for names, kept in ((self.image_inputs, per_image), (self.video_inputs, per_video)):
            if kept.any():  # no pixel inputs for a batch left without images (or videos)
                pixels.update({k: inputs[k][kept if len(inputs[k]) == len(kept) else keep]
                               for k in names if k in inputs})
        inputs = {**tokens, **pixels}
        image_mask = torch.isin(inputs["input_ids"], self.token_ids)
        return Batch(inputs, image_mask, int(keep.sum()), skipped_images, skipped_long)

    def image_ends(self, indices: list[int]) -> list[tuple[int, int]]:
        """(tokens up to the end of the last image or video, their tokens) of each example whose image or video
        decodes: the example fits when the first is at most max_length (as `_fit` decides), whatever the text after
        it."""
        ends = []
        for index in indices:
            visual, prompt, answer = self.data.example(index)
            if visual is None:
                continue
            ids = encode(self.processor, [visual], [chat_text(self.processor, prompt, answer, visual)])["input_ids"][0]
            image_positions = torch.nonzero(torch.isin(ids, self.token_ids)).flatten()
            ends.append((int(image_positions.max()) + 1 if len(image_positions) else 0, len(image_positions)))
        return ends

    def _fit(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Examples whose image (and video) tokens all lie within max_length (the text after them may be cut)."""
        positions = torch.arange(input_ids.shape[1])
        last_image = torch.where(torch.isin(input_ids, self.token_ids), positions, -1).max(1).values
        keep = last_image < self.max_length
        return keep, int((~keep).sum())
