"""`proxyv bench`: counted FLOPs match the method's arithmetic, reports are complete and written, errors are clear."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_modeling import convert_in_memory
from tiny_models import save_tiny_llava, tiny_llava

from proxyv_convert.bench import bench, count_flops, peak_memory_mb, synthetic_inputs
from proxyv_convert.convert import convert
from proxyv_convert.model_folder import BENCH_REPORT as REPORT


def layer_flops(config, rows: int, queries: int, pairs: int, proxies: int = 0, vision: int = 0) -> int:
    """Matmul FLOPs of one decoder layer: `queries` rows get q/o/FFN, `rows` rows give keys/values, attention
    computes `pairs` query-key pairs; a ProxyV layer also runs its VisionMLP on `vision` full tokens and `proxies`
    proxies."""
    text = config.text_config
    hidden, inter, heads = text.hidden_size, text.intermediate_size, text.num_attention_heads
    head_dim = hidden // heads
    kv = text.num_key_value_heads * head_dim
    flops = 2 * queries * hidden * hidden * 2 + 2 * rows * hidden * kv * 2  # q, o; k, v
    flops += 2 * queries * hidden * inter * 3  # gate, up, down
    flops += 2 * heads * pairs * head_dim * 2  # scores and weighted values
    if vision:
        width = config.proxyv_vision_mlp_size
        flops += 2 * vision * hidden * width + 2 * proxies * hidden * width  # the two input projections
        # fuse: its own-token half on every full token, its context half on the proxies before they are spread
        flops += 2 * vision * width * width + 2 * proxies * width * width + 2 * vision * width * hidden  # out
    return flops


def test_counted_flops_match_the_arithmetic():
    model = convert_in_memory(tiny_llava(), randomize=False)
    config = model.config
    inputs = synthetic_inputs(model, batch=1, images=1, text_tokens=20)
    seq = inputs["input_ids"].shape[1]
    vision = config.proxyv_grid**2
    proxies = vision // config.proxyv_reduce_factor**2
    text = seq - vision
    from proxyv_convert.bench import Runner

    runner = Runner(model, inputs)
    layers = config.text_config.num_hidden_layers
    start = config.proxyv_start_layer
    full = layer_flops(config, seq, seq, seq * (seq + 1) // 2)  # causal: the pairs on and below the diagonal
    # Text queries attend over every key row, proxies over the text rows and the proxies.
    pairs = text * (seq + proxies) + proxies * (text + proxies)
    proxyv = layer_flops(config, seq + proxies, text + proxies, pairs, proxies, vision)
    assert count_flops(lambda: runner.lm_prefill(False)) * 1e9 == pytest.approx(layers * full, rel=1e-9)
    assert count_flops(lambda: runner.lm_prefill(True)) * 1e9 == pytest.approx(
        start * full + (layers - start) * proxyv, rel=1e-9
    )


def test_peak_memory_tracks_live_tensors():
    def three_live_then_two():
        a, b = torch.ones(256, 1024), torch.ones(256, 1024)  # 1 MiB each
        c = a + b
        del a, b
        return c * 2

    assert peak_memory_mb(three_live_then_two, torch.device("cpu")) == 3.0


def test_bench_report_is_complete():
    model = convert_in_memory(tiny_llava(), randomize=False)
    report = bench(model, batch_sizes=(1, 2), images=(1, 2), text_tokens=16, repeats=2, warmup=1, decode_tokens=3)
    assert [(c.batch, c.images) for c in report.cases] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for case in report.cases:
        assert 0 < case.flops_ratio < 1
        assert case.flops["off"] > case.flops["proxyv"] > 0
        for timing in (case.lm_prefill_ms, case.prefill_ms, case.decode_ms_per_token):
            assert set(timing) == {"off", "proxyv"} and min(timing.values()) > 0
        assert case.peak_memory_mb["off"] > 0 and case.peak_memory_mb["proxyv"] > 0
        assert 0 < case.plan_ms < case.lm_prefill_ms["proxyv"]
        assert case.image_tokens == case.images * 576
    more_images = {c.images: c.flops_ratio for c in report.cases if c.batch == 1}
    assert more_images[2] < more_images[1], "more vision tokens, larger saving"
    assert json.loads(report.to_json())["mode"] == "eager"


def test_cli_writes_the_report_and_the_card_shows_it(tmp_path):
    source = save_tiny_llava(tmp_path / "source")
    convert(str(source), tmp_path / "m", layer=2, progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "proxyv_convert.cli", "bench", str(tmp_path / "m"), "--repeats", "2", "--warmup", "1",
         "--device", "cpu"], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "m" / REPORT).read_text())
    assert report["cases"][0]["batch"] == 1 and report["command"].startswith("proxyv bench")
    assert "FLOPs ratio" in result.stdout and f"Report: {tmp_path / 'm' / REPORT}" in result.stdout
    from proxyv_convert.card import model_card

    assert "## Speed" in model_card(tmp_path / "m")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--device", "cuda:7"], "CUDA is not available"),
        (["--dtype", "int8"], "--dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16' (got 'int8')"),
        (["--attn", "flash"], "--attn: Input should be 'sdpa' or 'eager' (got 'flash')"),
        (["--device", "cpu", "--cuda-graph"], "--cuda-graph needs a CUDA device"),
    ],
)
def test_cli_errors(tmp_path, args, message):
    source = save_tiny_llava(tmp_path / "source")
    convert(str(source), tmp_path / "m", layer=2, progress=False)
    result = subprocess.run([sys.executable, "-m", "proxyv_convert.cli", "bench", str(tmp_path / "m"), *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_cli_refuses_a_plain_llava(tmp_path):
    source = save_tiny_llava(tmp_path / "source")
    result = subprocess.run([sys.executable, "-m", "proxyv_convert.cli", "bench", str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "is not a ProxyV model folder" in result.stderr


def test_llava_next_and_learned_models_are_benchmarked():
    from test_learned_proxies import learned_model
    from test_llava_next import converted as next_converted
    from tiny_models import tiny_llava_next

    from proxyv_convert.remote.configuration_proxyv import ProxyVLlavaConfig
    from proxyv_convert.remote.modeling_proxyv import ProxyVLlavaForConditionalGeneration

    next_model = next_converted(tiny_llava_next(seed=4))
    case = bench(next_model, repeats=1, warmup=0, decode_tokens=2, whole_model=False, memory=False).cases[0]
    assert case.image_tokens == next_model.model.image_layout([64, 64])[0]  # the 2x2-crop pinpoint: 5 crops
    assert 0 < case.flops_ratio < 1 and min(case.lm_prefill_ms.values()) > 0
    learned = learned_model(tiny_llava(seed=1), ProxyVLlavaConfig, ProxyVLlavaForConditionalGeneration)
    case = bench(learned, repeats=1, warmup=0, whole_model=False, memory=False).cases[0]
    assert 0 < case.flops_ratio < 1


@pytest.mark.parametrize("fused", [True, False], ids=["fused projections", "separate projections"])
def test_the_proxyv_language_model_traces_as_one_graph(fused):
    """torch.compile / CUDA graphs need the ProxyV layers free of graph breaks (the plan is built before them).
    Compiled, the layers use the separate k/v and gate/up products even where the weights are fused."""
    import torch._dynamo

    model = convert_in_memory(tiny_llava(), randomize=True)
    model.fuse_projections(fused)
    from proxyv_convert.bench import Runner

    runner = Runner(model, synthetic_inputs(model, batch=2, images=1, text_tokens=12))
    plan = model.model._make_plan({k: v for k, v in runner.inputs.items() if k != "pixel_values"})
    lm = model.model.language_model

    def prefill(embeds, mask):
        return lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, proxyv_plan=plan).last_hidden_state

    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(prefill)(runner.embeds, runner.inputs["attention_mask"])
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        embeds, mask = runner.embeds, runner.inputs["attention_mask"]
        graphs = []

        def backend(graph, example_inputs):
            graphs.append(graph)
            return graph.forward

        compiled = torch.compile(prefill, backend=backend, fullgraph=True)(embeds, mask)
        torch.testing.assert_close(compiled, prefill(embeds, mask))
    start = model.config.proxyv_start_layer
    assert bool(lm.layers[start].__dict__.get("_proxyv_fused")) == fused
    inputs = [str(node.target) for node in graphs[0].graph.find_nodes(op="placeholder")]  # named by their source
    assert not any("proxyv_fused" in name for name in inputs)
    assert any(f"layers_modules_{start}_" in name and "k_proj" in name for name in inputs)


def test_the_runner_builds_the_plan_before_a_compiled_language_model():
    """A model whose own language model was replaced by its compiled version (the documented way to use CUDA graphs):
    the benchmark's prefill builds the plan before calling it, as the model's forward does, so the compiled graph has
    no host code in it (fullgraph=True fails on any graph break); eager() gives the uncompiled language model."""
    import torch._dynamo

    from proxyv_convert.bench import Runner

    model = convert_in_memory(tiny_llava(), randomize=True)
    inputs = synthetic_inputs(model, batch=2, images=1, text_tokens=12)
    with torch.no_grad():
        expected = {on: Runner(model, inputs).lm_prefill(on) for on in (False, True)}
    core = model.model
    original = core.language_model
    torch._dynamo.reset()
    core.language_model = torch.compile(original, backend="eager", fullgraph=True)
    try:
        runner = Runner(model, inputs)
        for on in (False, True):
            torch.testing.assert_close(runner.lm_prefill(on), expected[on])
        assert runner.eager().lm is original
    finally:
        core.language_model = original


@pytest.mark.parametrize("proxy", ["spatial", "learned"])
def test_a_plan_copied_into_another_computes_the_new_prompt(proxy):
    """CUDA-graph timing replays one captured plan after copying a new prompt's plan tensors into it: the copy must
    carry everything the forward reads. Two prompts of the same length with the image at different places."""
    from proxyv_convert.bench import plan_tensors

    if proxy == "spatial":
        model = convert_in_memory(tiny_llava(), randomize=True)
    else:
        from test_learned_proxies import learned_model

        from proxyv_convert.remote.configuration_proxyv import ProxyVLlavaConfig
        from proxyv_convert.remote.modeling_proxyv import ProxyVLlavaForConditionalGeneration

        model = learned_model(tiny_llava(seed=1), ProxyVLlavaConfig, ProxyVLlavaForConditionalGeneration)
    first = synthetic_inputs(model, batch=2, images=1, text_tokens=16)
    ids = first["input_ids"]
    second = dict(first, input_ids=torch.cat([ids[:, -6:], ids[:, :-6]], dim=1))  # the image 6 tokens later
    assert not torch.equal(first["input_ids"], second["input_ids"])
    lm, embeds = model.model.language_model, torch.randn(2, ids.shape[1], model.config.text_config.hidden_size)

    def run(plan):
        with torch.no_grad():
            return lm(inputs_embeds=embeds, use_cache=False, proxyv_plan=plan).last_hidden_state

    def plan_of(inputs):
        return model.model._make_plan({k: v for k, v in inputs.items() if k != "pixel_values"})

    captured, fresh = plan_of(first), plan_of(second)
    before, expected = run(captured), run(fresh)
    assert (before - expected).abs().max() > 1e-3  # the two prompts compute different things
    for target, value in zip(plan_tensors(captured), plan_tensors(fresh), strict=True):
        assert target.shape == value.shape
        target.copy_(value)
    torch.testing.assert_close(run(captured), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_a_prefill_cut_before_the_start_layer_computes_the_whole_prefill(arch):
    """`bench --cuda-graph` runs the ProxyV prefill as two graphs, cut before the start layer (the plan is built
    between them). The two halves, run one after the other, give the language model's own output bit for bit, with
    ProxyV on and off, and leave no hook behind; a cut past the last layer is an error."""
    from proxyv_convert.bench import Runner, plan_tensors, split_prefill

    if arch == "llava":
        model = convert_in_memory(tiny_llava(), randomize=True)
    else:
        from test_llava_next import converted as next_converted
        from tiny_models import tiny_llava_next

        model = next_converted(tiny_llava_next(seed=4))
    inputs = synthetic_inputs(model, batch=2, images=1, text_tokens=12)
    inputs["attention_mask"][1, :3] = 0  # left padding in the second prompt
    runner = Runner(model, inputs)
    lm, start = model.model.language_model, model.config.proxyv_start_layer
    for proxyv in (False, True):
        kwargs = runner.lm_kwargs(runner.plan() if proxyv else None)
        with torch.no_grad():
            whole = lm(**kwargs).last_hidden_state
            head, tail = split_prefill(lm, kwargs, start)
            passed = head()
            assert passed.shape == (2, inputs["input_ids"].shape[1], model.config.text_config.hidden_size)
            assert torch.equal(tail(), whole)
            assert not any(layer._forward_pre_hooks for layer in lm.layers)
    # As in the graphs: a new prompt's plan copied into the captured one, then only the second half runs again (the
    # first half's outputs, position embeddings included, are the same tensors as before).
    ids = inputs["input_ids"]
    other = Runner(model, dict(inputs, input_ids=torch.cat([ids[:, -5:], ids[:, :-5]], dim=1)))
    new_plan = other.plan()
    for target, value in zip(plan_tensors(kwargs["proxyv_plan"]), plan_tensors(new_plan), strict=True):
        target.copy_(value)
    with torch.no_grad():
        expected = lm(**dict(kwargs, proxyv_plan=new_plan)).last_hidden_state
        assert (expected - whole).abs().max() > 1e-3  # the image moved: a different prefill
        assert torch.equal(tail(), expected)
    with pytest.raises(IndexError):
        split_prefill(lm, kwargs, len(lm.layers))[0]()


def test_the_plan_is_built_from_the_prompt_on_the_host():
    """The benchmark builds a prompt's plan from host-side token ids and attention mask, for the model's device:
    the same plan as from the inputs on that device (so nothing waits for the device while it is built)."""
    from proxyv_convert.bench import Runner, plan_tensors

    model = convert_in_memory(tiny_llava(), randomize=True)
    runner = Runner(model, synthetic_inputs(model, batch=2, images=1, text_tokens=12))
    assert all(tensor.device.type == "cpu" for tensor in runner.prompt.values())
    assert "pixel_values" not in runner.prompt
    from_device = model.model._make_plan({k: v for k, v in runner.inputs.items() if k != "pixel_values"})
    for ours, theirs in zip(plan_tensors(runner.plan()), plan_tensors(from_device), strict=True):
        assert ours.device == model.device and torch.equal(ours, theirs)
