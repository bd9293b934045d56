"""Distillation: the ProxyV model (student) learns to match the same weights with ProxyV off (teacher).

One copy of the model lives in memory: the teacher is the student's forward inside `model.proxyv_disabled()`.
Only the ProxyV parameters (`model.proxyv.*`) train; every original weight stays frozen and is never rewritten.

    loss = vision_weight * hidden(vision tokens) + text_weight * hidden(text tokens) + kl_weight * KL(logits)

where hidden(.) averages, over the layers from the start layer on, a per-token distance between student and teacher
hidden states (see HIDDEN_LOSSES), and KL is KL(teacher || student) of the next-token distributions at the text
positions after the first image.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .atomic import check_writable, file_mode, folder_lock
from .batching import Batch, Batcher
from .config import RECIPE_FILE, Columns, DistillSettings, dump_recipe, read_recipe
from .data import ImageTextData, load_data, parse_split
from .errors import ProxyVError
from .families import Family
from .model_folder import CHECKPOINT_DIR, DISTILL_REPORT, folder_family, load_model, load_processor
from .sharding import check_launch, fsdp_requested, full_tensor, shard_like, shard_model
from .threads import warn_if_busy
from .weights import write_proxyv_weights


@dataclass
class DistillResult:
    out: Path
    steps: int
    seconds: float
    report: dict = field(default_factory=dict)


def distill_command(model: str, data: str, settings: DistillSettings, *, out: str | None = None,
                    columns: Columns = Columns()) -> str:
    """The `proxyv distill` command line of a run: its data and every setting that differs from the default."""
    import shlex

    args = ["proxyv", "distill", model, "--data", data]
    defaults = DistillSettings()
    for name, value in settings.model_dump().items():
        if value != getattr(defaults, name):
            option = "--" + name.replace("_", "-")
            args += [option] if value is True else [option, str(value)]
    for name, value in columns.model_dump().items():
        if value != getattr(Columns(), name):
            args += [f"--{name}-column", str(value)]
    args += ["--out", out] if out else []
    return shlex.join(args)


def recipe_with_distill(
    folder: Path, data: str, settings: DistillSettings, command: str | None, columns: Columns
) -> str:
    """The folder's recipe text with this run's `distill` section and command (when given) added."""
    sections, commands = read_recipe(folder)
    section = {"data": data, **settings.model_dump()}
    if columns != Columns():
        section["columns"] = columns.model_dump()
    return dump_recipe({**sections, "distill": section}, [*commands, *([command] if command else [])])


# --- the objective -------------------------------------------------------------------------------------------------


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token distance of (N, H) student and teacher states -> (N,)."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return (student - teacher).pow(2).mean(-1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(student, teacher, dim=-1)
    # relative: squared error over the teacher's squared norm, so every layer and token weighs the same
    return (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-6)


def kl_positions(batch: Batch) -> torch.Tensor:
    """(B, T) bool: real text tokens after the first image, whose next-token predictions ProxyV can change."""
    mask = batch.inputs["attention_mask"].bool()
    after_image = batch.image_mask.cumsum(1) > 0
    return mask & after_image & ~batch.image_mask


def kl_logits(model, student, teacher, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 next-token logits of the student and the teacher at the `kl_positions` of the batch, (N, vocab)."""
    positions = kl_positions(batch)
    head = model.get_output_embeddings()
    # the states may come out of autocast in another dtype than the head's (float32 ProxyV weights on a bf16 model)
    return tuple(head(out.hidden_states[-1][positions].to(head.weight.dtype)).float() for out in (student, teacher))


