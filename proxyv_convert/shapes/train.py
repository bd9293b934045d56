"""Train the shapes LLaVA from scratch on CPU: a real `LlavaForConditionalGeneration` (CLIP-style vision tower over
64x64 images in 8-pixel patches -> an 8x8 token grid; a 5-layer Llama) that answers the shapes task.

    python -m proxyv_convert.shapes.train --out A --layers 5 --threads 1               # stage 1 + 2500 steps of stage 2
    python -m proxyv_convert.shapes.train --resume A --out B --steps 3000 --threads 1  # more stage 2, new data
    python -m proxyv_convert.shapes.train --resume B --out C --steps 3000 --threads 1  # C: the shipped model

(the shipped model: 46 minutes on one core; comparisons are the last skill it learns, during the third run).

Stage 1 trains the vision tower and projector alone with linear probes that read, from every image token, its cell's
row, column and content. Stage 2 freezes the vision tower and trains the projector, language model and head on the
answers, plus a "mark" loss: a linear probe on the language model's last hidden state of every image token predicts
whether its cell is what the question is about (and, for comparisons, which object wins). The prompt puts the
question before the image, so the image tokens can see it. What made training work on this CPU (each was found by a
run that stayed at chance for 1000+ steps without it): a peak learning rate of 1e-3 (2e-3 collapsed an 8-layer
model), probes that read RMS-normalised features and a projector rescaled to the word embeddings' size (image
features 300x larger than the embeddings swamp everything the language model adds to the image tokens), the mark
loss, and questions whose words name one thing each ("row two column 3", "the red shape"). The probes are dropped
after training; the saved model is a plain LLaVA.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from tqdm import tqdm
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from .processor import IMAGE, PATCH_SIZE, build_processor, prompt_messages
from .task import COLOURS, GRID, IMAGE_SIZE, KINDS, SHAPES, ShapeObject, generate, referents, render

TOKEN_GRID = IMAGE_SIZE // PATCH_SIZE  # 8x8 image tokens
CELL_TOKENS = TOKEN_GRID // GRID  # tokens per cell side
OBJECT_KINDS = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # probe classes; "empty" is the last


@dataclass
class ModelShape:
    hidden: int = 128
    layers: int = 5
    heads: int = 4
    ffn: int = 384
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_ffn: int = 512


def llava_config(shape: ModelShape, processor: LlavaProcessor) -> LlavaConfig:
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_ffn, num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        projection_dim=shape.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, vocab_size=len(tokenizer),
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=TOKEN_GRID * TOKEN_GRID,
        vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )


def probe_targets(scene: list[ShapeObject]) -> torch.Tensor:
    """(64, 3) per image token: its cell's row, column and content (index into OBJECT_KINDS, or 12 = empty)."""
    content = torch.full((GRID, GRID), len(OBJECT_KINDS), dtype=torch.long)
    for obj in scene:
        content[obj.row, obj.col] = OBJECT_KINDS.index(obj.name)
    rows = torch.arange(TOKEN_GRID) // CELL_TOKENS
    row, col = torch.meshgrid(rows, rows, indexing="ij")  # (16, 16) cell row / column of each token
    return torch.stack([row, col, content[row, col]], dim=-1).reshape(-1, 3)


def mark_targets(scene: list[ShapeObject], question: str) -> torch.Tensor:
    """(64,) per image token: 1 if its cell is (one of) what the question is about; 2: the object a comparison does not
    pick. Comparisons are thus decided on the image tokens, which must exchange information to do it."""
    first, second = referents(scene, question)
    marks = torch.zeros(GRID, GRID, dtype=torch.long)
    for cells, value in ((first, 1), (second, 2)):
        for row, col in cells:
            marks[row, col] = value
    return marks.repeat_interleave(CELL_TOKENS, 0).repeat_interleave(CELL_TOKENS, 1).reshape(-1)


