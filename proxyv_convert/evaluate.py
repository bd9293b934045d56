"""Exact-match evaluation of LLaVA / ProxyV models on image question answering, with greedy decoding.

    result = evaluate("proxyv_convert/assets/llava-shapes", "shapes")  # the built-in task's test split
    result = evaluate(converted_dir, "shapes", other="proxyv_convert/assets/llava-shapes")  # + agreement

Prompts are the model's own chat template with one image and the question; answers are compared after lower-casing
and collapsing whitespace.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration, ProcessorMixin

from .errors import ProxyVError
from .modeling import load_model

BUILTIN_DATA = ("shapes",)


@dataclass
class EvalResult:
    """Outcome of `evaluate`. `agreement` and `other_*` are set when a second model was given."""

    accuracy: float
    n: int
    seconds: float
    questions: list[str]
    answers: list[str]
    predictions: list[str]
    correct: list[bool]
    per_kind: dict[str, float] = field(default_factory=dict)
    agreement: float | None = None
    other_accuracy: float | None = None
    other_predictions: list[str] | None = None

    def to_json(self) -> str:
        import json

        keys = ("accuracy", "n", "seconds", "per_kind", "agreement", "other_accuracy")
        summary = {k: getattr(self, k) for k in keys}
        examples = [
            {"question": q, "answer": a, "prediction": p, **({"other": o} if self.other_predictions else {})}
            for q, a, p, o in zip(self.questions, self.answers, self.predictions,
                                  self.other_predictions or self.predictions, strict=True)
        ]
        return json.dumps({**summary, "examples": examples}, indent=1)

    def summary(self) -> str:
        text = f"accuracy {self.accuracy:.1%} on {self.n} examples ({self.seconds:.1f} s)"
        if self.per_kind:
            text += " [" + ", ".join(f"{k} {v:.1%}" for k, v in self.per_kind.items()) + "]"
        if self.agreement is not None:
            text += f"; other model: accuracy {self.other_accuracy:.1%}, answer agreement {self.agreement:.1%}"
        return text


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def load_eval_data(data: str | Path | datasets.Dataset | datasets.DatasetDict, split: str = "test") -> datasets.Dataset:
    """A dataset split from the name of a built-in task, a `save_to_disk` folder, or a (Dataset|DatasetDict) object."""
    if isinstance(data, str) and data in BUILTIN_DATA:
        from .shapes import load_shapes

        return load_shapes(split)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise ProxyVError(
                f"data '{data}' is neither a built-in task ({', '.join(BUILTIN_DATA)}) nor an existing folder; "
                "pass a folder written by datasets' save_to_disk"
            )
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as error:
            raise ProxyVError(f"{path} is not a dataset folder written by datasets' save_to_disk ({error})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ProxyVError(f"the dataset has no split '{split}'; its splits: {', '.join(data)}")
        data = data[split]
    if not isinstance(data, datasets.Dataset):
        raise ProxyVError(f"data must be a task name, a dataset folder or a Dataset, not {type(data).__name__}")
    return data


def check_columns(data: datasets.Dataset, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise ProxyVError(
            f"the dataset has no column {', '.join(repr(c) for c in missing)}; its columns: "
            f"{', '.join(data.column_names)} (choose others with image_column/question_column/answer_column)"
        )
    if len(data) == 0:
        raise ProxyVError("the dataset is empty")


def load_for_eval(model: str | Path | LlavaForConditionalGeneration,
                  processor: ProcessorMixin | None = None) -> tuple[LlavaForConditionalGeneration, ProcessorMixin]:
    """A model (loaded from its folder when given as a path) and its processor (from the same folder by default)."""
    if isinstance(model, (str, Path)):
        from .recipes import resolve_model_source

        folder = Path(resolve_model_source(str(model)))  # builtin:NAME -> the shipped folder
        model = load_model(folder)
    else:
        folder = Path(getattr(model, "name_or_path", "") or ".")
    if processor is None:
        if not (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").is_file():
            raise ProxyVError(f"no processor found for the model (looked in '{folder}'); pass processor=")
        processor = AutoProcessor.from_pretrained(folder)
    if getattr(processor, "chat_template", None) is None:
        raise ProxyVError(f"the processor from '{folder}' has no chat template; evaluation formats prompts with it")
    return model.eval(), processor


def noise_image(like: Image.Image, seed: int) -> Image.Image:
    """Uniform RGB noise of the same size (the control: a model that really looks should fail on it)."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", like.size, rng.randbytes(like.size[0] * like.size[1] * 3))


