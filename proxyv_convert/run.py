"""`proxyv run RECIPE`: convert, distill, evaluate, benchmark and push, as one resumable pipeline.

The output folder holds `run_state.json` (which stages finished, for which recipe); running the same recipe again
skips the finished stages and continues an interrupted distillation from its last checkpoint. A changed recipe is
refused until `--restart` (which converts again, replacing the folder once the new one is complete).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import folder_lock, write_text
from .config import (
    RECIPE_FILE,
    STAGES,
    Recipe,
    check_against_model,
    dump_recipe,
    load_recipe,
    read_recipe,
    resolve_model_source,
)
from .errors import ProxyVError
from .model_folder import CHECKPOINT_DIR, RUN_STATE


@dataclass
class RunResult:
    output: Path
    recipe: Path
    stages_run: list[str] = field(default_factory=list)
    stages_skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    numbers: dict[str, float | str] = field(default_factory=dict)
    next_command: str = ""

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "output": str(self.output), "recipe": str(self.recipe)}, indent=1)


def recipe_hash(recipe: Recipe) -> str:
    """Identity of what a run computes (the push target may change without redoing the work)."""
    data = recipe.model_dump(exclude={"push", "provenance"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def default_output(recipe: Recipe) -> Path:
    name = Path(resolve_model_source(recipe.model.source)).name or recipe.model.source.replace("/", "-")
    return Path(f"{name}-proxyv-l{recipe.proxyv.start_layer}")


def _read_state(output: Path) -> dict | None:
    path = output / RUN_STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _write_state(output: Path, state: dict) -> None:
    write_text(output / RUN_STATE, json.dumps(state, indent=1))


def _record_recipe(output: Path, recipe: Recipe, command: str) -> None:
    """The model folder's recipe: every section of the run's recipe, the provenance from convert, the command."""
    sections, _ = read_recipe(output)
    data = json.loads(recipe.model_dump_json(exclude_none=True, exclude={"output", "provenance"}))
    data["model"] = {**sections.get("model", {}), **data["model"]}
    data["provenance"] = sections.get("provenance", {})
    write_text(output / RECIPE_FILE, dump_recipe(data, [command]))


def run(
    recipe_name: str | Path,
    overrides: list[str] | None = None,
    *,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    restart: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Run the stages of a recipe (see the module docstring); `skip`/`only` choose stages by name."""
    for name in (*skip, *only):
        if name not in STAGES:
            raise ProxyVError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    recipe, path = load_recipe(recipe_name, overrides)
    log(f"recipe {path}: {check_against_model(recipe, str(path))}")
    output = Path(recipe.output) if recipe.output else default_output(recipe)
    wanted = [s for s in recipe.stages() if s not in skip and (not only or s in only)]
    command = shlex.join(["proxyv", "run", str(recipe_name), *(overrides or [])])
    fingerprint = recipe_hash(recipe)
    result = RunResult(output=output, recipe=path)
    started = time.perf_counter()
    with contextlib.ExitStack() as locks:
        # no other command writes into the output while the stages run (the stages share this lock)
        if output.is_dir():
            locks.enter_context(folder_lock(output))
        state = _read_state(output) if output.exists() else None
        if state is not None and state.get("recipe") != fingerprint and not restart:
            raise ProxyVError(
                f"{output} was made by a different recipe (or other overrides); pass --restart to redo it from the "
                "conversion, or choose another output"
            )
        if output.exists() and state is None and not restart:
            raise ProxyVError(
                f"{output} exists but was not written by `proxyv run`; choose another output or --restart")
        if restart or state is None:
            state = {"recipe": fingerprint, "done": []}
        for stage in wanted:
            if stage in state["done"] and not (restart and stage == "convert"):
                log(f"[{stage}] finished earlier: skipped")
                result.stages_skipped.append(stage)
                continue
            if stage != "convert" and not (output / "config.json").is_file():
                raise ProxyVError(
                    f"stage {stage} needs the converted model in {output}; run the convert stage first")
            log(f"[{stage}] running")
            numbers = STAGE_FUNCTIONS[stage](recipe, output, progress, restart, command)
            result.numbers.update(numbers or {})
            if stage == "convert":
                locks.enter_context(folder_lock(output))  # the folder the conversion made (--restart: a new one)
                _record_recipe(output, recipe, command)
                state = {"recipe": fingerprint, "done": []}
            state["done"].append(stage)
            _write_state(output, state)
            result.stages_run.append(stage)
            restart = False
    result.seconds = round(time.perf_counter() - started, 1)
    result.next_command = (
        f"proxyv push {output} --repo-id <your-name>/{output.name}" if "push" not in recipe.stages()
        else f"proxyv card {output}"
    )
    return result


