"""lmms-eval evaluates ProxyV models through proxyv's `proxyv` model (the `lmms_eval.models` entry point): a pushed
repo id through lmms-eval's command line, local folders through its Python API, with ProxyV on and off. Each run's
answers are the model's own greedy `generate` answers and its score is their exact match with the task's answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import TASK
from hub_fixtures import publish_folder
from hub_server import LocalHub

pytestmark = pytest.mark.slow

LIMIT = 4  # of the task's 6 rows: `--limit` is honoured


def exact_match(generated: list[str], targets: list[str]) -> float:
    return sum(a == b for a, b in zip(generated, targets, strict=False)) / len(generated)


def sample_answers(samples: list[dict]) -> list[str]:
    """The generated answers of lmms-eval's logged samples, in document order. A sample's `filtered_resps` holds one
    answer per request; the samples file keeps a single one as a plain string."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    answers = [sample["filtered_resps"] for sample in ordered]
    return [(answer if isinstance(answer, str) else answer[0]).strip() for answer in answers]


@pytest.fixture(scope="module")
def task_manager(task):
    """lmms-eval's task index of the tiny task alone (indexing its hundreds of built-in tasks takes seconds)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(task[0]), include_defaults=False)


def evaluate(task_manager, model: str, model_args: str) -> tuple[float, list[str]]:
    """lmms-eval's Python API on the tiny task: (exact match, the answers)."""
    from lmms_eval.evaluator import simple_evaluate

    results = simple_evaluate(model=model, model_args=model_args, tasks=[TASK], limit=LIMIT, log_samples=True,
                              task_manager=task_manager)
    return results["results"][TASK]["exact_match,none"], sample_answers(results["samples"][TASK])


def test_the_command_line_evaluates_a_pushed_model(folders, task, answers, tmp_path):
    """`lmms-eval --model proxyv` on a repo id pinned to its commit, served by a local Hub: the command a user runs."""
    _, converted = folders
    task_folder, targets = task
    out = tmp_path / "results"
    with LocalHub() as hub:
        revision = publish_folder(hub, "local-user/tiny-proxyv", converted)
        command = [sys.executable, "-m", "lmms_eval", "--model", "proxyv",
                   "--model_args", f"pretrained=local-user/tiny-proxyv,revision={revision}",
                   "--tasks", TASK, "--include_path", str(task_folder), "--limit", str(LIMIT),
                   "--batch_size", "1", "--output_path", str(out), "--log_samples"]
        run = subprocess.run(command, env=hub.env(tmp_path / "hf"), capture_output=True, text=True, timeout=600)
    log = run.stdout[-3000:] + run.stderr[-5000:]
    assert run.returncode == 0, log
    # lmms-eval logs an error during the evaluation and exits with 0: the result files tell whether it ran.
    results_files, samples_files = list(out.rglob("*_results.json")), list(out.rglob(f"*_samples_{TASK}.jsonl"))
    assert len(results_files) == len(samples_files) == 1, log
    results_file, samples_file = results_files[0], samples_files[0]
    score = json.loads(results_file.read_text())["results"][TASK]["exact_match,none"]
    generated = sample_answers([json.loads(line) for line in samples_file.read_text().splitlines()])
    assert generated == answers["proxyv"][:LIMIT]
    assert score == exact_match(generated, targets) and 0 < score < 1


def test_proxyv_on_and_off_score_what_the_model_generates(folders, task, task_manager, answers):
    original, converted = folders
    targets = task[1]
    assert answers["proxyv"] != answers["off"]  # ProxyV changes this model's answers
    assert answers["off"] == answers["original"]  # with ProxyV off it computes the original model
    for proxyv_enabled, expected in ((True, answers["proxyv"]), (False, answers["off"])):
        score, generated = evaluate(task_manager, "proxyv", f"pretrained={converted},proxyv_enabled={proxyv_enabled}")
        assert generated == expected[:LIMIT], proxyv_enabled
        assert score == exact_match(generated, targets[:LIMIT]), proxyv_enabled
    # The original model under lmms-eval's own llava_hf (whose default `device_map=""` transformers 5 refuses): the
    # same answers and score as ProxyV off.
    score, generated = evaluate(task_manager, "llava_hf", f"pretrained={original},device=cpu,device_map=cpu")
    assert generated == answers["original"][:LIMIT]
    assert score == exact_match(answers["off"][:LIMIT], targets[:LIMIT])


def test_the_entry_point_gives_lmms_eval_the_proxyv_model_and_proxyv_imports_no_lmms_eval():
    script = (
        "import sys\n"
        "import proxyv_convert.cli, proxyv_convert.lmms_eval_plugin\n"
        "assert not [m for m in sys.modules if m.startswith('lmms_eval')], 'proxyv imported lmms_eval'\n"
        "from lmms_eval.models import get_model\n"
        "from proxyv_convert.lmms_eval_model import ProxyV\n"
        "assert get_model('proxyv') is get_model('proxyv', force_simple=True) is ProxyV and not ProxyV.is_simple\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_model_that_is_not_proxyv_is_refused_with_the_way_out(folders):
    from proxyv_convert.lmms_eval_model import ProxyV

    original, _ = folders
    with pytest.raises(ValueError, match="is not a ProxyV model .* --model llava_hf"):
        ProxyV(pretrained=str(original))
