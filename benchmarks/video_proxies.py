"""Per-frame against cross-frame video proxies: FLOPs, and agreement with the original model after distillation.

A small random LLaVA-OneVision (a SigLIP-style tower over a 27x27 patch grid per frame, pooled to 14x14 video tokens
per frame as OneVision does; a Qwen2 language model) is converted once per `--video-frames` value (1: proxies per
frame, the baseline; 2: one set of proxies per pair of neighbouring frames, the pair averaged), from the same weights
and the same initial ProxyV modules. Each is distilled for the same steps on the same synthetic videos with
`proxyv_convert.distill`'s objective and defaults (its `distill_losses`, learning rate and schedule), and then
compared with the original model (ProxyV off) on held-out videos: next-token KL(original || ProxyV) and top-1
agreement at the text positions after the video (teacher-forced), and how often a greedy continuation of
`--new-tokens` tokens is the original's token for token. Before distillation (the VisionMLP output starts at zero)
the two settings compute the same thing; they part once the VisionMLPs learn from their proxies.

Synthetic videos move smoothly: each is a window sliding over a larger smooth random field (neighbouring frames
alike, as in real video), plus a little per-frame noise; the pixel values are given directly (no processor).
Weights are drawn larger than the default init so that the random model's next-token distributions are not flat.

    python benchmarks/video_proxies.py                   # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

from proxyv_convert.batching import Batch
from proxyv_convert.bench import count_flops
from proxyv_convert.config import DistillSettings
from proxyv_convert.distill import distill_losses, lr_lambda, teacher_and_student
from proxyv_convert.families import FAMILIES
from proxyv_convert.remote.modeling_proxyv import init_proxyv_module

FAMILY = FAMILIES["llava_onevision"]


def source_config(args: argparse.Namespace) -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(hidden_size=args.vision_hidden, intermediate_size=2 * args.vision_hidden,
                                num_hidden_layers=1, num_attention_heads=2, image_size=27 * args.patch,
                                patch_size=args.patch, vision_use_head=False)
    text = Qwen2Config(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                       max_position_embeddings=8192, tie_word_embeddings=False)
    return LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                image_token_index=args.vocab - 2, video_token_index=args.vocab - 1,
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                tie_word_embeddings=False)


def models(args: argparse.Namespace) -> dict[int, torch.nn.Module]:
    """One converted model per `--video-frames` value, all with the same weights (the original's and ProxyV's)."""
    out, state = {}, None
    for frames in args.video_frames:
        config = FAMILY.config.from_llava_config(source_config(args), proxyv_start_layer=args.start_layer,
                                                 proxyv_reduce_factor=args.factor, proxyv_video_frames=frames)
        config._attn_implementation = "sdpa"
        model = FAMILY.head(config)
        if state is None:
            generator = torch.Generator().manual_seed(args.seed)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.dim() == 2 and "embed" not in name:  # larger weights: sharper next-token distributions
                        scale = args.head_scale if name == "lm_head.weight" else 0.5
                        param.copy_(torch.randn(param.shape, generator=generator) * scale / param.shape[1] ** 0.5)
                torch.manual_seed(args.seed)
                model.model.proxyv.apply(lambda m: init_proxyv_module(m, 0.02))  # as `proxyv convert` starts them
            state = model.state_dict()
        model.load_state_dict(state)
        out[frames] = model.eval()
    return out


def videos(count: int, args: argparse.Namespace, generator: torch.Generator) -> torch.Tensor:
    """(count, frames, 3, S, S): windows sliding over a smooth random field, one step of `--motion` pixels a frame."""
    side = 27 * args.patch
    span = side + args.motion * (args.frames - 1)
    field = F.interpolate(torch.randn(count, 3, 8, 8, generator=generator), size=(span, span), mode="bicubic",
                          align_corners=False)
    directions = torch.randint(0, 2, (count,), generator=generator)  # right or down
    clips = []
    for v in range(count):
        frames = []
        for t in range(args.frames):
            shift = t * args.motion
            top, left = (shift, 0) if directions[v] else (0, shift)
            frames.append(field[v, :, top : top + side, left : left + side])
        clips.append(torch.stack(frames))
    clips = torch.stack(clips)
    return clips + 0.05 * torch.randn(clips.shape, generator=generator)


def batch(model, pixels: torch.Tensor, args: argparse.Namespace, generator: torch.Generator) -> Batch:
    """Prompts of `--text-before` text tokens, a video, and `--text-after` text tokens."""
    config = model.config
    count = pixels.shape[0]
    video = torch.full((count, model.model.video_layout(args.frames)[0]), config.video_token_id)
    before = torch.randint(3, args.vocab - 2, (count, args.text_before), generator=generator)
    after = torch.randint(3, args.vocab - 2, (count, args.text_after), generator=generator)
    ids = torch.cat([before, video, after], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}
    return Batch(inputs, ids == config.video_token_id, count, 0, 0)


def distill_steps(model, data: list[Batch], settings: DistillSettings) -> float:
    """`settings.steps` optimizer steps over `data` in turn (the ProxyV parameters only); returns the seconds."""
    model.requires_grad_(False)
    model.model.proxyv.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.model.proxyv.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    start = time.perf_counter()
    for step in range(settings.steps):
        current = data[step % len(data)]
        teacher, student = teacher_and_student(model, current)
        losses = distill_losses(model, student, teacher, current, settings)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.model.proxyv.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def agreement(model, held_out: list[Batch], new_tokens: int) -> dict[str, float]:
    """KL(original || ProxyV) and top-1 agreement at the text after the video; greedy continuations that match."""
    kl_sum = top1_sum = positions = same = prompts = 0.0
    for current in held_out:
        after = (current.image_mask.cumsum(1) > 0) & ~current.image_mask
        student = model(**current.inputs).logits[after].float()
        with model.proxyv_disabled():
            teacher = model(**current.inputs).logits[after].float()
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
        kl_sum += float(kl.sum())
        top1_sum += float((student.argmax(-1) == teacher.argmax(-1)).sum())
        positions += student.shape[0]
        options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        ours = model.generate(**current.inputs, **options)
        with model.proxyv_disabled():
            theirs = model.generate(**current.inputs, **options)
        same += float((ours == theirs).all(1).sum())
        prompts += ours.shape[0]
    return {"kl": kl_sum / positions, "top1": top1_sum / positions, "greedy": same / prompts}


def flops_ratio(model, current: Batch) -> float:
    """Forward GFLOPs (the whole model, its small vision tower included) with ProxyV on over off, one prompt."""
    single = {k: v[:1] for k, v in current.inputs.items()}
    with torch.no_grad():
        on = count_flops(lambda: model(**single, logits_to_keep=1))
        with model.proxyv_disabled():
            off = count_flops(lambda: model(**single, logits_to_keep=1))
    return on / off


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--vision-hidden", type=int, default=32)
    parser.add_argument("--patch", type=int, default=2, help="Pixels per patch side (27 patches per frame side).")
    parser.add_argument("--start-layer", type=int, default=2)
    parser.add_argument("--factor", type=int, default=3, help="Reduce factor (14x14 frame grid -> 5x5 proxies).")
    parser.add_argument("--video-frames", type=int, nargs="+", default=[1, 2], help="Frames per proxy group.")
    parser.add_argument("--frames", type=int, default=4, help="Frames per video.")
    parser.add_argument("--motion", type=int, default=2, help="Pixels the window moves per frame.")
    parser.add_argument("--text-before", type=int, default=8)
    parser.add_argument("--text-after", type=int, default=24)
    parser.add_argument("--train-videos", type=int, default=48)
    parser.add_argument("--eval-videos", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-scale", type=float, default=4.0,
                        help="Std of the head's weights times sqrt(hidden): logits of about this std.")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, command: {' '.join(sys.argv)}",
          flush=True)
    settings = DistillSettings(steps=args.steps, batch_size=args.batch_size)
    converted = models(args)
    first = converted[args.video_frames[0]]
    generator = torch.Generator().manual_seed(args.seed + 1)
    train = [batch(first, videos(args.batch_size, args, generator), args, generator)
             for _ in range(math.ceil(args.train_videos / args.batch_size))]
    held_out = [batch(first, videos(args.batch_size, args, generator), args, generator)
                for _ in range(math.ceil(args.eval_videos / args.batch_size))]
    tokens = held_out[0].inputs["input_ids"].shape[1]
    print(f"{args.frames} frames x {first.config.proxyv_frame_grid ** 2} tokens, {tokens} tokens per prompt; "
          f"{len(train) * args.batch_size} training videos, {len(held_out) * args.batch_size} held out; "
          f"{args.steps} steps of {args.batch_size}", flush=True)
    print(f"{'proxies':<10} {'proxy tokens':>12} {'FLOPs ratio':>11} {'KL before':>10} {'KL after':>9} "
          f"{'top-1 before':>12} {'top-1 after':>11} {'greedy before':>13} {'greedy after':>12} {'distill s':>9}",
          flush=True)
    for frames, model in converted.items():
        grids = model.model.video_layout(args.frames)[1]
        proxies = sum(math.prod(g.proxy_shape(args.factor)) for g in grids)
        ratio = flops_ratio(model, held_out[0])
        before = agreement(model, held_out, args.new_tokens)
        seconds = distill_steps(model, train, settings)
        after = agreement(model, held_out, args.new_tokens)
        name = "per frame" if frames == 1 else f"{frames} frames"
        print(f"{name:<10} {proxies:>12} {ratio:>11.3f} {before['kl']:>10.4f} {after['kl']:>9.4f} "
              f"{before['top1']:>12.1%} {after['top1']:>11.1%} {before['greedy']:>13.1%} {after['greedy']:>12.1%} "
              f"{seconds:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
