"""One decoder layer at a time: a ProxyV layer against the same layer with ProxyV off, on the random model of
prefill_speed.py (same model options), with the inputs those layers get in a real language-model prefill.

    python benchmarks/layer_profile.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 \\
        --layers 16 --heads 32 --vision-hidden 1024 --start-layer 12 --cases 1x1 8x1

For every case it prints the time of one layer call (median of timed repeats; on CUDA also replayed from a CUDA
graph, which leaves out the host's launch overhead) for a ProxyV layer past the start layer and the same layer with
ProxyV off, their ratio, and the kernels (CUDA) or operators (CPU) of one call of each, by device time. A layer
is called with the keyword arguments the model gave it (captured by a forward pre-hook), so its work is exactly
that of the model's prefill.

With --whole, it also profiles whole language-model prefills (eager, ProxyV on and off) and prints the device (or
CPU) time of every decoder layer inside them and of the work outside the layers, to compare with the layer alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from prefill_speed import case_options, model_options, random_model
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from proxyv_convert.bench import Runner, capture_cuda_graph, median_ms, synchronize, synthetic_inputs


def captured_call(runner: Runner, layer: torch.nn.Module, proxyv: bool):
    """A function that calls `layer` as the language-model prefill did (ProxyV on or off)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("call", (args, dict(kwargs)))

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        runner.lm_prefill(proxyv)
    finally:
        handle.remove()
    args, kwargs = seen["call"]

    @torch.no_grad()
    def call():
        return layer(*args, **kwargs)

    return call