def distill_losses(model, student, teacher, batch: Batch, settings: DistillSettings) -> dict[str, torch.Tensor]:
    start = model.config.proxyv_start_layer
    real = batch.inputs["attention_mask"].bool()
    groups = {"vision": real & batch.image_mask, "text": real & ~batch.image_mask}
    terms = {name: 0.0 for name in groups}
    layers = range(start + 1, len(teacher.hidden_states))  # outputs of layers start..L-1 (last one after the norm)
    for layer in layers:
        for name, mask in groups.items():
            if mask.any():
                terms[name] = terms[name] + hidden_distance(
                    student.hidden_states[layer][mask], teacher.hidden_states[layer][mask], settings.hidden_loss
                ).mean()
    losses = {name: value / len(layers) for name, value in terms.items()}
    if settings.kl_weight > 0 and kl_positions(batch).any():  # none when max_length cuts right after the image
        student_logits, teacher_logits = kl_logits(model, student, teacher, batch)
        losses["kl"] = F.kl_div(
            F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
            reduction="batchmean",
        )
    losses["loss"] = (
        settings.vision_weight * torch.as_tensor(losses["vision"])
        + settings.text_weight * torch.as_tensor(losses["text"])
        + settings.kl_weight * losses.get("kl", 0.0)
    )
    return losses


