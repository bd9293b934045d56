"""Measure ProxyV against the same weights with ProxyV off, in one process, on the same inputs, in the same mode.

For each case (batch size, images per prompt) it reports
  - counted FLOPs of the language-model prefill: every matmul and attention call, counted by
    `torch.utils.flop_counter.FlopCounterMode` while the forward runs (elementwise work is not counted);
  - prefill latency: median of interleaved repeats (off, ProxyV, ProxyV, off, ...) after warm-up, for the language
    model alone (from the merged input embeddings; the ProxyV plan is built inside the timed region) and for the
    whole model (vision tower + projector + language model, as `generate` prefills);
  - decode latency per token after that prefill (ProxyV only changes the prefill; this checks it costs nothing);
  - peak memory of the prefill (CUDA: allocator peak; CPU: peak of the profiler's allocation trace).
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

from .atomic import folder_lock, write_text
from .errors import ProxyVError
from .families import family_of
from .model_folder import BENCH_REPORT
from .remote.modeling_proxyv import cache_keyword, capture_cuda_graph, plan_tensors  # the model's own, shared
from .threads import warn_if_busy


def _cache_keyword() -> str:
    """The cache argument's name in this transformers version."""
    from transformers import LlavaForConditionalGeneration

    return cache_keyword(LlavaForConditionalGeneration)


@dataclass
class BenchCase:
    batch: int
    images: int
    image_tokens: int
    text_tokens: int
    flops: dict[str, float] = field(default_factory=dict)  # GFLOPs of the language-model prefill
    flops_ratio: float = 0.0
    lm_prefill_ms: dict[str, float] = field(default_factory=dict)
    lm_prefill_ratio: float = 0.0
    plan_ms: float = 0.0  # building the ProxyV plan of a prompt (host work, included in the ProxyV prefill times)
    prefill_ms: dict[str, float] = field(default_factory=dict)
    prefill_ratio: float = 0.0
    # The whole-model prefill as `generate` runs it by default (CUDA, batch 1): ProxyV replays its prefill graphs,
    # the original runs eagerly. The other timings are each mode's own, with the model's prefill graphs off.
    prefill_default_ms: dict[str, float] = field(default_factory=dict)
    prefill_default_ratio: float = 0.0
    decode_ms_per_token: dict[str, float] = field(default_factory=dict)
    decode_ratio: float = 0.0
    peak_memory_mb: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchReport:
    device: str
    dtype: str
    mode: str
    start_layer: int
    reduce_factor: int
    repeats: int
    command: str = ""
    projections: str = ""  # the ProxyV layers' k/v and gate/up products: "fused" or "separate"
    cases: list[BenchCase] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _causal_pairs(queries: int, keys: int) -> int:
    """Query-key pairs a causal attention computes (torch's `is_causal`: query i sees keys 0..i)."""
    if queries <= keys:
        return queries * (queries + 1) // 2
    return keys * (keys + 1) // 2 + (queries - keys) * keys


def _attention_formula(op) -> Callable:
    """The FLOPs of an attention kernel call: torch's formula counts every query-key pair, but a causal call's kernels
    skip the blocks above the diagonal (on CPU it takes about half the time of the same call without is_causal), so
    only the pairs it computes are counted."""
    names = [argument.name for argument in op.default._schema.arguments]
    causal_at = names.index("is_causal")

    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        flops = sdpa_flop_count(query_shape, key_shape, value_shape)
        causal = kwargs.get("is_causal", args[causal_at - 3] if len(args) > causal_at - 3 else False)
        if causal:
            queries, keys = query_shape[-2], key_shape[-2]
            flops = flops * _causal_pairs(queries, keys) // (queries * keys)
        return flops

    formula._get_raw = False  # FlopCounterMode passes it shapes
    return formula


_ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


def _as_registered(op):
    """torch's registered FLOP formula of `op`, for another op (already taking what the counter passes)."""
    formula = partial(flop_registry[op])
    formula._get_raw = True
    return formula


