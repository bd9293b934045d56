"""The ProxyV model, torch.compile and `proxyv bench` on a CUDA device.

Machines without CUDA skip this module (pytest lists it as skipped); on a GPU machine run
`python -m pytest -q -n0 tests/test_cuda.py` (in one process: one device). float32 checks run with TF32 off, so that
GPU arithmetic is comparable with the CPU reference.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from proxyv_reference import reference_logits
from test_modeling import PROMPTS, batch, convert_in_memory, greedy_without_cache, pixel_values_for
from tiny_models import save_tiny_llava, tiny_llava
from transformers import DynamicCache

from proxyv_convert.bench import Runner, bench, plan_tensors, synthetic_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = "cuda"


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cpu_pair():
    source = tiny_llava(seed=0)
    return source, convert_in_memory(source)


@pytest.fixture(scope="module")
def cuda_pair(cpu_pair):
    source, proxyv = cpu_pair
    return copy.deepcopy(source).to(CUDA), copy.deepcopy(proxyv).to(CUDA)


def inputs_for(names: list[str], device: str = CUDA):
    prompts = [PROMPTS[n] for n in names]
    ids, mask = batch(prompts, "left")
    pixels = pixel_values_for(prompts)
    return ids.to(device), mask.to(device), None if pixels is None else pixels.to(device)


def test_off_is_bit_exact_on_cuda(cuda_pair):
    source, proxyv = cuda_pair
    ids, mask, pixels = inputs_for(["one image", "two images", "no image"])
    with torch.no_grad():
        expected = source(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        with proxyv.proxyv_disabled():
            off = proxyv(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        on = proxyv(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.equal(off, expected)
    assert (on - expected).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["one image", "two images", "image last"])
def test_matches_the_reference_on_cuda(cpu_pair, cuda_pair, name):
    prompt = torch.tensor(PROMPTS[name])
    pixels = pixel_values_for([PROMPTS[name]])
    expected = reference_logits(cpu_pair[1], prompt, pixels)  # float32 on the CPU, token by token
    with torch.no_grad():
        logits = cuda_pair[1](input_ids=prompt[None].to(CUDA), pixel_values=pixels.to(CUDA)).logits[0]
    torch.testing.assert_close(logits.cpu(), expected, atol=1e-4, rtol=1e-3)
    layer = cuda_pair[1].model.language_model.layers[cuda_pair[1].config.proxyv_start_layer]
    assert set(layer.__dict__.get("_proxyv_fused") or {}) == {"kv", "gate_up"}  # on CUDA the products are fused


def test_plan_on_cuda_equals_the_cpu_plan(cpu_pair, cuda_pair):
    """The plan's tensors reach the device packed in one copy per dtype: every one must arrive intact."""
    ids, mask, _ = inputs_for(["one image", "two images", "no image"])
    on_cpu = cpu_pair[1].model._make_plan({"input_ids": ids.cpu(), "attention_mask": mask.cpu()})
    on_cuda = cuda_pair[1].model._make_plan({"input_ids": ids, "attention_mask": mask})
    cpu_tensors, cuda_tensors = plan_tensors(on_cpu), plan_tensors(on_cuda)
    assert len(cpu_tensors) == len(cuda_tensors) > 5
    for expected, got in zip(cpu_tensors, cuda_tensors, strict=True):
        assert got.device.type == CUDA and got.dtype == expected.dtype
        assert torch.equal(got.cpu(), expected)


def test_starting_a_plan_does_not_wait_for_the_device(cpu_pair, cuda_pair):
    """A forward starts its plan (the masks' copy to the host) without a host-device synchronisation, so the host
    goes on queueing work; the plan built later equals the one built from host-side inputs."""
    ids, mask, _ = inputs_for(["one image", "two images", "no image"])
    core = cuda_pair[1].model
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a synchronising CUDA call raises
    try:
        pending = core._pending_plan({"input_ids": ids, "attention_mask": mask})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    from_host = core._make_plan({"input_ids": ids.cpu(), "attention_mask": mask.cpu()}, device=CUDA)
    for expected, got in zip(plan_tensors(from_host), plan_tensors(pending.get()), strict=True):
        assert got.device.type == CUDA and torch.equal(got, expected)


