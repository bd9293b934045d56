"""Distillation cost: steps per second, and peak memory against one plain-model forward+backward of the same batch.

    python benchmarks/distill_memory.py --source proxyv_convert/assets/llava-shapes --data shapes --batch-size 16

It converts `--source` at `--layer` (default: the middle), then, on the same batch:
  - plain: the original LlavaForConditionalGeneration, every weight trainable, language-model loss, forward+backward;
  - distill: one step of `proxyv distill` (teacher forward with ProxyV off, student forward, backward through the
    ProxyV modules only, AdamW step), with its one copy of the weights.
Memory = the weights plus the peak of every tensor created during the step (activations, gradients, optimizer state,
tracked from creation until freed; see proxyv_convert.bench.peak_memory_mb). It then times `--steps` steps of the
real `proxyv distill` loop. The ratio and the speed are the results; absolute values depend on the machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from proxyv_convert.batching import Batcher
from proxyv_convert.bench import peak_memory_mb
from proxyv_convert.config import DistillSettings
from proxyv_convert.convert import convert
from proxyv_convert.data import load_data
from proxyv_convert.distill import distill, distill_losses, teacher_and_student
from proxyv_convert.model_folder import load_model


def weight_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def measure_plain(plain: torch.nn.Module, batch) -> tuple[float, float]:
    """(peak tensor MB, weight MB) of a forward+backward of the plain model, every weight trainable."""
    plain.train()

    def step() -> None:
        labels = batch.inputs["input_ids"].masked_fill(batch.inputs["attention_mask"] == 0, -100)
        plain(**batch.inputs, labels=labels).loss.backward()

    return peak_memory_mb(step, torch.device("cpu")), weight_mb(plain)


def measure_distill(folder: Path, batch) -> tuple[float, float]:
    """(peak tensor MB, weight MB) of one distillation step: teacher forward, student forward and backward, AdamW."""
    model = load_model(folder)
    model.requires_grad_(False)
    model.model.proxyv.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.model.proxyv.parameters(), lr=1e-3)
    settings = DistillSettings()

    def step() -> None:
        teacher, student = teacher_and_student(model, batch)
        distill_losses(model, student, teacher, batch, settings)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return peak_memory_mb(step, torch.device("cpu")), weight_mb(model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a plain LLaVA folder")
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="steps of the real loop to time")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: {' '.join(sys.argv)}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    try:
        plain = LlavaForConditionalGeneration.from_pretrained(args.source, dtype=torch.float32)
        layer = args.layer if args.layer is not None else plain.config.text_config.num_hidden_layers // 2
        convert(args.source, work / "m", layer=layer, progress=False)
        processor = AutoProcessor.from_pretrained(work / "m")
        data = load_data(args.data, split="train")
        batch = Batcher(data, processor, plain.config.image_token_id, 2048)(list(range(args.batch_size)))

        plain_peak, plain_weights = measure_plain(plain, batch)
        plain_total = plain_weights + plain_peak
        del plain
        distill_peak, distill_weights = measure_distill(work / "m", batch)
        distill_total = distill_weights + distill_peak
        print(f"batch {args.batch_size} x {batch.inputs['input_ids'].shape[1]} tokens, ProxyV from layer {layer}")
        print(f"plain forward+backward: weights {plain_weights:.1f} MB + peak tensors {plain_peak:.1f} MB = "
              f"{plain_total:.1f} MB")
        print(f"distill step:           weights {distill_weights:.1f} MB + peak tensors {distill_peak:.1f} MB = "
              f"{distill_total:.1f} MB")
        print(f"memory ratio (distill / plain): {distill_total / plain_total:.3f}", flush=True)

        result = distill(work / "m", args.data, settings=DistillSettings(
            steps=args.steps, batch_size=args.batch_size, eval_examples=8, checkpoint_every=args.steps,
        ), progress=False)
        print(f"distill loop: {result.report['steps']} steps in {result.report['wall_seconds']} s = "
              f"{result.report['steps_per_second']:.3f} steps/s ({result.report['steps_per_second'] * 60:.1f}/min)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