def count_flops(fn: Callable[[], object]) -> float:
    """GFLOPs of every matmul and attention call in `fn` (CPU attention kernels included; causal attention counted
    as the pairs it computes)."""
    # In-place products (a ProxyV layer without gradients adds into its own buffers) cost what their
    # out-of-place forms do, which torch's counter knows.
    mapping = {torch.ops.aten.addmm_: _as_registered(torch.ops.aten.addmm),
               torch.ops.aten.baddbmm_: _as_registered(torch.ops.aten.baddbmm)}
    for name in _ATTENTION_OPS:
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            mapping[op] = _attention_formula(op)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int, warmup: int,
                        device: torch.device) -> dict[str, float]:
    """Median milliseconds of each run, alternating the order every repeat so drift hits both sides alike."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: round(statistics.median(values), 3) for name, values in times.items()}


def median_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of `fn` on its own."""
    return interleaved_medians({"fn": fn}, repeats, warmup, device)["fn"]


class _TensorMemory:
    """Peak bytes of the tensors created while it is active (a dispatch mode that tracks storages until freed)."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for key, (ref, size) in list(tracker.live.items()):
                    if ref.expired():
                        del tracker.live[key]
                        tracker.current -= size
                for tensor in tree_leaves(out):
                    if isinstance(tensor, torch.Tensor):
                        storage = tensor.untyped_storage()
                        ref = StorageWeakRef(storage)
                        if ref.cdata not in tracker.live:
                            tracker.live[ref.cdata] = (ref, storage.nbytes())
                            tracker.current += storage.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self.mode = Mode()
        self.live: dict[int, tuple[object, int]] = {}
        self.current = self.peak = 0


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of the tensors `fn` allocates (activations, caches; not the weights). CUDA: the allocator's peak
    above what was allocated before; CPU: tensors tracked from creation until their storage is freed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)
    tracker = _TensorMemory()
    with tracker.mode:
        fn()
    return round(tracker.peak / 2**20, 1)


def synthetic_inputs(model, batch: int, images: int, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompts of `text_tokens` random text tokens around `images` images each (no padding); the images are the
    family's largest (see `Family.synthetic_images`)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    pixel_values, extra, per_image = family_of(config).synthetic_images(model, batch * images, generator)
    vocab = config.text_config.vocab_size
    low = 3  # keep clear of the usual special tokens
    text = torch.randint(low, vocab, (batch, text_tokens), generator=generator)
    text[text == config.image_token_id] = low
    before = max(1, text_tokens // 8)  # a short system/user prefix before the first image, the rest after
    parts = [text[:, :before]]
    for _ in range(images):
        parts.append(torch.full((batch, per_image), config.image_token_id))
    parts.append(text[:, before:])
    input_ids = torch.cat(parts, dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
            **extra}


class _Cut(Exception):
    """Ends a forward before a chosen decoder layer (see `split_prefill`)."""


def split_prefill(lm, kwargs: dict, layer: int) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """The language model's forward with `kwargs`, cut before decoder layer `layer`: head() runs the model's own
    forward up to that layer (a pre-hook on it ends the forward) and returns the hidden states it would pass on;
    tail() runs that layer and the ones after it (with the arguments the forward gave it, as the forward's loop
    does) and the final norm on what the last head() left, and returns the forward's last_hidden_state."""
    layers = lm.layers[: lm.config.num_hidden_layers]
    seen: dict = {}

    def cut(module, args, layer_kwargs):
        seen["kwargs"] = dict(layer_kwargs)
        seen["hidden"] = args[0] if args else seen["kwargs"].pop("hidden_states")
        raise _Cut

    def head() -> torch.Tensor:
        handle = layers[layer].register_forward_pre_hook(cut, with_kwargs=True)
        try:
            lm(**kwargs)
        except _Cut:
            return seen["hidden"]
        finally:
            handle.remove()
        raise RuntimeError(f"the forward never reached decoder layer {layer}")

    def tail() -> torch.Tensor:
        hidden = seen["hidden"]
        for module in layers[layer:]:
            hidden = module(hidden, **seen["kwargs"])
        return lm.norm(hidden)

    return head, tail


