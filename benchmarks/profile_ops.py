"""Where the time goes: torch.profiler tables of the language-model prefill and of decode steps, ProxyV on and off,
on the random model of prefill_speed.py (same model options), eager mode.

    python benchmarks/profile_ops.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 --layers 32 \\
        --heads 32 --vision-hidden 1024 --start-layer 12 --batch 1 --out prof

Prints the time to build the ProxyV plan of one forward and, per side, the wall time, the summed device (or
CPU) time of the operators, and the operators taking the most time; the full tables go to --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from prefill_speed import model_options, random_model
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from proxyv_convert.bench import Runner, _cache_keyword, synchronize, synthetic_inputs


def profiled(fn, device: torch.device, runs: int):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(2):
        fn()
    synchronize(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(runs):
            fn()
        synchronize(device)
        wall = (time.perf_counter() - started) * 1000 / runs
    return prof, wall


def summary(name: str, prof, wall: float, runs: int, device: torch.device, out: Path | None, rows: int) -> None:
    averages = prof.key_averages()
    on_device = device.type == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    # Device time: the kernels' and copies' own rows only (an operator's row repeats its kernels' time).
    busy = sum(e.self_device_time_total for e in averages if e.device_type != DeviceType.CPU) / 1000 / runs
    cpu = sum(e.self_cpu_time_total for e in averages) / 1000 / runs
    device_part = f"device {busy:.2f} ms, " if on_device else ""
    print(f"{name}: wall {wall:.2f} ms per run; operators' self time per run: {device_part}CPU {cpu:.2f} ms")
    full = []
    for sort in dict.fromkeys([key, "self_cpu_time_total"]):
        print(averages.table(sort_by=sort, row_limit=rows, max_name_column_width=50))
        full.append(f"sorted by {sort}\n{averages.table(sort_by=sort, row_limit=300)}")
    if out:
        (out / f"{name.replace(' ', '-')}.txt").write_text("\n\n".join(full))


def main(argv: list[str] | None = None) -> None:
    parser = model_options(argparse.ArgumentParser(description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--start-layer", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12, help="Operators printed per table.")
    parser.add_argument("--out", type=Path, help="Folder for the full tables.")
    args = parser.parse_args(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, command: {' '.join(sys.argv)}", flush=True)
    model = random_model(args, args.start_layer)
    device = model.device
    runner = Runner(model, synthetic_inputs(model, args.batch, args.images, args.text_tokens))
    times = []
    for _ in range(25):  # the ProxyV plan of a forward: built on the host before the layers run
        synchronize(device)
        started = time.perf_counter()
        runner.plan()
        synchronize(device)
        times.append((time.perf_counter() - started) * 1000)
    print(f"plan: {statistics.median(times[5:]):.2f} ms per forward (median of 20 after 5 warm-ups)", flush=True)
    for side, on in (("off", False), ("proxyv", True)):
        prof, wall = profiled(lambda on=on: runner.lm_prefill(on), device, args.runs)
        summary(f"prefill {side}", prof, wall, args.runs, device, args.out, args.rows)
    for side, on in (("off", False), ("proxyv", True)):
        with runner._mode(on), torch.no_grad():
            out = model(**runner.inputs, use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        state = {"token": out.logits[:, -1:].argmax(-1), "mask": runner.inputs["attention_mask"]}

        def step(on=on, cache=cache, state=state):
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["token"])], dim=1)
            with runner._mode(on), torch.no_grad():
                logits = model(input_ids=state["token"], attention_mask=state["mask"], use_cache=True,
                               **{_cache_keyword(): cache}).logits
            state["token"] = logits[:, -1:].argmax(-1)

        prof, wall = profiled(step, device, args.runs)
        summary(f"decode {side}", prof, wall, args.runs, device, args.out, args.rows)


if __name__ == "__main__":
    main()
