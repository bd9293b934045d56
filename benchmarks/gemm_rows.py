"""Matrix-product throughput against the number of rows, at the CPU prefill benchmark's width.

    python benchmarks/gemm_rows.py

A ProxyV layer runs its query, output and FFN projections on about 100 rows (64 text tokens + 36 proxies at batch 1)
where the full layer runs them on 640; this prints GFLOP/s of those projections for several row counts (median of
`--repeats` timed calls after warm-up), which is what keeps the ProxyV prefill time ratio a little above its FLOPs
ratio on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--rows", type=int, nargs="+", default=[100, 128, 160, 576, 640])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    torch.manual_seed(0)
    weights = {"q/o": torch.randn(args.hidden, args.hidden), "gate/up": torch.randn(args.intermediate, args.hidden),
               "down": torch.randn(args.hidden, args.intermediate)}
    print("rows  " + "  ".join(f"{name:>12}" for name in weights) + "   (GFLOP/s)")
    for rows in args.rows:
        rates = []
        for weight in weights.values():
            x = torch.randn(rows, weight.shape[1])
            for _ in range(3):
                F.linear(x, weight)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                F.linear(x, weight)
                times.append(time.perf_counter() - start)
            rates.append(2 * rows * weight.shape[0] * weight.shape[1] / statistics.median(times) / 1e9)
        print(f"{rows:>4}  " + "  ".join(f"{rate:>12.1f}" for rate in rates))


if __name__ == "__main__":
    main()