class Runner:
    """The timed functions of one case, on one model, with ProxyV on and off."""

    def __init__(self, model, inputs: dict[str, torch.Tensor], compiled_lm=None):
        self.model = model
        self.core = model.model
        self.lm = self.core.language_model if compiled_lm is None else compiled_lm
        device, dtype = model.device, model.dtype
        self.inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        # What a server has on the host before a prefill: the token ids, the attention mask (and image sizes). The
        # ProxyV plan is built from these, so building it waits for nothing the device is doing.
        self.prompt = {k: v.cpu() for k, v in inputs.items() if k != "pixel_values"}
        with torch.no_grad():
            extra = {k: self.inputs[k] for k in family_of(model.config).image_inputs if k != "pixel_values"}
            features = self.core.get_image_features(pixel_values=self.inputs["pixel_values"], **extra).pooler_output
            features = torch.cat(list(features), dim=0)
            embeds = self.core.get_input_embeddings()(self.inputs["input_ids"])
            mask = (self.inputs["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
            self.embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))

    def eager(self) -> Runner:
        """The same inputs and embeddings, run through the uncompiled language model."""
        lm = getattr(self.lm, "_orig_mod", self.lm)  # the model's own language model may be the compiled one
        if lm is self.lm:
            return self
        runner = copy.copy(self)
        runner.lm = lm
        return runner

    def plan(self):
        """The ProxyV plan of the prompt, built on the host from `prompt`, its tensors on the model's device."""
        return self.core._make_plan(dict(self.prompt), device=self.model.device)

    def pending_plan(self):
        """The prompt's plan, built when the start layer asks for it (as in the model's own forward: the host builds
        it after queueing the layers before)."""
        return sys.modules[type(self.core).__module__].ProxyVPendingPlan(self.plan)

    def lm_kwargs(self, plan=None) -> dict:
        """The language model's arguments for the prompt's prefill, with `plan` (built or pending) if one is given."""
        kwargs = {"inputs_embeds": self.embeds, "attention_mask": self.inputs["attention_mask"], "use_cache": False}
        return kwargs if plan is None else {**kwargs, "proxyv_plan": plan}

    @torch.no_grad()
    def lm_prefill(self, proxyv: bool):
        plan = self.pending_plan().argument_for(self.lm) if proxyv else None  # as the model's forward passes it
        return self.lm(**self.lm_kwargs(plan)).last_hidden_state

    def cuda_graph_prefill(self, proxyv: bool, split: bool = True,
                           forms: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                           ) -> Callable[[], torch.Tensor]:
        """The language-model prefill in CUDA graphs. The returned function does what serving a new prompt through
        them takes and returns the output tensor the graphs write.

        ProxyV off: one graph of the prefill. ProxyV on: two graphs, the layers before the start layer and the rest:
        the first is replayed, the new prompt's plan is built on the host while the device runs it and is copied into
        the captured plan's tensors, then the second is replayed, so the plan's host work hides behind device work.
        `split=False`: one graph, the plan built and copied before it is replayed. `forms`: a context in which the
        graphs are captured (benchmarks/forward_variants.py captures other forms of the forward in it)."""
        # Made on both sides: the first ProxyV plan on a device settles the layout of the weights (it may fuse them),
        # which must not change under a captured graph.
        static_plan = self.plan()
        kwargs = self.lm_kwargs(static_plan if proxyv else None)
        with torch.no_grad(), forms():
            if proxyv and split:
                head, tail = split_prefill(self.lm, kwargs, self.model.config.proxyv_start_layer)
                first, _ = capture_cuda_graph(head)
                first.replay()  # the second graph's warm-up calls read what the first writes
                second, out = capture_cuda_graph(tail)
                graphs, keep = (first, second), (head, tail)  # the second graph reads what head() handed on
            else:
                graph, out = capture_cuda_graph(lambda: self.lm(**kwargs).last_hidden_state)
                graphs, keep = (graph,), ()
        targets = plan_tensors(static_plan) if proxyv else []

        def run() -> torch.Tensor:
            if len(graphs) == 2:
                graphs[0].replay()
            if proxyv:
                for target, value in zip(targets, plan_tensors(self.plan()), strict=True):
                    target.copy_(value, non_blocking=True)
            graphs[-1].replay()
            return out

        # The graphs (with their memory pools) and every tensor they read live as long as the function.
        run.graphs, run.out, run.keep = graphs, out, keep
        return run

    @torch.no_grad()
    def prefill(self, proxyv: bool):
        with self._mode(proxyv):
            return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def decode_ms_per_token(self, tokens: int, device: torch.device) -> dict[str, float]:
        """Median milliseconds of one greedy decode step after a prefill, for both sides, their steps interleaved.

        The whole decode runs once untimed first: per-shape setup (on CUDA, cuDNN builds an attention plan for every
        new key length) then costs neither side, instead of whichever side reaches a length first."""
        self._decode(tokens, device)
        return self._decode(tokens, device)

    def _decode(self, tokens: int, device: torch.device) -> dict[str, float]:
        state = {}
        for side, on in (("off", False), ("proxyv", True)):
            with self._mode(on):
                out = self.model(**self.inputs, use_cache=True, logits_to_keep=1)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            state[side] = [out.logits[:, -1:].argmax(-1), self.inputs["attention_mask"], cache]
        times: dict[str, list[float]] = {side: [] for side in state}
        for step in range(tokens):
            for side in state if step % 2 == 0 else list(state)[::-1]:
                token, mask, cache = state[side]
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                with self._mode(side == "proxyv"):
                    synchronize(device)
                    start = time.perf_counter()
                    out = self.model(input_ids=token, attention_mask=mask, use_cache=True, **{_cache_keyword(): cache})
                    synchronize(device)
                times[side].append((time.perf_counter() - start) * 1000)
                state[side] = [out.logits[:, -1:].argmax(-1), mask, cache]
        return {side: round(statistics.median(values[1:] or values), 3) for side, values in times.items()}

    def _mode(self, proxyv: bool):
        return contextlib.nullcontext() if proxyv else self.model.proxyv_disabled()


