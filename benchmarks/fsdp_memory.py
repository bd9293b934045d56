"""Memory per process of `proxyv distill` with the frozen weights sharded (FSDP2, N processes) against one process.

    python benchmarks/fsdp_memory.py [--hidden 1024 --layers 8 --processes 2 --steps 3]

It widens the built-in shapes model's language model to `--hidden` x `--layers` (random float32 weights, the same
vision tower and processor), converts it at the middle layer, and distils it on `shapes` twice with the same data
per step: one process (micro-batches of 2, accumulating `--processes` of them) and `--processes` CPU processes
launched with `accelerate launch --config_file recipes/accelerate/fsdp.yaml` (micro-batches of 2 each). Each process
reports:
  - frozen MB: the bytes of the frozen weights it holds (its shards under FSDP);
  - RSS at step 1: resident memory when training starts (model loaded and sharded);
  - training peak: the peak RSS from the first step to the last (Linux VmHWM, reset when training starts);
  - run peak: the peak RSS of the whole process, loading included (every process loads the whole checkpoint before
    it is sharded).
glibc's mmap threshold is pinned to 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed weights leave the RSS at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ASSET = Path(__file__).resolve().parent.parent / "proxyv_convert" / "assets" / "llava-shapes"
CONFIG = Path(__file__).resolve().parent.parent / "recipes" / "accelerate" / "fsdp.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")


def widened_model(folder: Path, hidden: int, layers: int) -> Path:
    """The shapes model with a `hidden`-wide, `layers`-deep random language model, as a ProxyV folder."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from proxyv_convert.convert import convert

    config = LlavaConfig.from_pretrained(ASSET)
    text = config.text_config
    text.hidden_size, text.num_hidden_layers, text.intermediate_size = hidden, layers, hidden * 11 // 4
    text.num_attention_heads = text.num_key_value_heads = hidden // 64
    torch.manual_seed(0)
    source = folder / "source"
    LlavaForConditionalGeneration(config).save_pretrained(source)
    for path in ASSET.iterdir():
        if path.suffix != ".safetensors" and path.name != "config.json" and not (source / path.name).exists():
            shutil.copy(path, source / path.name)
    convert(str(source), folder / "converted", layer=layers // 2, progress=False)
    return folder / "converted"


def status_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def worker(folder: Path, result: Path, steps: int, accumulation: int) -> None:
    """One process of a run: distil with its measurements, write them to `result`/rank<N>.json."""
    from proxyv_convert import distill as distill_module
    from proxyv_convert.config import DistillSettings
    from proxyv_convert.sharding import local

    numbers: dict = {}
    train_step = distill_module.train_step

    def measured_step(model, *args, **kwargs):
        if not numbers:  # training starts: what the process holds, and the peak from now on
            frozen = [p for p in model.parameters() if not p.requires_grad]
            numbers["frozen_mb"] = sum(local(p).numel() * p.element_size() for p in frozen) / 2**20
            numbers["rss_at_step_1_mb"] = status_mb("VmRSS")
            numbers["loading_peak_mb"] = status_mb("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (ru_maxrss too)
        logged = train_step(model, *args, **kwargs)
        numbers["training_peak_mb"] = status_mb("VmHWM")
        return logged

    distill_module.train_step = measured_step
    settings = DistillSettings(steps=steps, batch_size=2, gradient_accumulation=accumulation, eval_examples=2,
                               checkpoint_every=steps, warmup_steps=1)
    distill_module.distill(folder, "shapes", settings=settings, progress=False)
    numbers["run_peak_mb"] = max(numbers["loading_peak_mb"], status_mb("VmHWM"))
    rank = int(os.environ.get("RANK", "0"))
    (result / f"rank{rank}.json").write_text(json.dumps(numbers))


def run(model: Path, work: Path, name: str, processes: int, steps: int, accumulation: int) -> list[dict]:
    """The measurements of each process of one run (one plain process, or several under FSDP)."""
    folder, result = work / name, work / f"{name}-result"
    shutil.copytree(model, folder)
    result.mkdir()
    script = [__file__, "--worker", str(folder), "--result", str(result), "--steps", str(steps),
              "--accumulation", str(accumulation)]
    launch = [] if processes == 1 else ["-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                                        "--num_processes", str(processes)]
    subprocess.run([sys.executable, *launch, *script], env=ENV, check=True, stdout=subprocess.DEVNULL)
    return [json.loads((result / f"rank{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--accumulation", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.result, args.steps, args.accumulation)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = widened_model(work, args.hidden, args.layers)
        rows = [("one process", run(model, work, "one", 1, args.steps, args.processes)[0])]
        rows += [(f"fsdp rank {r} of {args.processes}", numbers)
                 for r, numbers in enumerate(run(model, work, "fsdp", args.processes, args.steps, 1))]
    print(f"language model {args.hidden} wide, {args.layers} layers; {args.steps} steps of {2 * args.processes} "
          "examples; MB")
    columns = ("frozen_mb", "rss_at_step_1_mb", "training_peak_mb", "run_peak_mb")
    print(f"{'':22}" + "".join(f"{c.removesuffix('_mb'):>18}" for c in columns))
    for name, numbers in rows:
        print(f"{name:22}" + "".join(f"{numbers[c]:18.1f}" for c in columns))


if __name__ == "__main__":
    main()
