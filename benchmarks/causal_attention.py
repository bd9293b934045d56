"""What a causal attention call costs against the same call attending over every key, which is why the FLOPs counter
(`proxyv_convert.bench.count_flops`) counts a causal call as the query-key pairs on and below the diagonal.

    python benchmarks/causal_attention.py            # 6,305 tokens, 16 heads of 64: the 32-frame video's prefill

Prints the median time of `scaled_dot_product_attention` with `is_causal=True` and without (interleaved calls), their
ratio, and the ratio of the FLOPs counted for the two calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from proxyv_convert.bench import count_flops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=6305)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, args.heads, args.tokens, args.head_dim) for _ in range(3))
    calls = {causal: (lambda causal=causal: F.scaled_dot_product_attention(query, key, value, is_causal=causal))
             for causal in (True, False)}
    flops = {causal: count_flops(call) for causal, call in calls.items()}
    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(args.repeats):
        for causal in (True, False) if repeat % 2 == 0 else (False, True):
            start = time.perf_counter()
            calls[causal]()
            times[causal].append((time.perf_counter() - start) * 1000)
    median = {causal: statistics.median(values) for causal, values in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {args.tokens} tokens, "
          f"{args.heads} heads of {args.head_dim}")
    print(f"causal {median[True]:.0f} ms, every key {median[False]:.0f} ms: time ratio "
          f"{median[True] / median[False]:.3f}, counted FLOPs ratio {flops[True] / flops[False]:.3f}")


if __name__ == "__main__":
    main()
