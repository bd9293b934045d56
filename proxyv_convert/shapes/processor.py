"""The processor of the shapes LLaVA: a small BPE tokenizer trained on the task's text, CLIP image preprocessing and a
LLaVA-style chat template, put together as a real `LlavaProcessor` (saved beside the model, loaded by AutoProcessor).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from .task import COLOURS, COMPARISONS, EMPTY_ANSWER, GRID, IMAGE_SIZE, ROW_WORDS, SHAPES

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]  # ids 0-4
MAX_VOCAB_SIZE = 256  # the corpus is small: BPE stops earlier, at every word of the task
PATCH_SIZE = 8  # 64x64 images -> an 8x8 token grid (2x2 tokens per cell)

# LLaVA-1.5's conversation format, the image after the question: "USER: {question}\n<image> ASSISTANT: {answer}</s>".
# The image comes last in the user turn whatever the order of the content items, so that the vision tokens can attend
# to the question (in a ProxyV layer only the proxies still can: the conversion has something to lose). Contents may
# be a string or a list of {"type": "image"} / {"type": "text", "text": ...} items.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '\\n' }}<image>{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def task_corpus() -> list[str]:
    """Every word the task uses, in sentences, in a fixed order (the BPE training text)."""
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    lines = ["USER: ASSISTANT:", EMPTY_ANSWER, " ".join(names), " ".join(str(i) for i in range(10))]
    lines += [f"what is in row {r} column {c} ?" for r in ROW_WORDS for c in range(1, GRID + 1)]
    lines += [f"how many {c} shapes are there ?" for c in COLOURS] + [f"how many {s}s are there ?" for s in SHAPES]
    words = [f"the {c} shape" for c in COLOURS] + [f"the {s}" for s in SHAPES]
    lines += [f"which is {comparison} , {a} or {b} ?" for comparison in COMPARISONS for a in words for b in words]
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE over Metaspace words (as Llama's), trained on `task_corpus()`; deterministic for a tokenizers version.

    Newlines become spaces (the template's "<image>\n" then costs no token); the task's words are whole tokens.
    """
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.normalizer = normalizers.Replace("\n", " ")
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(task_corpus())) | set("abcdefghijklmnopqrstuvwxyz0123456789?:.,!'"))
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(task_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return tokenizer


def build_processor() -> LlavaProcessor:
    """The shapes LLaVA's processor: 64x64 images, 8-pixel patches (an 8x8 token grid), the chat template."""
    image_processor = CLIPImageProcessorPil(  # the PIL backend: torchvision is not needed
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def prompt_messages(question: str, answer: str | None = None) -> list[dict]:
    """The chat messages of one question about one image (and its answer, for training)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages
