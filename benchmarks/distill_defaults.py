"""Which distillation objective and learning rate recover the original model best, for the same number of steps.

    python benchmarks/distill_defaults.py --source proxyv_convert/assets/llava-shapes --steps 150

For each setting it converts `--source` at its middle layer, distills on the shapes task's train split, and measures
on the first `--eval` test examples: answer accuracy with ProxyV (student) and off (teacher), answer agreement, and
the held-out hidden-state cosine and next-token KL from the distillation report. One table; the chosen defaults are
the best row.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from proxyv_convert.config import DistillSettings
from proxyv_convert.convert import convert
from proxyv_convert.distill import distill
from proxyv_convert.evaluate import evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True)
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--losses", nargs="+", default=["relative", "mse", "cosine"])
    parser.add_argument("--kl-weights", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--proxy", default="spatial", choices=["spatial", "learned"])
    args = parser.parse_args(argv)
    print(f"command: {' '.join(sys.argv)}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    work = Path(tempfile.mkdtemp(prefix="distill-defaults-"))
    rows = []
    try:
        base = work / "converted"
        convert(args.source, base, layer=_middle(args.source), proxy=args.proxy, progress=False)
        before = evaluate(base, args.data, limit=args.eval, against_original=True, progress=False)
        print(f"undistilled: ProxyV {before.accuracy:.1%}, original {before.other_accuracy:.1%}, "
              f"agreement {before.agreement:.1%}", flush=True)
        for loss, kl, lr in itertools.product(args.losses, args.kl_weights, args.lrs):
            folder = work / f"{loss}-{kl}-{lr}"
            shutil.copytree(base, folder)
            started = time.perf_counter()
            result = distill(folder, args.data, settings=DistillSettings(
                steps=args.steps, batch_size=args.batch_size, lr=lr, hidden_loss=loss, kl_weight=kl,
                checkpoint_every=args.steps, eval_examples=100,
            ), progress=False)
            seconds = time.perf_counter() - started
            scores = evaluate(folder, args.data, limit=args.eval, against_original=True, progress=False)
            after = result.report["after"]
            rows.append((loss, kl, lr, scores.accuracy, scores.other_accuracy, scores.agreement,
                         after["cosine_vision"], after["kl"], result.report["wall_seconds"], seconds))
            print(f"{loss:>8} kl {kl:<4} lr {lr:<7} student {scores.accuracy:.1%} teacher {scores.other_accuracy:.1%} "
                  f"agreement {scores.agreement:.1%} cos(vision) {after['cosine_vision']:.4f} "
                  f"KL {after['kl']:.4f} ({result.report['wall_seconds']:.0f} s training)", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nbest by agreement, then accuracy:")
    for row in sorted(rows, key=lambda r: (-r[5], -r[3]))[:3]:
        print(f"  hidden_loss={row[0]} kl_weight={row[1]} lr={row[2]}: agreement {row[5]:.1%}, accuracy {row[3]:.1%}")


def _middle(source: str) -> int:
    import json

    config = json.loads((Path(source) / "config.json").read_text())
    return config["text_config"]["num_hidden_layers"] // 2


if __name__ == "__main__":
    main()
