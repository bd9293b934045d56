"""The same ProxyV language-model prefill computed with other forms of its parts, each timed against ProxyV off in
one rotation: what each implementation choice costs inside whole prefills, where one layer alone may not show it.
On the random model of prefill_speed.py (same model options).

    python benchmarks/forward_variants.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 \\
        --layers 32 --heads 32 --vision-hidden 1024 --start-layer 12 --cases 1x1 8x1

Variants (same weights, same inputs; each computes the same prefill up to rounding, which the table shows):
  current     the model as it is;
  assemble    the layer's output laid out as the gradient path lays it (distillation's path, here without any
              gradient): the VisionMLP's sums in new tensors, the output assembled by row scatters, instead of one
              buffer written in place and gathered once;
  flip-rope   RoPE from a swapped copy of x (x * cos + swap_halves(x) * signed_sin) instead of half by half;
  norm-apart  the Llama norms as a weightless rms_norm times the weight instead of one rms_norm with the weight;
  previous    assemble, flip-rope and norm-apart together: the forms of the version measured in
              benchmarks/results/h100-2026-11-27b;
  no-replan   the current forms with the plan built once beforehand: no host work for the plan in the run (what
              building a prompt's plan, and on CUDA copying it into the graph's tensors, adds to each run);
  one-graph   CUDA graph only: the prefill in one graph, the new prompt's plan built and copied before the replay,
              instead of two graphs cut before the start layer with the plan built while the first runs.
Times are medians of interleaved repeats (off and every variant in one rotation, the order reversed every other
repeat) after warm-up. On CUDA every side runs in CUDA graphs as `proxyv bench --cuda-graph` runs it (see
`Runner.cuda_graph_prefill`: each run builds a new prompt's plan on the host and copies it in); `--mode eager` runs
them eagerly (the default off CUDA; one-graph is then left out).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from prefill_speed import case_options, model_options, random_model

from proxyv_convert.bench import Runner, interleaved_medians, synthetic_inputs

VARIANTS = ("current", "assemble", "flip-rope", "norm-apart", "previous", "no-replan", "one-graph")


def flip_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


def norm_apart(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * F.rms_norm(x, x.shape[-1:], eps=eps)


@contextlib.contextmanager
def forms(model, variant: str) -> Iterator[None]:
    """The model computes with `variant`'s forms inside the block. The gradient path runs with gradients enabled,
    which builds no graph because no parameter or input requires a gradient (see `main`)."""
    module = inspect.getmodule(type(model))
    patches = {}
    if variant in ("flip-rope", "previous"):
        patches["apply_rope"] = flip_rope
    if variant in ("norm-apart", "previous"):
        patches["rms_norm"] = norm_apart
    saved = {name: getattr(module, name) for name in patches}
    try:
        for name, function in patches.items():
            setattr(module, name, function)
        with torch.set_grad_enabled(variant in ("assemble", "previous")):
            yield
    finally:
        for name, function in saved.items():
            setattr(module, name, function)


def prefill_fn(runner: Runner, variant: str | None, cuda_graph: bool) -> Callable[[], torch.Tensor]:
    """One timed prefill of `variant` (None: ProxyV off), as the benchmark runs it in the chosen mode."""
    model = runner.model
    if cuda_graph:
        if variant is None:
            return runner.cuda_graph_prefill(False)
        run = runner.cuda_graph_prefill(True, split=variant != "one-graph", forms=partial(forms, model, variant))
        if variant != "no-replan":
            return run

        def replay() -> torch.Tensor:
            for graph in run.graphs:
                graph.replay()
            return run.out

        replay.keep = run
        return replay

    def forward(plan) -> torch.Tensor:
        return runner.lm(**runner.lm_kwargs(plan)).last_hidden_state

    if variant is None:
        def off() -> torch.Tensor:
            with torch.no_grad():
                return forward(None)

        return off
    fixed = runner.plan() if variant == "no-replan" else None

    def run_eager() -> torch.Tensor:
        with forms(model, variant):
            return forward(fixed if fixed is not None else runner.pending_plan())

    return run_eager


def main(argv: list[str] | None = None) -> None:
    parser = case_options(model_options(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--mode", choices=["eager", "cuda-graph"], help="Default: cuda-graph on CUDA, else eager.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, command: {' '.join(sys.argv)}", flush=True)
    model = random_model(args, args.start_layer).requires_grad_(False)
    device = model.device
    mode = args.mode or ("cuda-graph" if device.type == "cuda" else "eager")
    if mode == "cuda-graph" and device.type != "cuda":
        parser.error("--mode cuda-graph needs --device cuda")
    # "current" is the reference of the comparison; one graph or two is a CUDA-graph matter.
    variants = ["current", *(v for v in args.variants if v != "current" and (mode == "cuda-graph" or v != "one-graph"))]
    for case in args.cases:
        batch, images = (int(n) for n in case.split("x"))
        runner = Runner(model, synthetic_inputs(model, batch, images, args.text_tokens))
        runs = {"off": prefill_fn(runner, None, mode == "cuda-graph")}
        runs.update({variant: prefill_fn(runner, variant, mode == "cuda-graph") for variant in variants})
        with torch.no_grad():
            outputs = {name: run().float().clone() for name, run in runs.items()}
        times = interleaved_medians(runs, args.repeats, args.warmup, device)
        scale = outputs["current"].abs().max().item()
        print(f"\n== batch {batch}, images {images} ({runner.embeds.shape[1]} tokens), {mode}, {device}, "
              f"{model.dtype}, ProxyV from layer {args.start_layer}; medians of {args.repeats} interleaved repeats")
        print(f"{'variant':>10} {'ms':>9} {'/ off':>7} {'/ current':>9} {'max |diff| / max |current|':>27}")
        print(f"{'off':>10} {times['off']:9.3f} {1:7.3f} {times['off'] / times['current']:9.3f}")
        for variant in variants:
            diff = (outputs[variant] - outputs["current"]).abs().max().item() / scale
            print(f"{variant:>10} {times[variant]:9.3f} {times[variant] / times['off']:7.3f} "
                  f"{times[variant] / times['current']:9.3f} {diff:27.2e}", flush=True)


if __name__ == "__main__":
    main()