def graph_ms(fn, repeats: int) -> float:
    """Median milliseconds of replaying `fn` from a CUDA graph (events around each replay)."""
    graph, _ = capture_cuda_graph(fn)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_table(fn, device: torch.device, runs: int, rows: int) -> tuple[float, str]:
    """(device or CPU time of one call in ms, a table of its kernels/operators by time per call)."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    fn()
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(runs):
            fn()
        synchronize(device)
    averages = prof.key_averages()
    if on_device:
        events = [e for e in averages if e.device_type != DeviceType.CPU and e.self_device_time_total > 0]
        own = lambda e: e.self_device_time_total  # noqa: E731
    else:
        events = [e for e in averages if e.self_cpu_time_total > 0 and e.key.startswith("aten::")]
        own = lambda e: e.self_cpu_time_total  # noqa: E731
    events.sort(key=own, reverse=True)
    total = sum(own(e) for e in events) / runs
    lines = [f"    {'us/call':>8} {'calls':>5} {'us each':>8}  name"]
    for e in events[:rows]:
        lines.append(f"    {own(e) / runs:8.1f} {e.count / runs:5.0f} {own(e) / e.count:8.1f}  {e.key[:90]}")
    count = sum(e.count for e in events) / runs
    lines.append(f"    {total:8.1f} {count:5.0f}           all {'kernels' if on_device else 'operators'}")
    return total / 1000, "\n".join(lines)


def per_layer_times(runner: Runner, proxyv: bool, runs: int) -> tuple[list[float], float]:
    """(ms of each decoder layer, ms of the whole prefill) per run of the eager language-model prefill: kernel time
    on CUDA (each layer's kernels are those launched inside its forward), CPU time on the CPU."""
    layers = runner.core.language_model.layers
    device = runner.model.device
    on_device = device.type == "cuda"
    open_ranges, hooks = {}, []
    for i, layer in enumerate(layers):
        def enter(module, args, i=i):
            open_ranges[i] = torch.profiler.record_function(f"proxyv-bench layer {i}")
            open_ranges[i].__enter__()

        def leave(module, args, output, i=i):
            open_ranges.pop(i).__exit__(None, None, None)

        hooks += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    try:
        runner.lm_prefill(proxyv)
        synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
        with profile(activities=activities) as prof:
            for _ in range(runs):
                runner.lm_prefill(proxyv)
            synchronize(device)
    finally:
        for hook in hooks:
            hook.remove()
    averages = prof.key_averages()
    inclusive = {e.key: (e.device_time_total if on_device else e.cpu_time_total) / 1000 / runs for e in averages}
    times = [inclusive.get(f"proxyv-bench layer {i}", float("nan")) for i in range(len(layers))]
    if on_device:
        total = sum(e.self_device_time_total for e in averages if e.device_type != DeviceType.CPU) / 1000 / runs
    else:
        total = sum(e.self_cpu_time_total for e in averages) / 1000 / runs  # a layer's range holds its Python time
    return times, total


def whole_model_table(runner: Runner, start_layer: int, runs: int) -> str:
    (off, off_total), (on, on_total) = (per_layer_times(runner, side, runs) for side in (False, True))
    unit = "kernel" if runner.model.device.type == "cuda" else "CPU"
    lines = [f"    whole language-model prefill, {unit} ms per run (eager; layers from {start_layer} are ProxyV)",
             f"    {'layer':>7} {'off':>8} {'ProxyV':>8} {'ratio':>6}"]
    for i, (a, b) in enumerate(zip(off, on, strict=True)):
        lines.append(f"    {i:>7} {a:8.3f} {b:8.3f} {b / a:6.3f}")
    outside = (off_total - sum(off), on_total - sum(on))
    lines.append(f"    {'outside':>7} {outside[0]:8.3f} {outside[1]:8.3f}")
    lines.append(f"    {'all':>7} {off_total:8.3f} {on_total:8.3f} {on_total / off_total:6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = case_options(model_options(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)))
    parser.add_argument("--layer", type=int, help="The layer timed (default: the one after the start layer).")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5, help="Profiled calls per side.")
    parser.add_argument("--rows", type=int, default=30, help="Kernels printed per table.")
    parser.add_argument("--separate-projections", action="store_true")
    parser.add_argument("--whole", action="store_true",
                        help="Also time every layer inside whole language-model prefills (eager, profiled).")
    args = parser.parse_args(argv)
    layer_index = args.start_layer + 1 if args.layer is None else args.layer
    if not args.start_layer < layer_index < args.layers:
        parser.error("--layer must be a ProxyV layer after the start layer")
    print(f"torch {torch.__version__}, command: {' '.join(sys.argv)}", flush=True)
    model = random_model(args, args.start_layer)
    if args.separate_projections:
        model.fuse_projections(False)
    device = model.device
    layer = model.model.language_model.layers[layer_index]
    for case in args.cases:
        batch, images = (int(n) for n in case.split("x"))
        runner = Runner(model, synthetic_inputs(model, batch, images, args.text_tokens))
        print(f"\n== batch {batch}, images {images} ({runner.embeds.shape[1]} tokens), layer {layer_index}", flush=True)
        results = {}
        for side, on in (("off", False), ("proxyv", True)):
            call = captured_call(runner, layer, on)
            call()  # warm-up (and the automatic choice of fused products on the first ProxyV forward)
            eager = median_ms(call, args.repeats, 0, device)
            graphed = graph_ms(call, args.repeats) if device.type == "cuda" else float("nan")
            busy, table = kernel_table(call, device, args.runs, args.rows)
            results[side] = (eager, graphed, busy)
            print(f"-- {side}: eager {eager:.3f} ms, CUDA graph {graphed:.3f} ms, "
                  f"{'kernels' if device.type == 'cuda' else 'operators'} {busy:.3f} ms per call\n{table}", flush=True)
        ratios = [p / o for o, p in zip(results["off"], results["proxyv"], strict=True)]
        print(f"ratio ProxyV/off, batch {batch} images {images}: eager {ratios[0]:.3f}, CUDA graph {ratios[1]:.3f}, "
              f"kernel time {ratios[2]:.3f}", flush=True)
        if args.whole:
            print(whole_model_table(runner, args.start_layer, args.runs), flush=True)


if __name__ == "__main__":
    main()
