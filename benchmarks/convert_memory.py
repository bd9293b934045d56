"""Peak memory of `proxyv convert` against checkpoint size: streaming means it must not grow with the model.

For each size, generates a random LLaVA checkpoint locally (bf16, llava-hf's Hub key layout, a Llama-2048-wide
language model deep enough to reach the size, a small CLIP tower with a 24x24 grid), written tensor by tensor so
that generating it does not need the whole model in memory either. Then runs `python -m proxyv_convert.cli convert`
in a subprocess and reads that process's own peak RSS (`os.wait4`), and the peak RSS of a subprocess that only
imports the modules `convert` imports (the baseline). Usage:

    python benchmarks/convert_memory.py --sizes-gb 1 2 [--cast float32] [--workdir /tmp/x]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 2048, 5632, 16, 32064
BASELINE_IMPORTS = "import proxyv_convert.cli, proxyv_convert.convert"


def layers_for(size_bytes: float) -> int:
    """Decoder layers that bring a bf16 checkpoint of this width to `size_bytes` (the rest is embeddings + head)."""
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE)
    fixed = 2 * (2 * VOCAB * HIDDEN)
    return max(2, math.ceil((size_bytes - fixed) / per_layer))


def generate(folder: Path, layers: int) -> None:
    """Write config.json + model.safetensors of a random bf16 LLaVA, one tensor in memory at a time."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from proxyv_convert.safetensors_stream import OutputTensor, write_checkpoint

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
            image_size=336, patch_size=14, projection_dim=256,
        ).to_dict(),
        text_config=LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers, num_attention_heads=HEADS,
            num_key_value_heads=HEADS, vocab_size=VOCAB,
        ).to_dict(),
        image_token_index=VOCAB - 1,
        dtype="bfloat16",
    )  # fmt: skip
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlavaForConditionalGeneration(config).state_dict().items()}

    def random_bytes(shape):
        def write(out):
            out.write(torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02).reshape(-1).view(torch.uint8).numpy())

        return write

    tensors = [OutputTensor(hub_name(name), "BF16", shape, random_bytes(shape)) for name, shape in shapes.items()]
    folder.mkdir(parents=True)
    config.to_json_file(folder / "config.json")
    write_checkpoint(folder, tensors, 2 * 2**30, lambda n: None)


def hub_name(native: str) -> str:
    """Native transformers 5 name -> the key layout of llava-hf checkpoints on the Hub."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if native.startswith(new):
            return old + native[len(new) :]
    raise AssertionError(native)


def peak_rss(command: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of a subprocess, from the kernel's accounting of that process alone."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            err.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{err.read().decode()}")
    return usage.ru_maxrss * 1024, time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(workdir: Path, size_gb: float, dtype: str) -> dict[str, float]:
    source = workdir / f"llava-{size_gb:g}gb"
    layers = layers_for(size_gb * 1e9)
    if not source.exists():
        subprocess.run([sys.executable, __file__, "--generate", str(source), "--layers", str(layers)], check=True)
    out = workdir / f"{source.name}-proxyv-{dtype}"
    command = [sys.executable, "-m", "proxyv_convert.cli", "convert", str(source), "--layer", str(layers // 2)]
    command += ["--out", str(out), "--dtype", dtype, "--overwrite", "--quiet"]
    peak, seconds = peak_rss(command)
    row = {"checkpoint_gb": folder_bytes(source) / 1e9, "output_gb": folder_bytes(out) / 1e9, "peak_rss_mb": peak / 1e6}
    row.update(ratio=peak / folder_bytes(source), seconds=seconds, layers=layers)
    shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 2.0], help="checkpoint sizes (>= 1 GB)")
    parser.add_argument("--cast", default=None, help="also measure --dtype CAST (e.g. float32: the cast path)")
    parser.add_argument(
        "--workdir", type=Path, help="keep the checkpoints here and reuse them (default: a temp folder)"
    )
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.layers)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="proxyv-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    baseline, _ = peak_rss([sys.executable, "-c", BASELINE_IMPORTS])
    print(f"baseline: peak RSS of `python -c '{BASELINE_IMPORTS}'` = {baseline / 1e6:.0f} MB")
    print(f"{'dtype':>8} {'ckpt GB':>8} {'out GB':>7} {'layers':>6} {'peak RSS MB':>11} {'RSS/ckpt':>8} "
          f"{'(RSS-base)/ckpt':>15} {'seconds':>7}")  # fmt: skip
    try:
        for size in args.sizes_gb:
            for dtype in ["auto"] + ([args.cast] if args.cast else []):
                row = measure(workdir, size, dtype)
                above = (row["peak_rss_mb"] * 1e6 - baseline) / (row["checkpoint_gb"] * 1e9)
                print(
                    f"{dtype:>8} {row['checkpoint_gb']:8.2f} {row['output_gb']:7.2f} {row['layers']:6d} "
                    f"{row['peak_rss_mb']:11.0f} {row['ratio']:8.3f} {above:15.3f} {row['seconds']:7.1f}",
                    flush=True,
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
