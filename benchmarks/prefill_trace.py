"""Where the time of a timed language-model prefill goes, ProxyV on and off: profiler timelines of the very runs
that prefill_speed.py (`proxyv_convert.bench`) times, on the random model of prefill_speed.py (same model options).

    python benchmarks/prefill_trace.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 \\
        --layers 32 --heads 32 --vision-hidden 1024 --start-layer 12 --cases 1x1 8x1 --traces traces/

For every case, mode (eager; on CUDA also the CUDA graph of `Runner.cuda_graph_prefill`) and side it profiles
`--runs` runs (each between two synchronisations, as the benchmark times them) and prints medians per run of
  wall:     the run, start to end (what the benchmark's median is made of);
  plan:     host time building the ProxyV plan (inside the run);
  to GPU:   from the run's start to its first kernel (the host work before the device has anything to do);
  replay:   CUDA graph: from the run's start to the first graph's launch (the host work before it, whether or not
            the profiler sees the kernels inside graphs; ProxyV builds its plan after launching the first of its two
            graphs, see `Runner.cuda_graph_prefill`);
  span:     the first kernel's start to the last kernel's end;
  busy:     the kernels' own time (span - busy: the device idle between kernels);
  kernels:  kernels and copies on the device.
So a run's time splits into host work before the device starts, device work, and device idle. With --traces, every
profile is also written as a Chrome trace (gzip JSON; Perfetto or chrome://tracing open it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from prefill_speed import case_options, model_options, random_model
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from proxyv_convert.bench import Runner, synchronize, synthetic_inputs

RUN, PLAN, REPLAY = "prefill-trace run", "prefill-trace plan", "prefill-trace replay"


def mark_graph_replays() -> None:
    """Every CUDA graph replay marked in the profile."""
    replay = torch.cuda.CUDAGraph.replay

    def marked(graph):
        with record_function(REPLAY):
            return replay(graph)

    torch.cuda.CUDAGraph.replay = marked


COLUMNS = ("wall", "plan", "to GPU", "replay", "span", "busy", "kernels")


def with_plan_range(runner: Runner) -> Runner:
    """The runner, its plan building marked in the profile (the timed functions call `runner.plan()`)."""
    build = runner.plan

    def plan():
        with record_function(PLAN):
            return build()

    runner.plan = plan
    return runner


def run_table(fn, device: torch.device, runs: int, warmup: int, trace: Path | None) -> dict[str, float]:
    """Medians per run (ms, and the kernel count) of the quantities in the module docstring."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(runs):
            synchronize(device)
            with record_function(RUN):
                fn()
                synchronize(device)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    events = prof.events()
    ranges = sorted((e.time_range.start, e.time_range.end) for e in events
                    if e.name == RUN and e.device_type == DeviceType.CPU)
    plans = [(e.time_range.start, e.time_range.end) for e in events
             if e.name == PLAN and e.device_type == DeviceType.CPU]
    replays = [e.time_range.start for e in events if e.name == REPLAY and e.device_type == DeviceType.CPU]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    rows: dict[str, list[float]] = {name: [] for name in COLUMNS}
    for start, end in ranges:
        mine = [(a, b) for a, b in kernels if start <= a <= end]
        rows["wall"].append(end - start)
        rows["plan"].append(sum(b - a for a, b in plans if start <= a <= end))
        rows["kernels"].append(len(mine))
        rows["replay"] += [at - start for at in replays if start <= at <= end][:1]
        if mine:
            rows["to GPU"].append(mine[0][0] - start)
            rows["span"].append(max(b for _, b in mine) - mine[0][0])
            rows["busy"].append(sum(b - a for a, b in mine))
    return {name: (statistics.median(values) / (1 if name == "kernels" else 1000) if values else float("nan"))
            for name, values in rows.items()}


def main(argv: list[str] | None = None) -> None:
    parser = case_options(model_options(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    parser.add_argument("--runs", type=int, default=5, help="Profiled runs per side and mode.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--traces", type=Path, help="Write every profile here as a Chrome trace (.json.gz).")
    args = parser.parse_args(argv)
    if args.traces:
        args.traces.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, command: {' '.join(sys.argv)}", flush=True)
    model = random_model(args, args.start_layer)
    device = model.device
    modes = ["eager", "cuda-graph"] if device.type == "cuda" else ["eager"]
    if device.type == "cuda":
        mark_graph_replays()
    columns = COLUMNS
    for case in args.cases:
        batch, images = (int(n) for n in case.split("x"))
        runner = with_plan_range(Runner(model, synthetic_inputs(model, batch, images, args.text_tokens)))
        print(f"\n== batch {batch}, images {images} ({runner.embeds.shape[1]} tokens), ms per run (medians of "
              f"{args.runs}; kernels: count)", flush=True)
        print(f"  {'mode':<11} {'side':<7}" + "".join(f"{name:>9}" for name in columns), flush=True)
        for mode in modes:
            for side, on in (("off", False), ("ProxyV", True)):
                fn = runner.cuda_graph_prefill(on) if mode == "cuda-graph" else partial(runner.lm_prefill, on)
                trace = args.traces / f"{case}-{mode}-{side.lower()}.json.gz" if args.traces else None
                row = run_table(fn, device, args.runs, args.warmup, trace)
                del fn  # a graph's memory pool goes with it
                print(f"  {mode:<11} {side:<7}" + "".join(
                    f"{row[name]:9.0f}" if name == "kernels" else f"{row[name]:9.3f}" for name in columns), flush=True)


if __name__ == "__main__":
    main()