def _convert(recipe: Recipe, output: Path, progress: bool, restart: bool, command: str) -> dict:
    from .convert import convert

    result = convert(
        resolve_model_source(recipe.model.source), output, layer=recipe.proxyv.start_layer,
        reduce_factor=recipe.proxyv.reduce_factor, dtype=recipe.model.dtype, overwrite=restart,
        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code, progress=progress,
        proxy=recipe.proxyv.proxy, learned_proxies=recipe.proxyv.learned_proxies,
        video_frames=recipe.proxyv.video_frames,
    )
    return {"parameters_added": result.parameters_added}


def _distill(recipe: Recipe, output: Path, progress: bool, restart: bool, command: str) -> dict:
    from .distill import distill

    section = recipe.distill
    result = distill(
        output, section.data, settings=section.settings(), resume=(output / CHECKPOINT_DIR).exists(),
        columns=section.columns, revision=section.data_revision, progress=progress, record_command=False,
        continue_with=f"the same command ({command})",
    )
    after = result.report.get("after", {})
    numbers = {"distill_seconds": round(result.seconds, 1), "hidden_cosine_vision": after.get("cosine_vision")}
    if "task" in after:
        numbers["answer_agreement"] = after["task"]["answer_agreement"]
    return numbers


def _eval(recipe: Recipe, output: Path, progress: bool, restart: bool, command: str) -> dict:
    from .evaluate import evaluate, write_report

    section = recipe.eval
    result = evaluate(
        output, section.data, split=section.split, limit=section.limit, batch_size=section.batch_size,
        against_original=section.against_original, columns=section.columns, revision=section.data_revision,
        progress=progress,
    )
    write_report(output, result)
    numbers = {"accuracy": round(result.accuracy, 4)}
    if result.agreement is not None:
        numbers.update(original_accuracy=round(result.other_accuracy, 4), answer_agreement=round(result.agreement, 4))
    return numbers


def _bench(recipe: Recipe, output: Path, progress: bool, restart: bool, command: str) -> dict:
    from .bench import run_bench

    section = recipe.bench
    report, _ = run_bench(
        output, device=section.device, dtype=section.dtype, attn=section.attn, batch_sizes=tuple(section.batch_sizes),
        images=tuple(section.images), text_tokens=section.text_tokens, repeats=section.repeats,
        warmup=section.warmup, compile=section.compile, cuda_graph=section.cuda_graph,
    )
    case = report.cases[0]
    return {"prefill_speedup": round(1 / case.lm_prefill_ratio, 3), "flops_ratio": case.flops_ratio}


def _push(recipe: Recipe, output: Path, progress: bool, restart: bool, command: str) -> dict:
    from .push import push

    section = recipe.push
    result = push(output, section.repo_id, private=section.private, revision=section.revision,
                  create_pr=section.create_pr, progress=progress)
    return {"repo_url": result.repo_url, "commit": result.revision}


STAGE_FUNCTIONS: dict[str, Callable[[Recipe, Path, bool, bool, str], dict]] = {
    "convert": _convert, "distill": _distill, "eval": _eval, "bench": _bench, "push": _push,
}
