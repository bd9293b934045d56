"""ProxyV prefill speed against the same weights with ProxyV off, for several start layers, in one run.

A random LLaVA (CLIP-L/336-like grid of 24x24 = 576 image tokens, a Llama language model of the given width and
depth) is converted in memory with a non-zero VisionMLP, then `proxyv_convert.bench` times both modes on the same
inputs, interleaved. The printed ratios (ProxyV / off) are the result; absolute times depend on the machine.

    python benchmarks/prefill_speed.py                       # CPU target: hidden 1024, 16 layers, start layers 4/8/12
    # GPU targets (LLaVA-1.5-7B shape, bf16): batch 1 and 8 with one 576-token image ...
    python benchmarks/prefill_speed.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 \
        --layers 32 --heads 32 --vision-hidden 1024 --start-layers 12 --cases 1x1 8x1 --modes eager cuda-graph
    # ... and LLaVA-NeXT's 5 crops (2,928 image tokens), batch 1
    python benchmarks/prefill_speed.py --arch llava_next --device cuda --dtype bfloat16 --hidden 4096 \
        --intermediate 11008 --layers 32 --heads 32 --start-layers 12 --cases 1x1 --modes eager cuda-graph
    (benchmarks/gpu_prefill.sh runs all of them, compile mode included.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

from proxyv_convert.bench import bench, format_report
from proxyv_convert.families import FAMILIES

# LLaVA-NeXT's AnyRes resolutions for 336-pixel crops: 672x672 gives 2x2 crops + the base image = 5 crops.
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def random_model(args: argparse.Namespace, start_layer: int):
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden, num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 64), image_size=336, patch_size=14,
        projection_dim=args.vision_hidden,
    )
    text = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                       vocab_size=args.vocab, max_position_embeddings=8192)
    if args.arch == "llava_next":
        llava = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                image_token_index=args.vocab - 1, image_grid_pinpoints=PINPOINTS)
    else:
        llava = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                            image_token_index=args.vocab - 1)
    family = FAMILIES[args.arch]
    config_class, head = family.config, family.head
    config = config_class.from_llava_config(llava, proxyv_start_layer=start_layer, proxyv_reduce_factor=4,
                                            proxyv_proxy=args.proxy)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(args.device):
        model = head(config)
    model = model.to(getattr(torch, args.dtype)).eval()
    with torch.no_grad():  # a trained-looking VisionMLP: its output layer is not zero
        for mlp in model.model.proxyv.vision_mlps.values():
            mlp.out.weight.normal_(0.0, 0.02)
    return model


def model_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of the random model (also used by profile_ops.py)."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--arch", default="llava", choices=["llava", "llava_next"],
                        help="llava_next: every image is 5 crops (2,928 image tokens)")
    parser.add_argument("--proxy", default="spatial", choices=["spatial", "learned"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    return parser


def case_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of the scripts that look at one start layer in BATCHxIMAGES cases (layer_profile.py,
    prefill_trace.py, forward_variants.py)."""
    parser.add_argument("--start-layer", type=int, default=8)
    parser.add_argument("--cases", nargs="+", default=["1x1"], help="BATCHxIMAGES cases, e.g. 1x1 8x1.")
    parser.add_argument("--text-tokens", type=int, default=64)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = model_options(argparse.ArgumentParser(description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--start-layers", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--images", type=int, nargs="+", default=[1])
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32, help="Greedy decode steps timed per side.")
    parser.add_argument("--cases", nargs="+", help="BATCHxIMAGES cases, e.g. 1x1 8x1 1x5 (instead of the product).")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "cuda-graph", "compile"],
                        help="Execution modes, each timed on the same model (both sides always in the same mode).")
    parser.add_argument("--compile", action="store_true", help="Same as --modes compile.")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA).")
    parser.add_argument("--no-whole-model", action="store_true", help="Time only the language model.")
    parser.add_argument("--separate-projections", action="store_true",
                        help="Keep k/v and gate/up as separate products in the ProxyV layers (the model fuses them).")
    parser.add_argument("--json", help="Also write the reports to this file.")
    args = parser.parse_args(argv)
    if args.compile:
        args.modes = ["compile"]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, command: {' '.join(sys.argv)}",
          flush=True)
    reports = []
    cases = [tuple(int(n) for n in case.split("x")) for case in args.cases] if args.cases else None
    failures = 0
    for start_layer in args.start_layers:
        started = time.perf_counter()
        model = random_model(args, start_layer)
        if args.separate_projections:
            model.fuse_projections(False)
        print(f"model built in {time.perf_counter() - started:.0f} s", flush=True)
        for mode in args.modes:
            started = time.perf_counter()
            report = None
            # One case at a time, printed as it ends, so a run cut short keeps what it measured.
            for case in cases or [(b, n) for b in args.batch_sizes for n in args.images]:
                try:
                    one = bench(model, cases=(case,), text_tokens=args.text_tokens, decode_tokens=args.decode_tokens,
                                repeats=args.repeats, warmup=args.warmup, compile=mode == "compile",
                                cuda_graph=mode == "cuda-graph", compile_mode=args.compile_mode,
                                # the whole model and decoding run eager in every mode: timed once, in eager
                                whole_model=not args.no_whole_model and mode == "eager")
                except Exception as error:  # a failing mode or case must not lose the others' numbers
                    print(f"L{start_layer} {mode} {case}: FAILED: {type(error).__name__}: {error}", flush=True)
                    failures += 1
                    continue
                print(format_report(one), flush=True)
                if report is None:
                    report = one
                    reports.append(report)
                else:
                    report.cases += one.cases
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump([json.loads(r.to_json()) for r in reports], f, indent=1)
            print(f"({mode}: {time.perf_counter() - started:.0f} s)\n", flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print("summary: start layer, mode, case -> FLOPs ratio, LM prefill time ratio (speedup), time ratio / FLOPs "
          "ratio, decode ratio")
    for report in reports:
        for c in report.cases:
            print(f"  L{report.start_layer:<3} {report.mode:<26} batch {c.batch} images {c.images} "
                  f"({c.image_tokens} image tokens): FLOPs {c.flops_ratio:.3f}  time {c.lm_prefill_ratio:.3f} "
                  f"({1 / c.lm_prefill_ratio:.2f}x)  time/FLOPs {c.lm_prefill_ratio / c.flops_ratio:.3f}  "
                  f"decode {c.decode_ratio or float('nan'):.3f}")
    if failures:
        sys.exit(f"{failures} case(s) failed (see above)")


if __name__ == "__main__":
    main()