class Batches:
    """Training batches: scene `index` of the train stream with `questions` questions as one conversation."""

    def __init__(self, processor: LlavaProcessor, batch_size: int, questions: int, seed: int):
        self.processor, self.batch_size, self.questions, self.seed = processor, batch_size, questions, seed
        tokenizer = processor.tokenizer
        self.assistant_id = tokenizer.convert_tokens_to_ids("▁ASSISTANT:")
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        images, texts, targets, marks = [], [], [], []
        for i in range(self.batch_size):
            index = step * self.batch_size + i
            # The number of turns varies so that short conversations (as in evaluation) are common.
            scene, questions = generate("train", index, self.seed, questions=1 + index % self.questions)
            messages = []
            for turn, q in enumerate(questions):
                messages += prompt_messages(q.question, q.answer)
                if turn:  # the image comes with the first question only
                    messages[-2]["content"] = messages[-2]["content"][1:]
            images.append(render(scene))
            texts.append(self.processor.apply_chat_template(messages))
            targets.append(probe_targets(scene))
            marks.append(mark_targets(scene, questions[0].question) if questions else torch.zeros(0))
        inputs = self.processor(images=images, text=texts, padding=True, padding_side="right", return_tensors="pt")
        ids = inputs["input_ids"]
        # Answer tokens (and their eos) are those after each "ASSISTANT:" up to the eos.
        after = torch.zeros_like(ids, dtype=torch.bool)
        inside = torch.zeros(ids.shape[0], dtype=torch.bool)
        for t in range(ids.shape[1]):
            after[:, t] = inside
            inside = (inside | (ids[:, t] == self.assistant_id)) & (ids[:, t] != self.eos_id)
        labels = torch.where(after & (inputs["attention_mask"] == 1), ids, -100)
        return {**inputs, "labels": labels, "probe_targets": torch.stack(targets), "mark_targets": torch.stack(marks)}


class Probe(nn.Module):
    """Linear read-outs, dropped after training. Of the projected image features: cell row, cell column, cell content.
    Of the language model's last hidden state of each image token: whether its cell is what the question is about."""

    def __init__(self, hidden: int):
        super().__init__()
        self.row, self.col = nn.Linear(hidden, GRID), nn.Linear(hidden, GRID)
        self.content = nn.Linear(hidden, len(OBJECT_KINDS) + 1)
        self.mark = nn.Linear(hidden, 3)

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        features = F.rms_norm(features, features.shape[-1:])  # scale-free: the probe does not inflate the features
        heads = (self.row, self.col, self.content)
        return sum(F.cross_entropy(h(features).flatten(0, 1), targets[..., i].flatten()) for i, h in enumerate(heads))