@contextlib.contextmanager
def _restored(config, graphs: bool):
    """Puts the config's `proxyv_cuda_graphs` back to `graphs` at the end."""
    try:
        yield
    finally:
        config.proxyv_cuda_graphs = graphs


def check_mode(device: torch.device, *, compile: bool, cuda_graph: bool) -> None:
    if cuda_graph and compile:
        raise ProxyVError("--cuda-graph and --compile are two modes; choose one")
    if cuda_graph and device.type != "cuda":
        raise ProxyVError(f"--cuda-graph needs a CUDA device; the device is {device}")


def bench(
    model,
    *,
    batch_sizes: tuple[int, ...] = (1,),
    images: tuple[int, ...] = (1,),
    text_tokens: int = 64,
    repeats: int = 10,
    warmup: int = 3,
    decode_tokens: int = 16,
    compile: bool = False,
    compile_mode: str | None = None,
    cuda_graph: bool = False,
    cases: tuple[tuple[int, int], ...] | None = None,
    memory: bool = True,
    whole_model: bool = True,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Benchmark a loaded ProxyV model (see the module docstring). `cases` ((batch, images), ...) replaces the
    product of `batch_sizes` and `images`. With `compile`, the language model is compiled once and both sides run
    it; `compile_mode` defaults to "reduce-overhead" (CUDA graphs) on CUDA and "default" elsewhere. With
    `cuda_graph` (CUDA only), each side's language-model prefill is captured in a CUDA graph of its own and replayed
    (see `Runner.cuda_graph_prefill`)."""
    if not hasattr(model, "proxyv_disabled"):
        raise ProxyVError("bench needs a ProxyV model (from proxyv convert)")
    device = model.device
    check_mode(device, compile=compile, cuda_graph=cuda_graph)
    if compile_mode is None:
        compile_mode = "reduce-overhead" if device.type == "cuda" else "default"
    compiled = torch.compile(model.model.language_model, mode=compile_mode) if compile else None
    report = BenchReport(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} "
        "threads)",
        dtype=str(model.dtype).removeprefix("torch."),
        mode=f"compile ({compile_mode})" if compile else "CUDA graph" if cuda_graph else "eager",
        start_layer=model.config.proxyv_start_layer, reduce_factor=model.config.proxyv_reduce_factor,
        repeats=repeats,
    )
    cases = cases or tuple((b, n) for b in batch_sizes for n in images)
    # Compiled: one static graph per case and side (as a server compiles per shape bucket), none given up on.
    settings = {"automatic_dynamic_shapes": False, "cache_size_limit": 2 * len(cases) + 8} if compile else {}
    graphs_default = getattr(model.config, "proxyv_cuda_graphs", False)
    model.config.proxyv_cuda_graphs = False  # each mode's timings are that mode's (see BenchCase.prefill_default_ms)
    with torch._dynamo.config.patch(**settings), _restored(model.config, graphs_default):
        for batch, count in cases:
            inputs = synthetic_inputs(model, batch, count, text_tokens)
            runner = Runner(model, inputs, compiled)
            case = BenchCase(batch=batch, images=count, text_tokens=text_tokens,
                             image_tokens=int((inputs["input_ids"][0] == model.config.image_token_id).sum()))
            if progress:
                progress(f"batch {batch}, {count} image(s): counting FLOPs")
            plain = runner.eager()  # FLOPs and memory are measured on the eager graph
            sides = {"off": False, "proxyv": True}
            case.flops = {side: round(count_flops(partial(plain.lm_prefill, on)), 3) for side, on in sides.items()}
            case.flops_ratio = round(case.flops["proxyv"] / case.flops["off"], 4)
            if progress:
                progress(f"batch {batch}, {count} image(s): timing the language-model prefill")
            if cuda_graph:
                timed = {side: runner.cuda_graph_prefill(on) for side, on in sides.items()}
            else:
                timed = {side: partial(runner.lm_prefill, on) for side, on in sides.items()}
            case.lm_prefill_ms = interleaved_medians(timed, repeats, warmup, device)
            del timed  # frees the graphs' memory pools before the memory is measured
            case.lm_prefill_ratio = round(case.lm_prefill_ms["proxyv"] / case.lm_prefill_ms["off"], 4)
            case.plan_ms = median_ms(runner.plan, repeats, warmup, device)
            if whole_model:
                if progress:
                    progress(f"batch {batch}, {count} image(s): timing the whole-model prefill and decoding")
                case.prefill_ms = interleaved_medians(
                    {side: partial(runner.prefill, on) for side, on in sides.items()}, repeats, warmup, device
                )
                case.prefill_ratio = round(case.prefill_ms["proxyv"] / case.prefill_ms["off"], 4)
                case.decode_ms_per_token = runner.decode_ms_per_token(decode_tokens, device)
                case.decode_ratio = round(case.decode_ms_per_token["proxyv"] / case.decode_ms_per_token["off"], 4)
                if graphs_default and device.type == "cuda" and batch == 1:
                    model.config.proxyv_cuda_graphs = True  # captured in the warm-up (the second call of a shape)
                    case.prefill_default_ms = interleaved_medians(
                        {side: partial(runner.prefill, on) for side, on in sides.items()}, repeats, max(warmup, 3),
                        device)
                    model.config.proxyv_cuda_graphs = False
                    model.model.__dict__.pop("_proxyv_graphs", None)  # their memory, before memory is measured
                    case.prefill_default_ratio = round(
                        case.prefill_default_ms["proxyv"] / case.prefill_default_ms["off"], 4)
            if memory:
                case.peak_memory_mb = {
                    side: peak_memory_mb(partial(plain.lm_prefill, on), device) for side, on in sides.items()
                }
            report.cases.append(case)
    fused = any(layer.__dict__.get("_proxyv_fused") for layer in model.model.language_model.layers)
    report.projections = "fused" if fused else "separate"
    return report


def format_report(report: BenchReport) -> str:
    lines = [
        f"device {report.device}, {report.dtype}, {report.mode}, ProxyV from layer {report.start_layer}, "
        f"reduce factor {report.reduce_factor}, {report.projections or 'separate'} k/v and gate/up products, "
        f"median of {report.repeats} interleaved repeats",
        f"{'batch':>5} {'images':>6} {'tokens':>6} {'GFLOPs off':>10} {'FLOPs ratio':>11} {'LM off ms':>9} "
        f"{'LM ProxyV ms':>12} {'plan ms':>7} {'LM ratio':>8} {'ratio/FLOPs':>11} {'model ratio':>11} "
        f"{'decode ratio':>12} {'default ratio':>13}",
    ]
    for c in report.cases:
        lines.append(
            f"{c.batch:>5} {c.images:>6} {c.image_tokens + c.text_tokens:>6} {c.flops['off']:>10.1f} "
            f"{c.flops_ratio:>11.3f} {c.lm_prefill_ms['off']:>9.1f} {c.lm_prefill_ms['proxyv']:>12.1f} "
            f"{c.plan_ms:>7.2f} {c.lm_prefill_ratio:>8.3f} {c.lm_prefill_ratio / c.flops_ratio:>11.3f} "
            f"{c.prefill_ratio or float('nan'):>11.3f} {c.decode_ratio or float('nan'):>12.3f} "
            f"{c.prefill_default_ratio or float('nan'):>13.3f}"
        )
    return "\n".join(lines)


def write_report(folder: Path, report: BenchReport) -> Path:
    with folder_lock(Path(folder)):  # not while another command writes into the folder
        return write_text(Path(folder) / BENCH_REPORT, report.to_json())


def run_bench(
    folder: str | Path,
    *,
    device: str | None = None,
    dtype: str = "auto",
    attn: str = "sdpa",
    write: bool = True,
    **options,
) -> tuple[BenchReport, Path | None]:
    """Load a ProxyV folder, benchmark it (options as `bench`), and write bench_report.json into the folder."""
    import shlex

    from .model_folder import is_proxyv_folder, load_model

    folder = Path(folder)
    if not is_proxyv_folder(folder):
        raise ProxyVError(f"{folder} is not a ProxyV model folder; make one with `proxyv convert`")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ProxyVError(f"--dtype {dtype} is not one of auto, float32, bfloat16, float16")
    if attn not in ("sdpa", "eager"):
        raise ProxyVError(f"--attn {attn} is not one of sdpa, eager")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ProxyVError(f"--device {device} is not a device torch knows") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProxyVError(f"--device {device}: CUDA is not available here")
    check_mode(torch.device(device), compile=options.get("compile", False),
               cuda_graph=options.get("cuda_graph", False))  # before loading the model
    model = load_model(folder, dtype=None if dtype == "auto" else getattr(torch, dtype), device=device,
                       attn_implementation=attn)
    if model.device.type == "cpu":
        warn_if_busy()  # timings on a busy CPU: say so before they are taken
    report = bench(model, **options)
    report.command = shlex.join(["proxyv", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("proxyv", "cli.py") else (
        f"proxyv bench {folder}")
    if not write:
        return report, None
    return report, write_report(folder, report)
