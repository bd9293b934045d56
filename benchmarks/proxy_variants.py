"""Spatial against learned proxies on the built-in task: test accuracy before and after distillation.

    python benchmarks/proxy_variants.py --source proxyv_convert/assets/llava-shapes --steps 300

For each variant it converts `--source` at `--layer` (default: the middle), evaluates the whole test split with
ProxyV on and off (the original model's computation) before distilling, distills `--steps` steps on the train split
with the library's defaults (and `--batch-size`), and evaluates again. One table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from proxyv_convert.config import DistillSettings
from proxyv_convert.convert import convert
from proxyv_convert.distill import distill
from proxyv_convert.evaluate import evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="proxyv_convert/assets/llava-shapes")
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=["spatial", "learned"], choices=["spatial", "learned"])
    args = parser.parse_args(argv)
    print(f"command: {' '.join(sys.argv)}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    config = json.loads((Path(args.source) / "config.json").read_text())
    layer = args.layer if args.layer is not None else config["text_config"]["num_hidden_layers"] // 2

    work = Path(tempfile.mkdtemp(prefix="proxy-variants-"))
    rows = []
    try:
        for variant in args.variants:
            folder = work / variant
            convert(args.source, folder, layer=layer, proxy=variant, progress=False)
            before = evaluate(folder, args.data, against_original=True, progress=False)
            result = distill(folder, args.data, settings=DistillSettings(
                steps=args.steps, batch_size=args.batch_size, checkpoint_every=args.steps,
            ), progress=False)
            after = evaluate(folder, args.data, against_original=True, progress=False)
            row = (variant, before.other_accuracy, before.accuracy, before.agreement, after.accuracy, after.agreement,
                   result.report["wall_seconds"])
            rows.append(row)
            print(f"{variant}: original {row[1]:.1%}; before {row[2]:.1%} (agreement {row[3]:.1%}); "
                  f"after {row[4]:.1%} (agreement {row[5]:.1%}); {row[6]:.0f} s distillation", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nlayer {layer}, {args.steps} steps, batch {args.batch_size}, test split ({before.n} examples)")
    print("| proxies | original | ProxyV before | agreement before | ProxyV after | agreement after | distill s |")
    print("|---|---|---|---|---|---|---|")
    for variant, original, acc0, agree0, acc1, agree1, seconds in rows:
        print(f"| {variant} | {original:.1%} | {acc0:.1%} | {agree0:.1%} | {acc1:.1%} | {agree1:.1%} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