def test_padded_batch_and_generation_on_cuda(cpu_pair, cuda_pair):
    ids, mask, pixels = inputs_for(["one image", "two images", "no image"])
    with torch.no_grad():
        on_cuda = cuda_pair[1](input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        on_cpu = cpu_pair[1](input_ids=ids.cpu(), attention_mask=mask.cpu(), pixel_values=pixels.cpu()).logits
    real = mask.bool().cpu()
    torch.testing.assert_close(on_cuda.cpu()[real], on_cpu[real], atol=1e-4, rtol=1e-3)
    cached = cuda_pair[1].generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6,
                                   min_new_tokens=6, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(cuda_pair[1], ids, mask, pixels, 6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cuda(cpu_pair, dtype):
    source, proxyv = (copy.deepcopy(m).to(CUDA, dtype) for m in cpu_pair)
    ids, mask, pixels = inputs_for(["one image", "two images"])
    with torch.no_grad():
        expected = source(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(dtype)).logits
        with proxyv.proxyv_disabled():
            off = proxyv(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(dtype)).logits
        low = proxyv(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(dtype)).logits.float()
        full = cpu_pair[1](input_ids=ids.cpu(), attention_mask=mask.cpu(), pixel_values=pixels.cpu()).logits
    assert torch.equal(off, expected)
    real = mask.bool().cpu()
    error = (low.cpu()[real] - full[real]).norm() / full[real].norm()
    assert error < 3e-2, f"relative error {error:.4f} against float32"


def test_compiled_language_model_matches_eager_on_cuda(cuda_pair):
    """The documented way to use CUDA graphs: compile the language model with mode="reduce-overhead"."""
    proxyv = copy.deepcopy(cuda_pair[1])
    runner = Runner(proxyv, synthetic_inputs(proxyv, batch=2, images=1, text_tokens=12))
    expected = {on: runner.lm_prefill(on).clone() for on in (False, True)}
    proxyv.model.language_model = torch.compile(proxyv.model.language_model, mode="reduce-overhead")
    compiled = Runner(proxyv, synthetic_inputs(proxyv, batch=2, images=1, text_tokens=12))
    for _ in range(3):  # compile, record the graph, replay it
        outs = {on: compiled.lm_prefill(on).clone() for on in (False, True)}
    for on in (False, True):
        torch.testing.assert_close(outs[on], expected[on], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("split", [True, False], ids=["two graphs", "one graph"])
def test_cuda_graph_replays_a_new_prompt(cuda_pair, split):
    """`bench --cuda-graph` captures one prompt and replays after copying a new prompt's plan (by default between
    two graphs cut before the start layer, built while the first runs): a prompt with its image elsewhere must give
    what eager gives for it."""
    proxyv = cuda_pair[1]
    runner = Runner(proxyv, synthetic_inputs(proxyv, batch=2, images=1, text_tokens=16))
    replay = runner.cuda_graph_prefill(True, split=split)
    assert len(replay.graphs) == (2 if split else 1)
    torch.testing.assert_close(replay().clone(), runner.lm_prefill(True), atol=1e-5, rtol=1e-4)
    ids = runner.prompt["input_ids"]
    other = Runner(proxyv, dict(runner.prompt, input_ids=torch.cat([ids[:, -6:], ids[:, :-6]], dim=1),
                                pixel_values=runner.inputs["pixel_values"].cpu()))
    expected = other.lm_prefill(True)
    runner.inputs, runner.prompt = other.inputs, other.prompt
    runner.embeds.copy_(other.embeds)
    got = replay()
    assert (got - runner.cuda_graph_prefill(False)()).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_prefill_graphs_by_default_on_cuda(cuda_pair):
    """At batch 1 on CUDA the model captures its language-model prefill in a CUDA graph the second time a shape
    comes and replays it after that, with each prompt's own plan (its image elsewhere), embeddings and cache: the
    eager forward's logits and cache (the layers before the start layer may take another attention kernel in the
    graph), generate's tokens, a next chat turn continuing the cache."""
    from test_downstream import SAME_SHAPE, TURN_TWO, cache_of

    model = copy.deepcopy(cuda_pair[1])
    eager = copy.deepcopy(cuda_pair[1])
    eager.config.proxyv_cuda_graphs = False
    with torch.no_grad():
        for i, prompt in enumerate(SAME_SHAPE):
            ids = torch.tensor([prompt], device=CUDA)
            pixels = pixel_values_for([prompt], seed=i).to(CUDA)
            got = model(input_ids=ids, pixel_values=pixels, use_cache=True)
            expected = eager(input_ids=ids, pixel_values=pixels, use_cache=True)
            torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-3)
            for ours, theirs in zip(cache_of(got).layers, cache_of(expected).layers, strict=True):
                torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-4, rtol=1e-3)
        graphs = model.model._proxyv_graphs
        assert graphs.counts == {"captured": 1, "replayed": 2, "eager": 1}
        ids = torch.tensor([SAME_SHAPE[0]], device=CUDA)
        pixels = pixel_values_for([SAME_SHAPE[0]], seed=7).to(CUDA)

        def chat(side) -> tuple[torch.Tensor, torch.Tensor]:
            cache = DynamicCache(config=side.config.text_config)
            out = side.generate(input_ids=ids, pixel_values=pixels, past_key_values=cache, max_new_tokens=4,
                                do_sample=False, return_dict_in_generate=True)
            conversation = torch.cat([out.sequences, torch.tensor([TURN_TWO], device=CUDA)], dim=1)
            continued = side.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                                      pixel_values=pixel_values_for([SAME_SHAPE[0]], seed=5).to(CUDA),
                                      past_key_values=cache, max_new_tokens=4, do_sample=False)
            return out.sequences, continued

        expected = chat(eager)
        replayed = graphs.counts["replayed"]
        rounds = [chat(model) for _ in range(2)]  # generate's prefill is captured by the second round at the latest
        assert graphs.counts["replayed"] > replayed
    for got in rounds:
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_cli_bench_on_cuda(tmp_path):
    """`proxyv bench --cuda-graph` end to end (the whole-model prefill and decoding run eager in it)."""
    from proxyv_convert.convert import convert

    source = save_tiny_llava(tmp_path / "source")
    convert(str(source), tmp_path / "m", layer=2, progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "proxyv_convert.cli", "bench", str(tmp_path / "m"), "--device", "cuda",
         "--batch-sizes", "1", "--batch-sizes", "2", "--repeats", "3", "--warmup", "2", "--cuda-graph"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "m" / "bench_report.json").read_text())
    assert report["mode"] == "CUDA graph"
    assert torch.cuda.get_device_name() in report["device"]
    for case in report["cases"]:
        assert 0 < case["flops_ratio"] < 1 and case["lm_prefill_ratio"] > 0 and case["decode_ratio"] > 0
        assert case["peak_memory_mb"]["proxyv"] > 0


def test_bench_refuses_two_modes(cuda_pair):
    from proxyv_convert.errors import ProxyVError

    with pytest.raises(ProxyVError, match="choose one"):
        bench(cuda_pair[1], compile=True, cuda_graph=True)
