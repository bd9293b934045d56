"""Exact-match evaluation of LLaVA / ProxyV models on image question answering, with greedy decoding.

    result = evaluate("proxyv_convert/assets/llava-shapes", "shapes")  # the built-in task's test split
    result = evaluate(converted_dir, "shapes", other="proxyv_convert/assets/llava-shapes")  # + agreement

The data comes through the same loader as distillation's (`data.load_data`: every form `--data` takes). Prompts are
the model's own chat template with one image and the question; answers are compared after lower-casing and
collapsing whitespace. Examples whose image does not decode are skipped and counted.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from PIL import Image
from tqdm import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from .atomic import folder_lock, write_text
from .batching import chat_text, encode
from .config import Columns, EvalSection, build, default, resolve_model_source
from .data import ANSWER_COLUMNS, ImageTextData, Visual, load_data
from .errors import ProxyVError
from .model_folder import EVAL_REPORT, is_proxyv_folder, load_model, load_processor

MAX_NEW_TOKENS = 1024  # the most tokens any answer is generated to


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
    data: str = ""
    split: str = ""
    skipped_images: int = 0
    per_kind: dict[str, float] = field(default_factory=dict)
    agreement: float | None = None
    other: str | None = None  # what the second model was: "original" (ProxyV off) or its folder
    other_accuracy: float | None = None
    other_predictions: list[str] | None = None

    def to_json(self) -> str:
        summary = {k: v for k, v in asdict(self).items()
                   if k not in ("questions", "answers", "predictions", "correct", "other_predictions")}
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
        if self.skipped_images:
            text += f"; {self.skipped_images} example(s) skipped (image did not decode)"
        if self.agreement is not None:
            other = "original model" if self.other == "original" else "other model"
            text += f"; {other}: accuracy {self.other_accuracy:.1%}, answer agreement {self.agreement:.1%}"
        return text


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def load_for_eval(model: str | Path | PreTrainedModel,
                  processor: ProcessorMixin | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A model (loaded from its folder when given as a path) and its processor (from the same folder by default)."""
    if isinstance(model, (str, Path)):
        folder = Path(resolve_model_source(str(model)))  # builtin:NAME -> the shipped folder
        model = load_model(folder)
    else:
        folder = Path(getattr(model, "name_or_path", "") or ".")
    if processor is None:
        if not (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").is_file():
            raise ProxyVError(f"no processor found for the model (looked in '{folder}'); pass processor=")
        processor = load_processor(folder)
    if getattr(processor, "chat_template", None) is None:
        raise ProxyVError(f"the processor from '{folder}' has no chat template; evaluation formats prompts with it")
    return model.eval(), processor


def noise_image(like: Image.Image, seed: int) -> Image.Image:
    """Uniform RGB noise of the same size (the control: a model that really looks should fail on it)."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", like.size, rng.randbytes(like.size[0] * like.size[1] * 3))


@torch.no_grad()
def generate_answers(model: PreTrainedModel, processor: ProcessorMixin, images: list[Visual],
                     questions: list[str], *, max_new_tokens: int) -> list[str]:
    """Greedy answers to one question per image (or video, or none), as one left-padded batch, of at most
    `max_new_tokens` tokens each (bounded by MAX_NEW_TOKENS: generation never runs unbounded)."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ProxyVError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
    prompts = [chat_text(processor, question, visual=visual) for question, visual in zip(questions, images,
                                                                                         strict=True)]
    inputs = encode(processor, images, prompts, padding_side="left").to(model.device)
    for name, value in inputs.items():  # pixel values in the model's dtype
        if value.is_floating_point():
            inputs[name] = value.to(model.dtype)
    tokenizer = processor.tokenizer
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def prompt_lengths(processor: ProcessorMixin, images: list[Visual], questions: list[str]) -> list[int]:
    """Tokens of each example's generation prompt (its image tokens included), as `generate_answers` builds it."""
    prompts = [chat_text(processor, question, visual=visual) for question, visual in zip(questions, images,
                                                                                         strict=True)]
    return encode(processor, images, prompts)["attention_mask"].sum(1).tolist()


def decoded_examples(data: ImageTextData, limit: int | None) -> tuple[list[tuple[Visual, str, str]], int]:
    """(image, question, answer) of the first `limit` examples whose image decodes, and how many were skipped."""
    examples, skipped = [], 0
    for index in range(len(data)):
        if limit is not None and len(examples) == limit:
            break
        image, question, answer = data.example(index)
        if image is None:
            skipped += 1
        else:
            examples.append((image, question, answer))
    return examples, skipped


def predict(model: PreTrainedModel, processor: ProcessorMixin, examples: list[tuple[Visual, str, str]], *,
            batch_size: int, noise_images: bool, max_new_tokens: int, progress: bool, desc: str) -> list[str]:
    predictions: list[str] = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        rows = examples[start : start + batch_size]
        images = [image for image, _, _ in rows]
        if noise_images:  # videos and text-only prompts stay as they are
            images = [noise_image(image, start + i) if isinstance(image, Image.Image) else image
                      for i, image in enumerate(images)]
        predictions += generate_answers(model, processor, images, [q for _, q, _ in rows],
                                        max_new_tokens=max_new_tokens)
    return predictions


def evaluate(
    model: str | Path | PreTrainedModel,
    data: str | Path | datasets.Dataset | datasets.DatasetDict = default(EvalSection, "data"),
    *,
    split: str = default(EvalSection, "split"),
    limit: int | None = None,
    batch_size: int = default(EvalSection, "batch_size"),
    other: str | Path | PreTrainedModel | None = None,
    noise_images: bool = False,
    progress: bool = True,
    processor: ProcessorMixin | None = None,
    other_processor: ProcessorMixin | None = None,
    columns: Columns = Columns(),
    revision: str | None = None,
    kind_column: str = "kind",
    max_new_tokens: int = 8,
    against_original: bool = default(EvalSection, "against_original"),
    proxyv_off: bool = False,
) -> EvalResult:
    """Exact-match accuracy of `model` on a split with greedy decoding; with `other`, also that model's accuracy and
    how often the two give the same answer. `noise_images` replaces every image by noise (a control).

    `model` / `other`: a model folder (plain LLaVA or ProxyV) or a loaded model; the processor comes from the folder
    unless given. `data`: anything `--data` takes (see `data.load_data`), or a Dataset/DatasetDict.
    `against_original`: `other` is the same ProxyV model with ProxyV off (the original model's computation).
    `proxyv_off`: evaluate `model` itself with ProxyV off.
    """
    if against_original and other is not None:
        raise ProxyVError("give either a second model or --against-original, not both")
    build(EvalSection, {"limit": limit, "batch_size": batch_size})  # the recipe's bounds (a one-line error)
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ProxyVError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
    for given in (model, other):  # a folder that is not there, or not a ProxyV model, before any data is read
        if isinstance(given, (str, Path)) and not Path(resolve_model_source(str(given))).is_dir():
            raise ProxyVError(f"model folder {given} does not exist")
    if (against_original or proxyv_off) and isinstance(model, (str, Path)) and not is_proxyv_folder(
            Path(resolve_model_source(str(model)))):
        raise ProxyVError("--against-original and --proxyv-off need a ProxyV model")
    rows = load_data(data, split=split, columns=columns, revision=revision)
    if rows.answer is None:
        raise ProxyVError(
            f"the data has no answer column (looked for {', '.join(ANSWER_COLUMNS)}; its columns: "
            f"{', '.join(rows.rows.column_names)}); choose one with --answer-column"
        )
    examples, skipped = decoded_examples(rows, limit)
    if not examples:
        raise ProxyVError(f"no image of the '{split}' split of {rows.source} could be decoded (column '{rows.image}')")
    model, processor = load_for_eval(model, processor)
    if (against_original or proxyv_off) and not hasattr(model, "proxyv_disabled"):
        raise ProxyVError("--against-original and --proxyv-off need a ProxyV model")
    if other is not None:
        other, other_processor = load_for_eval(other, other_processor)

    started = time.perf_counter()
    options = dict(batch_size=batch_size, noise_images=noise_images, max_new_tokens=max_new_tokens, progress=progress)
    with model.proxyv_disabled() if proxyv_off else contextlib.nullcontext():
        predictions = predict(model, processor, examples, desc="evaluate", **options)
    answers = [answer for _, _, answer in examples]
    correct = [normalise(p) == normalise(a) for p, a in zip(predictions, answers, strict=True)]
    result = EvalResult(
        accuracy=sum(correct) / len(correct), n=len(correct), seconds=0.0, questions=[q for _, q, _ in examples],
        answers=answers, predictions=predictions, correct=correct, data=rows.source, split=split,
        skipped_images=skipped,
    )
    if kind_column in rows.rows.column_names and not skipped:
        kinds = rows.rows[kind_column][: len(examples)]
        for kind in sorted(set(kinds)):
            hits = [c for c, k in zip(correct, kinds, strict=True) if k == kind]
            result.per_kind[kind] = sum(hits) / len(hits)
    if against_original:
        result.other = "original"
        with model.proxyv_disabled():
            result.other_predictions = predict(model, processor, examples, desc="evaluate original", **options)
    elif other is not None:
        result.other = str(getattr(other, "name_or_path", "") or "other")
        result.other_predictions = predict(other, other_processor, examples, desc="evaluate other", **options)
    if result.other_predictions is not None:
        result.other_accuracy = sum(
            normalise(p) == normalise(a) for p, a in zip(result.other_predictions, answers, strict=True)
        ) / len(answers)
        result.agreement = sum(
            normalise(p) == normalise(q) for p, q in zip(predictions, result.other_predictions, strict=True)
        ) / len(answers)
    result.seconds = time.perf_counter() - started
    return result


def write_report(folder: str | Path, result: EvalResult) -> Path | None:
    """Write `eval_report.json` into a ProxyV model folder (the model card shows it); None for other folders."""
    if not is_proxyv_folder(Path(folder)):
        return None
    with folder_lock(Path(folder)):  # not while another command writes into the folder
        return write_text(Path(folder) / EVAL_REPORT, result.to_json())
