"""ProxyV served by vLLM against the same weights served as vLLM's own LLaVA, in one process, same prompts.

For each side an engine is started on its folder (the original llava folder, and its ProxyV conversion), the same
image prompts are prefilled (`max_tokens=1`), and two times are taken per batch: the language-model prefill (the
model's forward of the step holding the prompts, timed inside the engine) and the time to first token of the whole
request (processor, vision tower, prefill and sampling). The FLOPs ratio is the method's, counted on the transformers
ProxyV model by `proxyv_convert.bench` (every matmul and attention call of the language-model prefill).

    .venv-vllm/bin/python benchmarks/vllm_prefill.py      # CPU target: hidden 1024, 16 layers, start layer 8
    python benchmarks/vllm_prefill.py --dtype bfloat16 --hidden 4096 --intermediate 11008 --layers 32 --heads 32 \
        --vision-hidden 1024 --vision-layers 24 --start-layer 12 --batch-sizes 1 8      # LLaVA-1.5-7B shape, GPU

Needs vLLM and proxyv's plugin in the environment (`.ci/vllm-cpu-env`, or `pip install "proxyv[vllm]"` on a GPU).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its model can be timed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hub_fixtures import llava_hf_state_dict  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import IMAGE_TOKEN_ID, tiny_tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from proxyv_convert.bench import bench  # noqa: E402
from proxyv_convert.convert import convert  # noqa: E402
from proxyv_convert.model_folder import load_model  # noqa: E402

CHAT = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def build_original(args, folder: Path) -> None:
    """A random LLaVA of the asked shape (CLIP-style tower at 336 px, 14-px patches: 576 image tokens)."""
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden, num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 64), image_size=336, patch_size=14,
        projection_dim=args.vision_hidden,
    )
    text = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                       vocab_size=args.vocab, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_TOKEN_ID,
                         image_seq_length=576)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(getattr(torch, args.dtype)).eval()
    # The Hub's llava-hf key layout: vLLM's own LLaVA loader refuses the tower names transformers 5.x saves.
    folder.mkdir(parents=True)
    save_file(llava_hf_state_dict(model), folder / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = ["LlavaForConditionalGeneration"]
    model.config.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tiny_tokenizer(), patch_size=14, vision_feature_select_strategy="default", chat_template=CHAT,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)


def prompts(batch: int, text_tokens: int) -> list[dict]:
    words = " ".join(["red"] * (text_tokens - 2))
    out = []
    for seed in range(batch):
        picture = Image.fromarray((np.random.RandomState(seed).rand(336, 336, 3) * 255).astype("uint8"))
        out.append({"prompt": f"<image> {words}", "multi_modal_data": {"image": picture}})
    return out


def measure(folder: Path, args) -> dict[int, tuple[float, float, int]]:
    """batch -> (median LM prefill s, median time to first token s, prompt tokens per batch)."""
    from vllm import LLM, SamplingParams

    # No prefix caching on either side: the same prompts are prefilled again and again.
    llm = LLM(model=str(folder), dtype=args.dtype, max_model_len=2048, seed=0, enforce_eager=args.eager,
              gpu_memory_utilization=args.memory, max_num_seqs=max(args.batch_sizes), enable_prefix_caching=False)
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    forwards: list[tuple[int, float]] = []
    forward = model.forward

    def timed(*a, **kw):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        started = time.perf_counter()
        out = forward(*a, **kw)
        sync()
        positions = kw["positions"] if "positions" in kw else a[1]  # one per token of the step
        forwards.append((positions.shape[-1], time.perf_counter() - started))  # (tokens, seconds) of a step
        return out

    model.forward = timed
    params = SamplingParams(temperature=0, max_tokens=1)
    results = {}
    for batch in args.batch_sizes:
        requests = prompts(batch, args.text_tokens)
        lm, ttft, tokens = [], [], 0
        for repeat in range(args.warmup + args.repeats):
            forwards.clear()
            started = time.perf_counter()
            outputs = llm.generate(requests, params, use_tqdm=False)
            elapsed = time.perf_counter() - started
            tokens = sum(len(o.prompt_token_ids) for o in outputs)
            prefill = sum(seconds for _, seconds in forwards)  # max_tokens=1: every step of the call is prefill
            if repeat >= args.warmup:
                lm.append(prefill)
                ttft.append(elapsed)
        results[batch] = (statistics.median(lm), statistics.median(ttft), tokens)
        print(f"  {folder.name} batch {batch}: LM prefill {results[batch][0] * 1e3:.1f} ms, "
              f"TTFT {results[batch][1] * 1e3:.1f} ms ({tokens} prompt tokens)", flush=True)
    del llm, model
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()  # the next engine in this process starts from a clean state
    gc.collect()
    return results


def flops_ratios(folder: Path, args) -> dict[int, float]:
    model = load_model(folder, dtype=getattr(torch, args.dtype))
    out = {}
    for batch in args.batch_sizes:
        report = bench(model, cases=((batch, 1),), text_tokens=args.text_tokens, repeats=1, warmup=0,
                       whole_model=False, decode_tokens=0)
        out[batch] = report.cases[0].flops_ratio
    del model
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--start-layer", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory", type=float, default=0.3, help="vLLM's gpu_memory_utilization (CPU: of RAM)")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="enforce_eager on both sides (ProxyV's image steps always run eager)")
    args = parser.parse_args(argv)
    import vllm

    print(f"vllm {vllm.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"command: {' '.join(sys.argv)}", flush=True)
    with tempfile.TemporaryDirectory() as root:
        original, converted = Path(root) / "original", Path(root) / "proxyv"
        build_original(args, original)
        convert(str(original), converted, layer=args.start_layer, progress=False)
        flops = flops_ratios(converted, args)
        sides = {"original": measure(original, args), "proxyv": measure(converted, args)}
    print("\nbatch  tokens  FLOPs ratio  LM prefill off/ProxyV ms  LM ratio  ratio/FLOPs  TTFT off/ProxyV ms  "
          "TTFT ratio  prefill tok/s off/ProxyV")
    for batch in args.batch_sizes:
        (lm_off, ttft_off, tokens), (lm_on, ttft_on, _) = sides["original"][batch], sides["proxyv"][batch]
        ratio = lm_on / lm_off
        print(f"{batch:>5}  {tokens:>6}  {flops[batch]:>11.3f}  {lm_off * 1e3:>10.1f} / {lm_on * 1e3:<10.1f}  "
              f"{ratio:>8.3f}  {ratio / flops[batch]:>11.3f}  {ttft_off * 1e3:>8.1f} / {ttft_on * 1e3:<8.1f}  "
              f"{ttft_on / ttft_off:>10.3f}  {tokens / lm_off:>9.0f} / {tokens / lm_on:<9.0f}")


if __name__ == "__main__":
    main()
