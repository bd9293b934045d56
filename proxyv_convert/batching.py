"""Turning (image, prompt, answer) examples into model inputs with the model's own processor and chat template."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import ProcessorMixin

from .data import ImageTextData


def chat_text(processor: ProcessorMixin, prompt: str, answer: str | None = None) -> str:
    """The prompt (one image, then the question) and, when known, the answer, in the processor's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if answer is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages)


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask and the family's image inputs (pixel_values, ...)
    image_mask: torch.Tensor  # (B, T) bool: image tokens
    used: int  # examples in the batch
    skipped_images: int  # examples dropped because their image did not decode
    skipped_long: int  # examples dropped because the image would not fit in max_length


class Batcher:
    """Builds right-padded batches (teacher-forced sequences) from example indices of one split."""

    def __init__(self, data: ImageTextData, processor: ProcessorMixin, image_token_id: int, max_length: int,
                 image_inputs: tuple[str, ...]):
        self.data = data
        self.image_inputs = image_inputs  # the processor outputs the model's forward needs with the images
        self.processor = processor
        self.image_token_id = image_token_id
        self.max_length = max_length

    def __call__(self, indices: list[int]) -> Batch:
        images: list[Image.Image] = []
        texts: list[str] = []
        skipped_images = 0
        for index in indices:
            image, prompt, answer = self.data.example(index)
            if image is None:
                skipped_images += 1
                continue
            images.append(image)
            texts.append(chat_text(self.processor, prompt, answer))
        if not images:
            return Batch({}, torch.zeros(0, 0, dtype=torch.bool), 0, skipped_images, 0)
        inputs = self.processor(images=images, text=texts, padding=True, padding_side="right", return_tensors="pt")
        keep, skipped_long = self._fit(inputs["input_ids"])
        width = min(int(inputs["attention_mask"][keep].sum(1).max()) if keep.any() else 0, self.max_length)
        tokens = {k: inputs[k][keep, :width] for k in ("input_ids", "attention_mask")}
        inputs = {**tokens, **{k: inputs[k][keep] for k in self.image_inputs}}  # one image per example
        image_mask = inputs["input_ids"] == self.image_token_id
        return Batch(inputs, image_mask, int(keep.sum()), skipped_images, skipped_long)

    def image_ends(self, indices: list[int]) -> list[tuple[int, int]]:
        """(tokens up to the end of the last image, image tokens) of each example whose image decodes: the example
        fits when the first is at most max_length (as `_fit` decides), whatever the text after the image."""
        ends = []
        for index in indices:
            image, prompt, answer = self.data.example(index)
            if image is None:
                continue
            ids = self.processor(images=[image], text=[chat_text(self.processor, prompt, answer)],
                                 return_tensors="pt")["input_ids"][0]
            image_positions = torch.nonzero(ids == self.image_token_id).flatten()
            ends.append((int(image_positions.max()) + 1 if len(image_positions) else 0, len(image_positions)))
        return ends

    def _fit(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Examples whose image tokens all lie within max_length (the text after them may be cut)."""
        positions = torch.arange(input_ids.shape[1])
        last_image = torch.where(input_ids == self.image_token_id, positions, -1).max(1).values
        keep = last_image < self.max_length
        return keep, int((~keep).sum())
