"""ProxyV served by vLLM (its CPU build) through proxyv's plugin: the same greedy tokens and log-probabilities as the
transformers ProxyV model, the original model's with ProxyV off, and the scheduling the plugin decides."""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ENGINE, image
from transformers import AutoModelForImageTextToText, AutoProcessor

pytestmark = pytest.mark.slow

MAX_TOKENS = 6
TEXT = "what is the colour of the circle"


def requests(family: str) -> list[dict]:
    """One image, text only, two images, an image first: all in one batch (one prefill step, then mixed decoding)."""
    sizes = [(96, 96), (96, 96), (96, 96), (96, 96)] if family == "llava" else [(40, 72), (64, 64), (72, 40), (30, 90)]
    images = [image(seed, 1).resize(size) for seed, size in enumerate(sizes)]
    return [
        {"prompt": f"user : <image> {TEXT} assistant :", "multi_modal_data": {"image": images[0]}},
        {"prompt": f"user : {TEXT} assistant :"},
        {"prompt": "user : <image> left or right <image> which one is blue assistant :",
         "multi_modal_data": {"image": [images[1], images[2]]}},
        {"prompt": "<image> how many red square", "multi_modal_data": {"image": images[3]}},
    ]


@contextlib.contextmanager
def engine(folder, **kwargs):
    from vllm import LLM

    llm = LLM(model=str(folder), **{**ENGINE, **kwargs})
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def vllm_outputs(llm, prompts) -> list[tuple[list[int], list[float]]]:
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=1))
    result = []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        result.append((tokens, [step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)]))
    return result


def transformers_outputs(folder, prompts, *, proxyv_off: bool = False) -> list[tuple[list[int], list[float]]]:
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    result = []
    for request in prompts:
        images = request.get("multi_modal_data", {}).get("image")
        images = None if images is None else images if isinstance(images, list) else [images]
        inputs = processor(text=request["prompt"], images=images, return_tensors="pt")
        off = model.model.proxyv_disabled() if proxyv_off and hasattr(model.model, "proxyv_disabled") else (
            contextlib.nullcontext())
        with torch.no_grad(), off:
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        logprobs = [torch.log_softmax(logits[0].float(), -1)[token].item()
                    for logits, token in zip(out.logits, tokens, strict=True)]
        result.append((tokens, logprobs))
    return result


def assert_same(got, expected, tolerance: float = 2e-3) -> None:
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, expected, strict=True):
        assert tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) < tolerance


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_greedy_tokens_and_logprobs_equal_the_transformers_proxyv_model(folders, family):
    original, converted = folders[family]
    prompts = requests(family)
    with engine(converted) as llm:
        scheduler = llm.llm_engine.vllm_config.scheduler_config
        assert type(llm.llm_engine.model_executor.driver_worker.worker.model_runner.model).__name__.startswith("ProxyV")
        served = vllm_outputs(llm, prompts)
    assert not scheduler.enable_chunked_prefill
    assert_same(served, transformers_outputs(converted, prompts))
    # ProxyV really ran: the original model's log-probabilities differ on the image prompts.
    original_outputs = transformers_outputs(original, prompts)
    gap = max(abs(a - b) for i in (0, 2, 3) for a, b in zip(served[i][1], original_outputs[i][1], strict=False))
    assert gap > 1e-2


def test_with_proxyv_off_vllm_serves_the_original_model(folders):
    original, converted = folders["llava"]
    prompts = requests("llava")
    with engine(converted, hf_overrides={"proxyv_enabled": False}) as llm:
        served = vllm_outputs(llm, prompts)
        config = llm.llm_engine.vllm_config
        assert config.scheduler_config.enable_chunked_prefill  # vLLM's own defaults stay
        assert config.cache_config.enable_prefix_caching
    assert_same(served, transformers_outputs(original, prompts))


def test_prompts_longer_than_the_token_budget_and_repeated_prompts(folders):
    """The plugin's decision: a prompt's text and images are prefilled in one step (chunked prefill off, the token
    budget raised to the longest prompt) and nothing is taken from a prefix cache (prefix caching off), so the
    proxies are always made from the whole prompt. A budget smaller than one image prompt and the same prompts twice
    (the second time a prefix cache would hit) give the transformers model's tokens."""
    _, converted = folders["llava"]
    prompts = requests("llava")
    with engine(converted, max_num_batched_tokens=256, enable_prefix_caching=True) as llm:
        config = llm.llm_engine.vllm_config
        assert not config.scheduler_config.enable_chunked_prefill and config.scheduler_config.disable_chunked_mm_input
        assert not config.cache_config.enable_prefix_caching
        assert config.scheduler_config.max_num_batched_tokens >= config.model_config.max_model_len
        first = vllm_outputs(llm, prompts)
        again = vllm_outputs(llm, prompts[::-1])[::-1]
    expected = transformers_outputs(converted, prompts)
    assert_same(first, expected)
    assert_same(again, expected)


def test_vllm_transformers_backend_is_refused_with_the_way_out(folders):
    """Forced onto vLLM's Transformers backend (the images merged into `inputs_embeds`, prompts packed), the ProxyV
    model's own code refuses instead of computing the original model. In a process of its own: that backend changes
    transformers' classes in the process that runs it."""
    _, converted = folders["llava"]
    script = (
        "from PIL import Image\n"
        "from vllm import LLM, SamplingParams\n"
        f"llm = LLM(model={str(converted)!r}, model_impl='transformers', trust_remote_code=True, **{ENGINE!r})\n"
        "picture = Image.new('RGB', (96, 96))\n"
        "request = {'prompt': 'user : <image> red assistant :', 'multi_modal_data': {'image': picture}}\n"
        "llm.generate([request], SamplingParams(temperature=0, max_tokens=2))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "cannot find images merged into inputs_embeds" in run.stdout + run.stderr, run.stderr[-3000:]


def test_vllm_serve_answers_a_chat_request_with_an_image(folders, tmp_path):
    _, converted = folders["llava"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).with_name("vllm")), "serve", str(converted), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
               "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]), "--served-model-name", "m"]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vllm serve did not start"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        picture = image(7).resize((96, 96))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {"model": "m", "temperature": 0, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": TEXT}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())["choices"][0]["message"]["content"]
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert "ProxyV prefills each prompt in one step" in (tmp_path / "serve.log").read_text()
    # The same chat through the transformers ProxyV model.
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}], add_generation_prompt=True)
    tokens, _ = transformers_outputs(converted, [{"prompt": prompt, "multi_modal_data": {"image": picture}}])[0]
    assert answer.strip() == processor.decode(tokens, skip_special_tokens=True).strip()
    assert answer.strip()