def teacher_and_student(model, batch: Batch):
    """Hidden states of the same weights with ProxyV off (no gradients) and on."""
    inputs = dict(batch.inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    core = unwrap(model)
    with torch.no_grad(), core.proxyv_disabled():
        teacher = model(**inputs)
    student = model(**inputs)
    return teacher, student


def unwrap(model):
    return getattr(model, "module", model)


# --- data order, checkpoints ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A reproducible permutation of the examples for one epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def step_indices(n: int, seed: int, step: int, global_batch: int) -> list[int]:
    """Example indices of optimizer step `step` (0-based): the same whether or not a run was resumed."""
    indices: list[int] = []
    position = step * global_batch
    while len(indices) < global_batch:
        epoch, offset = divmod(position, n)
        taken = epoch_order(n, seed, epoch)[offset : offset + global_batch - len(indices)]
        indices += taken
        position += len(taken)
    return indices


OPTIMIZER_TENSORS = "optimizer.safetensors"  # the tensors of the optimizer's and scheduler's state_dicts
OPTIMIZER_STATE = "optimizer.json"  # the rest of them, with references to those tensors


def proxyv_state(model) -> dict[str, torch.Tensor]:
    """The whole ProxyV parameters by name (`vision_mlps.2.out.weight`...). Under FSDP every process calls it."""
    return {name: full_tensor(p.detach()) for name, p in unwrap(model).model.proxyv.named_parameters()}


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict, *, write: bool = True) -> None:
    """Atomically replace the checkpoint in `folder` (ProxyV parameters, optimizer, schedule, progress). Under FSDP
    every process calls it (the whole tensors are gathered collectively) and the one with `write` writes them.

    Nothing is pickled (tensors go to safetensors files, the rest to JSON), so resuming never runs code from a file.
    The checkpoint is built in a folder created exclusively under an unpredictable name beside `folder` (a file or
    symlink planted there is never written through), then renamed into place.
    """
    params = {name: p.float().contiguous().cpu() for name, p in proxyv_state(model).items()}
    tensors: dict[str, torch.Tensor] = {}
    saved = {"optimizer": _encode(optimizer.state_dict(), tensors),
             "scheduler": _encode(scheduler.state_dict(), tensors)}
    if not write:
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_checkpoint_leftovers(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".tmp"))
    old = None
    try:
        os.chmod(tmp, file_mode(0o777))  # mkdtemp makes 0700 folders: give it the mode mkdir() would have
        save_file(params, tmp / "proxyv.safetensors")
        save_file(tensors, tmp / OPTIMIZER_TENSORS)
        (tmp / OPTIMIZER_STATE).write_text(json.dumps(saved))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if folder.is_symlink() or folder.is_file():
            folder.unlink()  # not a checkpoint of ours: replaced, never followed
        elif folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".old"))
            folder.rename(old)  # over the empty folder just made
        tmp.rename(folder)
    except BaseException:
        if old is not None and not folder.exists():
            old.rename(folder)  # the previous checkpoint stays
        elif old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_checkpoint_leftovers(folder: Path) -> None:
    """Folders of a save that was killed (`.distill.*.tmp`, `.distill.*.old`, and the fixed names of older versions):
    only the holder of the model folder's lock saves checkpoints, so they belong to no running command."""
    for path in folder.parent.glob(f"{folder.name}.*"):
        if path.suffix in (".tmp", ".old") and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def check_checkpoint(folder: Path) -> None:
    """Raise ProxyVError unless `folder` holds a checkpoint this version reads (older ones pickled the optimizer)."""
    missing = [name for name in ("proxyv.safetensors", OPTIMIZER_TENSORS, OPTIMIZER_STATE, "state.json")
               if not (folder / name).is_file()]
    if missing:
        raise ProxyVError(
            f"the checkpoint in {folder} lacks {', '.join(missing)} (it is damaged, or from an older proxyv version, "
            f"which this one does not read); delete {folder} to start over"
        )


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """Restore what `save_checkpoint` wrote, with safetensors and JSON only: no file is ever unpickled. Under FSDP
    each process takes its own part of every parameter and optimizer tensor."""
    check_checkpoint(folder)
    params = load_file(folder / "proxyv.safetensors")
    proxyv = unwrap(model).model.proxyv
    with torch.no_grad():
        for name, param in proxyv.named_parameters():
            param.copy_(shard_like(params[name].to(param.dtype), param))
    tensors = load_file(folder / OPTIMIZER_TENSORS)
    try:
        saved = json.loads((folder / OPTIMIZER_STATE).read_text())
        optimizer_state, scheduler_state = _decode(saved["optimizer"], tensors), _decode(saved["scheduler"], tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise ProxyVError(f"{folder / OPTIMIZER_STATE} is damaged ({e}); delete {folder} to start over") from None
    ordered = [p for group in optimizer.param_groups for p in group["params"]]  # the state's integer keys
    for index, values in optimizer_state["state"].items():
        if not isinstance(index, int) or index >= len(ordered):
            continue  # not a state this optimizer has: load_state_dict says so
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.shape == ordered[index].shape and value.dim() > 0:
                values[key] = shard_like(value, ordered[index])  # moments sharded as their parameter
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    return json.loads((folder / "state.json").read_text())


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A state_dict as JSON data: containers tagged with their type (so that int keys and tuples come back as they
    were), tensors moved into `tensors` and referenced by name. Python's JSON floats round-trip exactly."""
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = full_tensor(value.detach()).cpu().contiguous().clone()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_encode(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(value, dict):
        return value
    ((kind, content),) = value.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in content}
    if kind in ("list", "tuple"):
        items = [_decode(v, tensors) for v in content]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unknown entry {kind!r}")


# --- agreement with the teacher on held-out data -------------------------------------------------------------------


@torch.no_grad()
def agreement(model, batcher: Batcher, indices: list[int], batch_size: int, accelerator) -> dict:
    """How closely the student follows the teacher on held-out examples: per-layer hidden-state cosine (vision and
    text tokens), KL of the next-token distributions and top-1 agreement at the text positions after the image."""
    core = unwrap(model)
    start = core.config.proxyv_start_layer
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}

    def add(name: str, values: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0) + values.double().sum(0).cpu()
        counts[name] = counts.get(name, 0) + values.shape[0]

    core.eval()
    used = skipped_images = skipped_long = 0  # examples that do not fit max_length are skipped, as in training
    for first in range(0, len(indices), batch_size):
        batch = batcher(indices[first : first + batch_size])
        used, skipped_images, skipped_long = (used + batch.used, skipped_images + batch.skipped_images,
                                              skipped_long + batch.skipped_long)
        if batch.used == 0:
            continue
        batch.inputs = {k: v.to(accelerator.device) for k, v in batch.inputs.items()}
        batch.image_mask = batch.image_mask.to(accelerator.device)
        with accelerator.autocast():
            teacher, student = teacher_and_student(core, batch)
        real = batch.inputs["attention_mask"].bool()
        for name, mask in {"vision": real & batch.image_mask, "text": real & ~batch.image_mask}.items():
            cos = [F.cosine_similarity(s[mask].float(), t[mask].float(), dim=-1)
                   for s, t in zip(student.hidden_states[start + 1 :], teacher.hidden_states[start + 1 :], strict=True)]
            add(f"cosine_{name}", torch.stack(cos, dim=1))  # (N, layers)
        s_logits, t_logits = kl_logits(core, student, teacher, batch)
        kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="none")
        add("kl", kl.sum(-1)[:, None])
        add("top1", (s_logits.argmax(-1) == t_logits.argmax(-1))[:, None])
    core.train()
    result = {"examples": used, **_skipped(skipped_images, skipped_long)}
    for name, total in sums.items():
        mean = (total / max(counts[name], 1)).tolist()
        if name.startswith("cosine"):
            result[f"{name}_per_layer"] = {str(start + i): round(v, 6) for i, v in enumerate(mean)}
            result[name] = round(sum(mean) / len(mean), 6)
        else:
            result[name] = round(mean[0], 6)
    return result