def training_losses(model, probe: Probe, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(answer loss, probe loss, mark loss) of one batch; the image features are computed once and shared."""
    config = model.config
    features = model.model.get_image_features(
        batch["pixel_values"], vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    ).pooler_output
    features = torch.stack(features)  # (B, 64, H)
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == config.image_token_id)[..., None], features)
    outputs = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
    labels = batch["labels"][:, 1:]
    answer_loss = F.cross_entropy(outputs.logits[:, :-1][labels != -100], labels[labels != -100])
    last = outputs.hidden_states[-1][ids == config.image_token_id]  # (B * 64, H)
    mark_loss = F.cross_entropy(probe.mark(last), batch["mark_targets"].flatten())
    return answer_loss, probe.loss(features, batch["probe_targets"]), mark_loss


@torch.no_grad()
def answer_accuracy(model, processor: LlavaProcessor, split: str, n: int, *, noise: bool = False,
                    batch_size: int = 50) -> dict[str, float]:
    """Exact-match accuracy per question kind, by teacher forcing: an answer counts when every answer token and the
    eos are the argmax given the correct prefix, which is exactly when greedy decoding produces it."""
    tokenizer = processor.tokenizer
    generator = torch.Generator().manual_seed(1234)
    correct = {k: 0 for k in KINDS}
    total = {k: 0 for k in KINDS}
    for start in range(0, n, batch_size):
        images, texts, kinds, prompt_lengths = [], [], [], []
        for index in range(start, min(n, start + batch_size)):
            scene, (q,) = generate(split, index)
            images.append(render(scene))
            prompt = processor.apply_chat_template(prompt_messages(q.question), add_generation_prompt=True)
            texts.append(processor.apply_chat_template(prompt_messages(q.question, q.answer)))
            prompt_lengths.append(len(tokenizer(prompt)["input_ids"]))
            kinds.append(q.kind)
        inputs = processor(images=images, text=texts, padding=True, padding_side="right", return_tensors="pt")
        if noise:
            inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=generator)
        predicted = model(**inputs).logits.argmax(-1)[:, :-1]
        ids, mask = inputs["input_ids"][:, 1:], inputs["attention_mask"][:, 1:]
        for row, (kind, prompt_length) in enumerate(zip(kinds, prompt_lengths, strict=True)):
            # Prompt lengths counted without image expansion: add the 63 extra image tokens.
            first = prompt_length - 1 + TOKEN_GRID * TOKEN_GRID - 1
            last = int(mask[row].sum())
            correct[kind] += bool((predicted[row, first:last] == ids[row, first:last]).all())
            total[kind] += 1
    result = {k: correct[k] / total[k] for k in KINDS if total[k]}
    result["all"] = sum(correct.values()) / sum(total.values())
    return result


def converted(model: LlavaForConditionalGeneration, start_layer: int | None = None, reduce_factor: int = 4):
    """The undistilled ProxyV conversion of `model` (VisionMLPs at zero) at `start_layer` (default: the middle)."""
    from ..remote.configuration_proxyv import ProxyVLlavaConfig
    from ..remote.modeling_proxyv import ProxyVLlavaForConditionalGeneration

    config = ProxyVLlavaConfig.from_llava_config(model.config, proxyv_start_layer=start_layer,
                                                 proxyv_reduce_factor=reduce_factor)
    proxyv = ProxyVLlavaForConditionalGeneration(config)
    proxyv.load_state_dict(model.state_dict(), strict=False)
    return proxyv.eval()


def drop_layer(model: LlavaForConditionalGeneration, index: int) -> None:
    """Remove decoder layer `index` (the layers after it move up one place)."""
    layers = model.model.language_model.layers
    if not 0 <= index < len(layers):
        raise SystemExit(f"--drop-layer {index}: the model has {len(layers)} decoder layers")
    del layers[index]
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    text = model.config.text_config
    text.num_hidden_layers = len(layers)
    if getattr(text, "layer_types", None):
        text.layer_types = [kind for i, kind in enumerate(text.layer_types) if i != index]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def probe_batch(batches: Batches, step: int) -> dict[str, torch.Tensor]:
    images, targets = [], []
    for i in range(batches.batch_size):
        scene, _ = generate("pretrain", step * batches.batch_size + i, batches.seed, questions=0)
        images.append(render(scene))
        targets.append(probe_targets(scene))
    pixels = batches.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels, "probe_targets": torch.stack(targets)}


def pretrain_vision(model, probe: Probe, batches: Batches, args: argparse.Namespace) -> list[dict]:
    """Stage 1: the vision tower and projector learn, through the probe, each patch's cell and the cell's content."""
    config = model.config
    modules = [model.model.vision_tower, model.model.multi_modal_projector, probe]
    parameters = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    log = []
    bar = tqdm(range(args.vision_steps), desc="stage 1: vision", mininterval=5, file=sys.stdout)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vision_steps, args.lr, args.warmup)
        batch = probe_batch(batches, step)
        features = torch.stack(model.model.get_image_features(
            batch["pixel_values"], vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output)
        loss = probe.loss(features, batch["probe_targets"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        bar.set_postfix(probe=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % 50 == 0:
            rms = features.pow(2).mean().sqrt().item()
            log.append({"stage": 1, "step": step + 1, "probe_loss": loss.item(), "feature_rms": rms})
            tqdm.write(json.dumps(log[-1]), file=sys.stdout)
    # The projector's outputs are as large as the word embeddings; far larger ones would swamp everything the language
    # model adds to the image tokens' residual stream (it then never learns to mark them).
    with torch.no_grad():
        scale = model.get_input_embeddings().weight.pow(2).mean().sqrt() / features.pow(2).mean().sqrt()
        model.model.multi_modal_projector.linear_2.weight.mul_(scale)
        model.model.multi_modal_projector.linear_2.bias.mul_(scale)
    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder: model, processor, training_report.json")
    parser.add_argument("--vision-steps", type=int, default=300, help="stage 1: vision tower + projector on the probe")
    parser.add_argument("--vision-batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2500, help="stage 2: projector + language model on answers")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--questions", type=int, default=1, help="most questions per image (1..N, cycled)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak; 2e-3 made an 8-layer model collapse early")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--probe-weight", type=float, default=0.2, help="stage 2: keeps the projector's features")
    parser.add_argument("--mark-weight", type=float, default=1.0, help="stage 2: image tokens mark what is asked about")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", type=Path, help="go on with stage 2 from a model this script saved")
    parser.add_argument("--drop-layer", type=int, help="with --resume: remove this decoder layer first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core machine: 2 threads stall under load)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-n", type=int, default=150, help="validation examples for the periodic check")
    parser.add_argument("--layers", type=int, default=ModelShape.layers)
    parser.add_argument("--hidden", type=int, default=ModelShape.hidden)
    parser.add_argument("--heads", type=int, default=ModelShape.heads)
    parser.add_argument("--ffn", type=int, default=ModelShape.ffn)
    parser.add_argument("--vision-layers", type=int, default=ModelShape.vision_layers)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    processor = build_processor()
    shape = ModelShape(hidden=args.hidden, layers=args.layers, heads=args.heads, ffn=args.ffn,
                       vision_layers=args.vision_layers)
    previous: dict = {}
    if args.resume:  # stage 2 goes on from a saved model, on training data it has not seen
        model = LlavaForConditionalGeneration.from_pretrained(args.resume)
        previous = json.loads((args.resume / "training_report.json").read_text())
        if args.drop_layer is not None:
            drop_layer(model, args.drop_layer)
        log = []
    else:
        model = LlavaForConditionalGeneration(llava_config(shape, processor))
    probe = Probe(model.config.text_config.hidden_size)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    if not args.resume:
        log = pretrain_vision(model, probe, Batches(processor, args.vision_batch_size, 1, args.seed), args)
    first_step = previous.get("first_step", 0) + previous.get("steps", 0)

    # Stage 2: the vision tower is frozen (as in LLaVA's fine-tuning); projector, language model and head learn.
    model.model.vision_tower.requires_grad_(False)
    parameters = [p for p in list(model.parameters()) + list(probe.parameters()) if p.requires_grad]
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    batches = Batches(processor, args.batch_size, args.questions, args.seed)
    bar = tqdm(range(args.steps), desc="stage 2: answers", mininterval=5, file=sys.stdout)
    for step in bar:
        model.train()
        model.model.vision_tower.eval()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        answer_loss, probe_loss, mark_loss = training_losses(model, probe, batches(first_step + step))
        loss = answer_loss + args.probe_weight * probe_loss + args.mark_weight * mark_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        bar.set_postfix(answer=f"{answer_loss.item():.3f}", probe=f"{probe_loss.item():.3f}",
                        mark=f"{mark_loss.item():.3f}", refresh=False)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            accuracy = answer_accuracy(model, processor, "validation", args.eval_n)
            proxyv_accuracy = answer_accuracy(converted(model), processor, "validation", args.eval_n)
            entry = {"stage": 2, "step": step + 1, "seconds": round(time.time() - started),
                     "answer_loss": answer_loss.item(), "probe_loss": probe_loss.item(),
                     "mark_loss": mark_loss.item(), "validation": accuracy,
                     "validation_proxyv": proxyv_accuracy}
            log.append(entry)
            tqdm.write(json.dumps(entry), file=sys.stdout)
    train_seconds = time.time() - started

    model.eval()
    report = {
        "command": "python -m proxyv_convert.shapes.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "seed": args.seed,
        "vision_steps": 0 if args.resume else args.vision_steps,
        "first_step": first_step,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "questions_per_image": args.questions,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "validation": answer_accuracy(model, processor, "validation", 600),
        "test": answer_accuracy(model, processor, "test", 600),
        "test_noise_images": answer_accuracy(model, processor, "test", 600, noise=True),
        "test_proxyv_middle_layer_undistilled": answer_accuracy(converted(model), processor, "test", 600),
        "log": log,
        "resumed_from": previous or None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
