"""Distillation speed with torch's default threads and with `--threads 1`, on an idle and on a busy CPU.

    python benchmarks/busy_threads.py --steps 40

Converts the built-in model at its middle layer, then runs `proxyv distill` (a subprocess, as users run it) for the
same steps with each thread count, first on an idle machine and then while another process keeps one core busy. It
prints seconds per step (the training loop's own time, from distill_report.json) side by side, and whether the two
thread counts gave the same ProxyV weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from proxyv_convert.convert import convert
from proxyv_convert.shapes import MODEL_DIR

BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass\n"  # one core, until killed


def distill_seconds_per_step(model: Path, out: Path, steps: int, threads: int | None) -> tuple[float, bytes]:
    args = [sys.executable, "-m", "proxyv_convert.cli", "distill", str(model), "--data", "shapes", "--steps",
            str(steps), "--eval-examples", "16", "--out", str(out), "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    subprocess.run(args + (["--threads", str(threads)] if threads else []), check=True, env=env,
                   capture_output=True)
    report = json.loads((out / "distill_report.json").read_text())
    return 1 / report["steps_per_second"], (out / "model-proxyv.safetensors").read_bytes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="thread counts; 0: torch's default")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores; torch's default is one thread per core", flush=True)
    with tempfile.TemporaryDirectory(prefix="busy-threads-") as tmp:
        root = Path(tmp)
        convert(str(MODEL_DIR), root / "m", layer=2, progress=False)
        distill_seconds_per_step(root / "m", root / "warm", 1, 1)  # the shapes task's splits are generated and cached
        for machine in ("idle", "busy"):
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if machine == "busy" else None
            try:
                results = {t: distill_seconds_per_step(root / "m", root / f"{machine}-{t}", args.steps, t or None)
                           for t in args.threads}
            finally:
                if busy is not None:
                    busy.kill()
            same = len({weights for _, weights in results.values()}) == 1
            cells = "  ".join(f"{t or 'default'} thread(s) {s:.3f} s/step" for t, (s, _) in results.items())
            first, last = (results[t][0] for t in (args.threads[0], args.threads[-1]))
            print(f"{machine:>5}: {cells}  ratio {first / last:.2f}  same weights: {'yes' if same else 'no'}",
                  flush=True)


if __name__ == "__main__":
    main()