TASK_NEW_TOKENS = 16  # answers of the held-out report: short, and the generation is bounded whatever the model does


def task_agreement(model, data: ImageTextData, indices: list[int], processor, batch_size: int, accelerator,
                   max_length: int | None = None) -> dict:
    """Greedy answers with ProxyV on (student) and off (teacher): accuracy of each and how often they agree (in the
    training's precision: float32 ProxyV weights on a low-precision model need its autocast). Examples whose prompt
    is longer than `max_length` tokens are skipped and counted, as in training: their generation would be unbounded
    in time and memory by anything but the prompt."""
    from .evaluate import generate_answers, normalise, prompt_lengths

    core = unwrap(model)
    core.eval()
    student, teacher, answers = [], [], []
    skipped_images = skipped_long = 0
    for first in range(0, len(indices), batch_size):
        examples = [data.example(i) for i in indices[first : first + batch_size]]
        skipped_images += sum(e[0] is None for e in examples)
        examples = [e for e in examples if e[0] is not None]
        if examples and max_length is not None:
            lengths = prompt_lengths(processor, [e[0] for e in examples], [e[1] for e in examples])
            skipped_long += sum(n > max_length for n in lengths)
            examples = [e for e, n in zip(examples, lengths, strict=True) if n <= max_length]
        if not examples:
            continue
        visuals, prompts = [e[0] for e in examples], [e[1] for e in examples]
        answers += [e[2] for e in examples]
        with accelerator.autocast():
            student += generate_answers(core, processor, visuals, prompts, max_new_tokens=TASK_NEW_TOKENS)
            with core.proxyv_disabled():
                teacher += generate_answers(core, processor, visuals, prompts, max_new_tokens=TASK_NEW_TOKENS)
    core.train()
    def rate(first: list[str], second: list[str]) -> float:
        same = sum(normalise(x) == normalise(y) for x, y in zip(first, second, strict=True))
        return round(same / max(len(first), 1), 6)

    return {
        "examples": len(answers),
        **_skipped(skipped_images, skipped_long),
        "student_accuracy": rate(student, answers),
        "teacher_accuracy": rate(teacher, answers),
        "answer_agreement": rate(student, teacher),
    }


def _skipped(images: int, long: int) -> dict:
    """The report's count of skipped held-out examples (absent when none was skipped)."""
    counts = {"undecodable_images": images, "too_long": long}
    return {"skipped": {k: v for k, v in counts.items() if v}} if images or long else {}


# --- the run -------------------------------------------------------------------------------------------------------


