"""The GPU benchmark script runs end to end: every stage, on the CPU with a tiny model (SMOKE=1), so that a machine
with a GPU spends its time measuring, not finding a broken script."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_prefill.sh"


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.longest
def test_gpu_prefill_script_runs_every_stage(tmp_path):
    result = run_script("--diagnose", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.split("== summary", 1)[1]
    lines = [line for line in summary.splitlines() if line.startswith("  L2")]
    assert len(lines) == 3 and all("eager" in line for line in lines), summary
    for name, cases in (("llava", 2), ("llava-next", 1)):
        (report,) = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["mode"] == "eager" and len(report["cases"]) == cases
        for case in report["cases"]:
            assert 0 < case["flops_ratio"] < 1 and case["lm_prefill_ratio"] > 0 and case["plan_ms"] > 0
    for stage in ("tests", "trace-llava", "trace-llava-next", "layers-llava", "layers-llava-next", "variants-llava"):
        assert f"== {stage}: exit 0" in result.stdout
    trace_log = (tmp_path / "trace-llava.log").read_text()
    assert trace_log.count("  eager       ProxyV") == 2 and trace_log.count("  eager       off") == 2
    assert "whole language-model prefill" in (tmp_path / "layers-llava-next.log").read_text()
    # Every variant of the ProxyV forward computes the prefill the current one computes (float32 here: to the bit).
    variants = (tmp_path / "variants-llava.log").read_text().split("\n== batch ")[1:]
    assert len(variants) == 2
    for table in variants:
        rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:] if line.strip()}
        assert set(rows) == {"off", "current", "assemble", "flip-rope", "norm-apart", "previous", "no-replan"}
        assert all(float(rows[name][-1]) == 0.0 for name in rows if name != "off"), table
        assert all(float(values[0]) > 0 for values in rows.values()), table
    traces = sorted(p.name for p in (tmp_path / "traces").iterdir())
    assert traces == sorted(f"{case}-eager-{side}.json.gz" for case in ("1x1", "8x1") for side in ("off", "proxyv"))
    events = json.loads(gzip.decompress((tmp_path / "traces" / "1x1-eager-proxyv.json.gz").read_bytes()))
    names = {event.get("name") for event in events["traceEvents"]}
    assert {"prefill-trace run", "prefill-trace plan"} <= names


def test_gpu_prefill_script_refuses_an_unknown_option(tmp_path):
    result = run_script("--fast", str(tmp_path))
    assert result.returncode == 2 and "unknown option --fast" in result.stderr
    assert not any(tmp_path.iterdir())
