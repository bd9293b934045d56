"""ProxyV prefill on LLaVA-OneVision's largest inputs: a 32-frame video (14x14 tokens per frame) and an image at its
largest AnyRes resolution, against the same weights with ProxyV off, in one run.

A random LLaVA-OneVision (a SigLIP-384/14 grid of 27x27 tokens per crop, a Qwen2 language model of the given width and
depth) is converted in memory with a non-zero VisionMLP. For each case the script prints, side by side, the FLOPs
ratio and the language-model prefill time ratio (ProxyV / off, medians of interleaved runs) and their quotient; for
the first case also the decode time per token of both sides. Video proxies are made per frame (`--video-frames 1`,
the baseline) or across neighbouring frames (2, 4: one set of proxies per group of frames, the frames averaged).

    python benchmarks/video_prefill.py                   # CPU target: hidden 1024, 16 layers, start layer 8
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch
from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

from proxyv_convert.bench import count_flops, interleaved_medians
from proxyv_convert.families import FAMILIES


def random_model(args: argparse.Namespace, video_frames: int):
    vision = SiglipVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                                num_hidden_layers=args.vision_layers,
                                num_attention_heads=max(1, args.vision_hidden // 64), image_size=384, patch_size=14)
    text = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                       max_position_embeddings=32768)
    source = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                  image_token_index=args.vocab - 2, video_token_index=args.vocab - 1)
    family = FAMILIES["llava_onevision"]
    config = family.config.from_llava_config(source, proxyv_start_layer=args.start_layer,
                                             proxyv_reduce_factor=args.factor, proxyv_video_frames=video_frames)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    model = family.head(config).eval()
    with torch.no_grad():  # a trained-looking VisionMLP: its output layer is not zero
        for mlp in model.model.proxyv.vision_mlps.values():
            mlp.out.weight.normal_(0.0, 0.02)
    return model


def prompt(model, case: str, text_tokens: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids around one video of 32 frames or one image at the largest pinpoint, with its pixels."""
    config = model.config
    side = config.vision_config.image_size
    if case == "video":
        pixels = {"pixel_values_videos": torch.randn(1, 32, 3, side, side, generator=generator)}
        media = torch.full((model.model.video_layout(32)[0],), config.video_token_id)
    else:
        pixels, extra, tokens = FAMILIES["llava_onevision"].synthetic_images(model, 1, generator)
        pixels = {"pixel_values": pixels, **extra}
        media = torch.full((tokens,), config.image_token_id)
    text = torch.randint(3, config.image_token_id, (text_tokens,), generator=generator)  # below both media tokens
    before = max(1, text_tokens // 8)
    ids = torch.cat([text[:before], media, text[before:]])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}


@torch.no_grad()
def measure(model, inputs: dict, args: argparse.Namespace, decode: bool) -> dict:
    core, lm = model.model, model.model.language_model
    embeds = core.get_input_embeddings()(inputs["input_ids"])  # the language model's input, computed once
    if "pixel_values_videos" in inputs:
        features = core.get_video_features(inputs["pixel_values_videos"]).pooler_output
        token = core.config.video_token_id
    else:
        features = core.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                           batch_num_images=inputs["batch_num_images"]).pooler_output
        token = core.config.image_token_id
    media = (inputs["input_ids"] == token)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(media, torch.cat(list(features)).to(embeds.dtype))
    kwargs = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "use_cache": False}

    def run(proxyv: bool):
        plan = core._pending_plan(dict(inputs)) if proxyv else None  # built at the start layer, as in a forward
        return lm(**kwargs, proxyv_plan=plan).last_hidden_state

    flops = {side: count_flops(lambda on=on: run(on)) for side, on in (("off", False), ("proxyv", True))}
    times = interleaved_medians({"off": lambda: run(False), "proxyv": lambda: run(True)}, args.repeats, args.warmup,
                                torch.device("cpu"))
    out = {"tokens": inputs["input_ids"].shape[1], "flops": flops, "times": times,
           "flops_ratio": flops["proxyv"] / flops["off"], "time_ratio": times["proxyv"] / times["off"]}
    if decode:
        out["decode_ms"] = decode_ms(model, inputs, args.decode_tokens)
    return out


def decode_ms(model, inputs: dict, tokens: int) -> dict[str, float]:
    """Median milliseconds of a greedy decode step after each side's own prefill, the steps interleaved."""
    state = {}
    for side in ("off", "proxyv"):
        with model.proxyv_disabled() if side == "off" else contextlib.nullcontext(), torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        state[side] = [out.logits[:, -1:].argmax(-1), inputs["attention_mask"], out.cache]
    times = {side: [] for side in state}
    for step in range(tokens):
        for side in state if step % 2 == 0 else list(state)[::-1]:
            token, mask, cache = state[side]
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            start = time.perf_counter()
            out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            times[side].append((time.perf_counter() - start) * 1000)
            state[side] = [out.logits[:, -1:].argmax(-1), mask, out.cache]
    return {side: round(statistics.median(values[1:]), 2) for side, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--start-layer", type=int, default=8)
    parser.add_argument("--factor", type=int, default=3, help="Reduce factor (divides the 27x27 grid: 3, 9 or 27).")
    parser.add_argument("--video-frames", type=int, nargs="+", default=[1, 2],
                        help="Frames per video proxy group, one video case each (1: per-frame proxies).")
    parser.add_argument("--cases", nargs="+", default=["video", "image"], choices=["video", "image"],
                        help="video: 32 frames; image: one image at the largest AnyRes pinpoint.")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=0, help="Untimed runs per side (counting FLOPs runs each once).")
    parser.add_argument("--decode-tokens", type=int, default=48, help="Greedy decode steps per side (first case).")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, command: {' '.join(sys.argv)}",
          flush=True)
    print(f"{'case':<16} {'tokens':>6} {'GFLOPs off':>10} {'FLOPs ratio':>11} {'off ms':>9} {'ProxyV ms':>9} "
          f"{'time ratio':>10} {'time/FLOPs':>10}  decode ms/token off/ProxyV", flush=True)
    first = True
    runs = [(case, frames) for case in args.cases for frames in (args.video_frames[:1] if case == "video" else [1])]
    runs += [("video", frames) for frames in args.video_frames[1:] if "video" in args.cases]  # the variants last
    for case, frames in runs:
        model = random_model(args, frames)
        inputs = prompt(model, case, args.text_tokens, torch.Generator().manual_seed(0))
        result = measure(model, inputs, args, decode=first and args.decode_tokens > 1)
        first = False
        name = f"video-32f-g{frames}" if case == "video" else "image-max-anyres"
        decode = result.get("decode_ms")
        decode_text = f"{decode['off']:.1f} / {decode['proxyv']:.1f}" if decode else ""
        print(f"{name:<16} {result['tokens']:>6} {result['flops']['off']:>10.1f} {result['flops_ratio']:>11.3f} "
              f"{result['times']['off']:>9.0f} {result['times']['proxyv']:>9.0f} {result['time_ratio']:>10.3f} "
              f"{result['time_ratio'] / result['flops_ratio']:>10.3f}  {decode_text}", flush=True)


if __name__ == "__main__":
    main()
