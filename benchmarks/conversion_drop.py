"""How much an undistilled ProxyV conversion of a shapes model (the shipped one by default) loses, by start
layer and reduce factor.

    python benchmarks/conversion_drop.py [--n 600] [--factors 4 2] [--model DIR]

Accuracy per question kind on the test split (greedy answers, exact match), the original model first. A fresh
conversion's VisionMLPs output zero, so from the start layer on the vision tokens keep their start-layer states:
what is lost is what the model computes in the vision tokens after that layer.
"""

from __future__ import annotations

import argparse
import time

from transformers import LlavaForConditionalGeneration

from proxyv_convert.shapes import MODEL_DIR
from proxyv_convert.shapes.processor import build_processor
from proxyv_convert.shapes.task import KINDS
from proxyv_convert.shapes.train import answer_accuracy, converted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=600, help="test examples")
    parser.add_argument("--factors", type=int, nargs="+", default=[4])
    parser.add_argument("--model", default=str(MODEL_DIR), help="a shapes LLaVA (default: the shipped one)")
    args = parser.parse_args(argv)
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = build_processor()
    layers = model.config.text_config.num_hidden_layers
    header = f"{'model':<24}" + "".join(f"{k:>9}" for k in (*KINDS, "all")) + f"{'drop':>8}"
    print(header)
    started = time.perf_counter()
    original = answer_accuracy(model, processor, "test", args.n)

    def row(name: str, accuracy: dict[str, float]) -> None:
        cells = "".join(f"{100 * accuracy[k]:>8.1f}%" for k in (*KINDS, "all"))
        print(f"{name:<24}{cells}{100 * (original['all'] - accuracy['all']):>7.1f}", flush=True)

    row("original", original)
    for factor in args.factors:
        for start in range(1, layers):
            proxyv = converted(model, start, factor)
            row(f"ProxyV L{start} factor {factor}", answer_accuracy(proxyv, processor, "test", args.n))
    print(f"({time.perf_counter() - started:.0f} s; drop: points of 'all' below the original)")


if __name__ == "__main__":
    main()