class _Interrupt:
    """Turns Ctrl-C / SIGTERM into a flag the loop checks after each step (then it saves and stops)."""

    def __init__(self):
        self.flag = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def held_out(data: str, columns: Columns, revision: str | None, settings: DistillSettings,
             train: ImageTextData) -> tuple[ImageTextData, list[int], list[int], str]:
    """(held-out data, its indices, the training indices, the held-out rows as a split expression for `proxyv eval`):
    the eval split, or, when it is the train split or does not exist, the tail of the train split (at least one row).
    Raises ProxyVError, before anything is written, when the held-out rows would overlap the training rows or no row
    is left to train on."""
    try:
        evaluation = None if settings.eval_split == settings.train_split else load_data(
            data, split=settings.eval_split, columns=columns, revision=revision)
    except ProxyVError:
        evaluation = None  # no such split: hold out the tail of the train split
    if evaluation is not None:
        check_disjoint(data, settings, revision, columns)
        shown = min(settings.eval_examples, len(evaluation))
        return evaluation, list(range(shown)), list(range(len(train))), settings.eval_split
    held = min(settings.eval_examples, max(1, len(train) // 10))
    if len(train) - held < 1:
        raise ProxyVError(
            f"the '{settings.train_split}' split of {data} has {len(train)} row(s); distillation needs at least 2 "
            "(one to train on, one held out for the before/after report), or a separate --eval-split"
        )
    name, rows = parse_split(settings.train_split)
    if rows is None:
        expression = f"{name}[-{held}:]"
    else:  # the tail of a slice, as rows of the whole split
        positions = split_rows(data, settings.train_split, columns, revision)
        expression = f"{name}[{positions[len(train) - held]}:{positions[-1] + 1}]"
    return train, list(range(len(train) - held, len(train))), list(range(len(train) - held)), expression


def split_rows(data: str, split: str, columns: Columns, revision: str | None) -> range:
    """The rows of the whole split that a split expression selects (`validation[-500:]` -> its last 500 rows)."""
    name, rows = parse_split(split)
    return range(len(load_data(data, split=name, columns=columns, revision=revision)))[rows or slice(None)]


def check_disjoint(data: str, settings: DistillSettings, revision: str | None, columns: Columns) -> None:
    """Slices of one split (`validation[:-500]`, `validation[-500:]`) must not share rows."""
    train_name, eval_name = parse_split(settings.train_split)[0], parse_split(settings.eval_split)[0]
    if train_name != eval_name:
        return
    train_rows = split_rows(data, settings.train_split, columns, revision)
    eval_rows = split_rows(data, settings.eval_split, columns, revision)
    shared = set(train_rows) & set(eval_rows)
    if shared:
        raise ProxyVError(
            f"--eval-split {settings.eval_split} shares {len(shared)} row(s) with --train-split "
            f"{settings.train_split}; hold out other rows, e.g. {train_name}[:-{settings.eval_examples}] and "
            f"{train_name}[-{settings.eval_examples}:]"
        )


def check_images_decode(data: ImageTextData, indices: list[int], seed: int, probe: int = 16) -> None:
    """Fail early when the first examples the run would use have no decodable image at all."""
    first = [indices[i] for i in step_indices(len(indices), seed, 0, min(probe, len(indices)))]
    if all(data.example(i)[0] is None for i in first):
        columns = " or ".join(f"'{c}'" for c in (data.image, data.video) if c)
        raise ProxyVError(
            f"no image could be decoded in the first {len(first)} examples of {data.source} "
            f"(column {columns}); check the image column"
        )


def check_lengths(batcher: Batcher, indices: list[int], seed: int, log=None, probe: int = 16) -> None:
    """Fail early when most of the first examples the run would use do not fit in --max-length (each such example is
    skipped: with none, or too few, left the run would train on nothing, at a loss of 0). "Too few" is fewer than
    half of them. `log` (a message -> None) hears how many of them will be skipped when some but not most are."""
    first = [indices[i] for i in step_indices(len(indices), seed, 0, min(probe, len(indices)))]
    ends = batcher.image_ends(first)  # (tokens up to the end of the image, image tokens) of the decodable ones
    max_length = batcher.max_length
    long = sorted(end for end, _ in ends if end > max_length)
    if not long:
        return
    if 2 * len(long) > len(ends):
        needed = sorted(end for end, _ in ends)[(len(ends) - 1) // 2]  # the length at which at least half fit
        image_tokens = min(tokens for _, tokens in ends)
        which = "all" if len(long) == len(ends) else f"{len(long)}"
        raise ProxyVError(
            f"{which} of the first {len(ends)} examples are longer than --max-length {max_length} (the image alone "
            f"takes {image_tokens} tokens, and they would be skipped); raise --max-length to at least {needed}"
        )
    if log is not None:
        log(f"warning: {len(long)} of the first {len(ends)} examples are longer than --max-length {max_length} "
            f"and will be skipped (counted in the report); raise --max-length to at least {long[-1]} to keep them")


def lr_lambda(settings: DistillSettings):
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def checkpoint_folder(model_dir: Path, out: Path | None) -> Path:
    return (model_dir if out is None else out.parent / f".{out.name}") / CHECKPOINT_DIR


def distill(
    model_dir: str | Path,
    data: str,
    *,
    settings: DistillSettings | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    columns: Columns = Columns(),
    revision: str | None = None,
    progress: bool = True,
    record_command: bool = True,
    continue_with: str = "--resume",
) -> DistillResult:
    """Distill the ProxyV parameters of the model in `model_dir` against the same weights with ProxyV off, and write
    them to `model_dir` (or to a copy at `out`), replacing only the ProxyV tensors. The folder's recipe gets this
    run's `distill` section and, with `record_command`, the equivalent `proxyv distill` command in its header (a
    pipeline that records its own command turns that off). `continue_with` tells the user how to continue an
    interrupted run (a pipeline has its own way)."""
    settings = settings or DistillSettings()
    model_dir = Path(model_dir)
    out = Path(out) if out is not None else None
    family = folder_family(model_dir)
    if family is None:
        raise ProxyVError(f"{model_dir} is not a ProxyV model folder; make one with `proxyv convert`")
    if out is not None and out.exists() and not resume:
        raise ProxyVError(f"{out} already exists; choose another --out or remove it")
    check_launch(settings.mixed_precision)
    # Before any long work: where the checkpoints and the result go must be writable
    for folder in (checkpoint_folder(model_dir, out), model_dir if out is None else out.parent):
        check_writable(folder)
    # The main process alone writes, so it alone holds the lock: of the model folder, or with --out of the hidden
    # folder beside `out` that holds the checkpoints (created for the run, and removed when empty)
    main = os.environ.get("RANK", "0") == "0"
    locked = model_dir if out is None else checkpoint_folder(model_dir, out).parent
    with folder_lock(locked, create=out is not None) if main else contextlib.nullcontext():
        return _distill_locked(model_dir, data, family, settings, out, resume, columns, revision, progress,
                               record_command, continue_with)


def _distill_locked(model_dir: Path, data: str, family: Family, settings: DistillSettings, out: Path | None,
                    resume: bool, columns: Columns, revision: str | None, progress: bool, record_command: bool,
                    continue_with: str) -> DistillResult:
    """The rest of `distill`, while the folder it writes into is locked."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    checkpoints = checkpoint_folder(model_dir, out)
    if checkpoints.exists() and not resume:
        raise ProxyVError(
            f"an unfinished distillation of this model is saved in {checkpoints}; continue it with --resume "
            "or delete that folder to start over"
        )
    if resume and not checkpoints.exists():
        raise ProxyVError(f"there is nothing to resume: no checkpoint in {checkpoints}")
    if resume:
        check_checkpoint(checkpoints)  # before the model loads

    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # one process may distill again with another precision: accelerate
        AcceleratorState._reset_state()  # keeps the first run's state for the process otherwise, and refuses a change
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # so that `accelerate launch --multi_gpu` also runs CPU processes (gloo)
        mixed_precision=settings.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    torch.manual_seed(settings.seed)
    train = load_data(data, split=settings.train_split, columns=columns, revision=revision)
    evaluation, eval_indices, train_indices, held_split = held_out(data, columns, revision, settings, train)
    check_images_decode(train, train_indices, settings.seed)
    processor = load_processor(model_dir)
    token_ids = family.visual_token_ids(family.config.from_pretrained(model_dir))
    inputs = (family.image_inputs, family.video_inputs)
    log = (lambda message: tqdm.write(message, file=sys.stderr)) if progress and accelerator.is_main_process else None
    check_lengths(Batcher(train, processor, token_ids, settings.max_length, *inputs), train_indices, settings.seed,
                  log)  # before the model loads
    model = load_model(model_dir)
    proxyv = model.model.proxyv
    model.requires_grad_(False)
    proxyv.requires_grad_(True)
    if settings.mixed_precision != "no":
        proxyv.float()  # float32 master weights; autocast runs the matmuls in low precision
    if settings.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    model.train()
    sharding = None  # what each process holds, under FSDP
    if fsdp_requested():
        # Fused K/V copies (made on CUDA) would outlive the weights FSDP gathers for a layer and frees after it.
        model.fuse_projections(False)
        sharding = shard_model(model, accelerator.device.type, accelerator.num_processes)
    sharded = sharding is not None
    optimizer = torch.optim.AdamW(proxyv.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    if not sharded:  # sharded, the model is complete: accelerate would wrap it again (in DDP on CPU processes)
        model, optimizer = accelerator.prepare(model, optimizer)

    train_batcher = Batcher(train, processor, token_ids, settings.max_length, *inputs)
    # Under FSDP a process whose micro-batch has no usable example still runs a forward (its gathers are collective):
    # on the first usable example of the run, its loss times zero
    fallback = first_usable(train_batcher, train_indices, settings.seed) if sharded else None
    eval_batcher = Batcher(evaluation, processor, token_ids, settings.max_length, *inputs)
    fingerprint = {"data": str(data), "examples": len(train_indices), "seed": settings.seed,
                   "batch_size": settings.batch_size, "gradient_accumulation": settings.gradient_accumulation,
                   "processes": accelerator.num_processes}
    if resume:
        state = load_checkpoint(checkpoints, model, optimizer, scheduler)
        if state["fingerprint"] != fingerprint:
            raise ProxyVError(
                "the checkpoint was made with other data or batch settings "
                f"({state['fingerprint']} vs {fingerprint}); resume with the same ones"
            )
    else:
        state = {"step": 0, "fingerprint": fingerprint, "losses": [], "skipped_images": 0, "skipped_long": 0,
                 "seconds": 0.0, "before": agreement(model, eval_batcher, eval_indices, settings.batch_size,
                                                     accelerator)}
        if evaluation.answer:
            state["before"]["task"] = task_agreement(model, evaluation, eval_indices, processor, settings.batch_size,
                                                     accelerator, settings.max_length)

    per_process = settings.batch_size * settings.gradient_accumulation
    global_batch = per_process * accelerator.num_processes
    rank = accelerator.process_index
    if accelerator.device.type == "cpu" and accelerator.is_main_process and progress:
        warn_if_busy(lambda message: tqdm.write(message, file=sys.stderr))
    bar = tqdm(total=settings.steps, initial=state["step"], desc="distill", unit="step",
               disable=not progress or not accelerator.is_main_process, dynamic_ncols=True)
    started = time.perf_counter() - state["seconds"]
    with _Interrupt() as interrupt:
        while state["step"] < settings.steps:
            step = state["step"]
            indices = step_indices(len(train_indices), settings.seed, step, global_batch)
            mine = [train_indices[i] for i in indices[rank * per_process : (rank + 1) * per_process]]
            logged = train_step(model, optimizer, train_batcher, mine, settings, accelerator, state, fallback=fallback)
            if not math.isfinite(logged["loss"]):
                state["seconds"] = time.perf_counter() - started
                if accelerator.is_main_process or sharded:
                    save_checkpoint(checkpoints, model, optimizer, scheduler, state,
                                    write=accelerator.is_main_process)
                raise ProxyVError(
                    f"the loss became {logged['loss']} at step {step + 1}; stopped without changing the model. "
                    f"The last good weights (step {step}) are saved in {checkpoints}: continue with {continue_with} "
                    "and a smaller learning rate", exit_code=1,
                )
            accelerator.clip_grad_norm_(proxyv.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1
            state["losses"].append({"step": step + 1, **{k: round(v, 6) for k, v in logged.items()}})
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in logged.items()})
            done = state["step"] == settings.steps
            stop = interrupt.flag
            if accelerator.num_processes > 1:  # every process stops at the same step (under FSDP saving is collective)
                flags = torch.tensor([float(stop)], device=accelerator.device)
                stop = bool(accelerator.reduce(flags, reduction="sum").item() > 0)
            if done or state["step"] % settings.checkpoint_every == 0 or stop:
                state["seconds"] = time.perf_counter() - started
                if accelerator.is_main_process or sharded:
                    save_checkpoint(checkpoints, model, optimizer, scheduler, state,
                                    write=accelerator.is_main_process)
                accelerator.wait_for_everyone()
            if stop and not done:
                bar.close()
                raise ProxyVError(
                    f"interrupted at step {state['step']}; the progress is saved: continue with {continue_with}",
                    exit_code=130,
                )
    bar.close()
    seconds = time.perf_counter() - started
    after = agreement(model, eval_batcher, eval_indices, settings.batch_size, accelerator)
    if evaluation.answer:
        after["task"] = task_agreement(model, evaluation, eval_indices, processor, settings.batch_size, accelerator,
                                       settings.max_length)
    report = {
        "model": str(model_dir), "data": str(data), "held_out_split": held_split, "settings": settings.model_dump(),
        "columns": columns.model_dump(),
        "processes": accelerator.num_processes, "device": str(accelerator.device),
        "sharding": sharding,
        "steps": state["step"], "wall_seconds": round(seconds, 2),
        "steps_per_second": round(state["step"] / max(seconds, 1e-9), 4),
        "skipped": {"undecodable_images": state["skipped_images"], "too_long": state["skipped_long"]},
        "loss_curve": state["losses"], "before": state["before"], "after": after,
    }
    target = out or model_dir
    params = {f"model.proxyv.{n}": p for n, p in proxyv_state(model).items()} if sharded else {}
    if accelerator.is_main_process:
        params = params or {f"model.proxyv.{n}": p.detach() for n, p in unwrap(model).model.proxyv.named_parameters()}
        command = distill_command(str(model_dir), str(data), settings, out=None if out is None else str(out),
                                  columns=columns) if record_command else None
        files = {DISTILL_REPORT: json.dumps(report, indent=1)}
        if (model_dir / RECIPE_FILE).is_file():
            files[RECIPE_FILE] = recipe_with_distill(model_dir, str(data), settings, command, columns)
        write_proxyv_weights(model_dir, params, out=out, files=files)
        shutil.rmtree(checkpoints.parent if out is not None else checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    return DistillResult(out=target, steps=state["step"], seconds=seconds, report=report)


def first_usable(batcher: Batcher, indices: list[int], seed: int, probe: int = 16) -> Batch:
    """A batch of the first example of the run that is usable (`check_images_decode` and `check_lengths` made sure
    one of the first `probe` is)."""
    for i in step_indices(len(indices), seed, 0, min(probe, len(indices))):
        batch = batcher([indices[i]])
        if batch.used:
            return batch
    raise AssertionError("check_lengths lets no run start without a usable example")


def train_step(model, optimizer, batcher: Batcher, indices: list[int], settings: DistillSettings, accelerator,
               state: dict, fallback: Batch | None = None) -> dict[str, float]:
    """Forward and backward over this process's micro-batches of one optimizer step; returns the mean loss terms.
    A micro-batch with no usable example adds a zero loss: by the ProxyV parameters, or with `fallback` (under FSDP)
    by a forward on that batch."""
    from contextlib import nullcontext

    totals: dict[str, float] = {}
    skipped = torch.zeros(2, dtype=torch.int64)  # undecodable images, too long
    micro = settings.batch_size
    chunks = [indices[i : i + micro] for i in range(0, len(indices), micro)]
    for number, chunk in enumerate(chunks):
        batch = batcher(chunk)
        skipped += torch.tensor([batch.skipped_images, batch.skipped_long])
        sync = nullcontext() if number == len(chunks) - 1 else accelerator.no_sync(model)
        with sync:
            if batch.used == 0 and fallback is None:  # nothing usable: a zero loss keeps the processes in step
                loss = sum(p.sum() for p in unwrap(model).model.proxyv.parameters()) * 0.0
                terms = {}
            else:
                weight = 1.0 if batch.used else 0.0
                batch = batch if batch.used else fallback
                batch.inputs = {k: v.to(accelerator.device) for k, v in batch.inputs.items()}
                batch.image_mask = batch.image_mask.to(accelerator.device)
                with accelerator.autocast():
                    teacher, student = teacher_and_student(model, batch)
                    terms = distill_losses(unwrap(model), student, teacher, batch, settings)
                loss = terms["loss"] * weight
                terms = terms if weight else {}
            accelerator.backward(loss / len(chunks))
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + float(torch.as_tensor(value).detach()) / len(chunks)
    values = torch.tensor([totals.get(k, 0.0) for k in ("loss", "vision", "text", "kl")], device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    skipped = accelerator.reduce(skipped.to(accelerator.device), reduction="sum")  # every process's examples
    state["skipped_images"] += int(skipped[0])
    state["skipped_long"] += int(skipped[1])
    names = ["loss", "vision", "text"] + (["kl"] if settings.kl_weight > 0 else [])
    return {name: float(values[i]) for i, name in enumerate(names)}