@torch.no_grad()
def generate_answers(model: LlavaForConditionalGeneration, processor: ProcessorMixin, images: list[Image.Image],
                     questions: list[str], *, max_new_tokens: int) -> list[str]:
    """Greedy answers to one question per image, as one left-padded batch."""
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in questions
    ]
    inputs = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    tokenizer = processor.tokenizer
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def predict(model: LlavaForConditionalGeneration, processor: ProcessorMixin, data: datasets.Dataset, *,
            image_column: str, question_column: str, batch_size: int, noise_images: bool, max_new_tokens: int,
            progress: bool, desc: str) -> list[str]:
    predictions: list[str] = []
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        rows = data[start : start + batch_size]
        images = [image.convert("RGB") for image in rows[image_column]]
        if noise_images:
            images = [noise_image(image, start + i) for i, image in enumerate(images)]
        predictions += generate_answers(model, processor, images, rows[question_column], max_new_tokens=max_new_tokens)
    return predictions


def evaluate(
    model: str | Path | LlavaForConditionalGeneration,
    data: str | Path | datasets.Dataset | datasets.DatasetDict = "shapes",
    *,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 50,
    other: str | Path | LlavaForConditionalGeneration | None = None,
    noise_images: bool = False,
    progress: bool = True,
    processor: ProcessorMixin | None = None,
    other_processor: ProcessorMixin | None = None,
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
    kind_column: str = "kind",
    max_new_tokens: int = 8,
    against_original: bool = False,
    proxyv_off: bool = False,
) -> EvalResult:
    """Exact-match accuracy of `model` on a split with greedy decoding; with `other`, also that model's accuracy and
    how often the two give the same answer. `noise_images` replaces every image by noise (a control).

    `model` / `other`: a model folder (plain LLaVA or ProxyV) or a loaded model; the processor comes from the folder
    unless given. `data`: "shapes" (the built-in task), a `save_to_disk` folder, or a Dataset/DatasetDict.
    `against_original`: `other` is the same ProxyV model with ProxyV off (the original model's computation).
    `proxyv_off`: evaluate `model` itself with ProxyV off.
    """
    if against_original and other is not None:
        raise ProxyVError("give either a second model or --against-original, not both")
    if limit is not None and limit < 1:
        raise ProxyVError(f"limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise ProxyVError(f"batch_size must be at least 1, got {batch_size}")
    dataset = load_eval_data(data, split)
    check_columns(dataset, (image_column, question_column, answer_column))
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    model, processor = load_for_eval(model, processor)
    if (against_original or proxyv_off) and not hasattr(model, "proxyv_disabled"):
        raise ProxyVError("--against-original and --proxyv-off need a ProxyV model")
    if other is not None:
        other, other_processor = load_for_eval(other, other_processor)

    started = time.perf_counter()
    options = dict(image_column=image_column, question_column=question_column, batch_size=batch_size,
                   noise_images=noise_images, max_new_tokens=max_new_tokens, progress=progress)
    with model.proxyv_disabled() if proxyv_off else contextlib.nullcontext():
        predictions = predict(model, processor, dataset, desc="evaluate", **options)
    answers = list(dataset[answer_column])
    correct = [normalise(p) == normalise(a) for p, a in zip(predictions, answers, strict=True)]
    result = EvalResult(
        accuracy=sum(correct) / len(correct), n=len(correct), seconds=0.0, questions=list(dataset[question_column]),
        answers=answers, predictions=predictions, correct=correct,
    )
    if kind_column in dataset.column_names:
        kinds = dataset[kind_column]
        for kind in sorted(set(kinds)):
            hits = [c for c, k in zip(correct, kinds, strict=True) if k == kind]
            result.per_kind[kind] = sum(hits) / len(hits)
    if against_original:
        with model.proxyv_disabled():
            result.other_predictions = predict(model, processor, dataset, desc="evaluate original", **options)
    elif other is not None:
        result.other_predictions = predict(other, other_processor, dataset, desc="evaluate other", **options)
    if result.other_predictions is not None:
        result.other_accuracy = sum(
            normalise(p) == normalise(a) for p, a in zip(result.other_predictions, answers, strict=True)
        ) / len(answers)
        result.agreement = sum(
            normalise(p) == normalise(q) for p, q in zip(predictions, result.other_predictions, strict=True)
        ) / len(answers)
    result.seconds = time.perf_counter() - started
    return result
