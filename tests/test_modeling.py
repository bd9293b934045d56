"""The ProxyV model: semantics, ProxyV-off exactness, the inputs users send, caching, dtypes, attention backends."""

from __future__ import annotations

import pytest
import torch
from proxyv_reference import reference_logits
from tiny_models import IMAGE_TOKEN_ID, image_prompt, tiny_llava, tiny_llava_config

from proxyv_convert.remote.configuration_proxyv import ProxyVLlavaConfig
from proxyv_convert.remote.modeling_proxyv import ProxyVLlavaForConditionalGeneration, ProxyVLlavaModel, to_device

GRID = 24
PAD = 0


def convert_in_memory(source, start_layer: int = 2, factor: int = 4, randomize: bool = True, attn: str = "sdpa"):
    """The ProxyV model of `source` (same weights); ProxyV parameters random so that they matter in the tests."""
    config = ProxyVLlavaConfig.from_llava_config(
        source.config, proxyv_start_layer=start_layer, proxyv_reduce_factor=factor
    )
    config._attn_implementation = attn
    model = ProxyVLlavaForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(key.startswith("model.proxyv.") for key in missing)
    if randomize:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.model.proxyv.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 / param.shape[-1] ** 0.5 + (
                    1.0 if param.dim() == 1 and param.shape[0] == config.text_config.hidden_size else 0.0))
    return model


def batch(prompts: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        cols = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[i, cols] = torch.tensor(prompt)
        mask[i, cols] = 1
    return ids, mask


def images(n: int, seed: int = 0, size: int = GRID * 4) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def n_images(prompt: list[int]) -> int:
    return sum(t == IMAGE_TOKEN_ID for t in prompt) // (GRID * GRID)


PROMPTS = {
    "one image": image_prompt(["user :", None, "what is the colour of the circle assistant :"]),
    "image first": image_prompt([None, "how many red square"]),
    "two images": image_prompt(["user :", None, "left or right", None, "which one is blue assistant :"]),
    "image last": image_prompt(["user : what is in cell one two", None]),
    "no image": image_prompt(["user : what is the colour of the circle assistant : red"]),
}


@pytest.fixture(scope="module")
def source():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def proxyv(source):
    return convert_in_memory(source)


def pixel_values_for(prompts: list[list[int]], seed: int = 0) -> torch.Tensor | None:
    count = sum(n_images(p) for p in prompts)
    return images(count, seed) if count else None


# --- semantics -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["one image", "image first", "two images", "image last"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_naive_reference(source, name, attn):
    model = convert_in_memory(source, attn=attn)
    prompt = torch.tensor(PROMPTS[name])
    pixels = pixel_values_for([PROMPTS[name]])
    with torch.no_grad():
        logits = model(input_ids=prompt[None], pixel_values=pixels).logits[0]
    expected = reference_logits(model, prompt, pixels)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
    with model.proxyv_disabled(), torch.no_grad():
        original = model(input_ids=prompt[None], pixel_values=pixels).logits[0]
    assert (original - logits).abs().max() > 1e-2, "ProxyV must change the computation after the start layer"


@pytest.mark.parametrize("start_layer,factor", [(0, 4), (3, 2), (1, 8), (2, 24)])
def test_reference_other_start_layers_and_factors(source, start_layer, factor):
    model = convert_in_memory(source, start_layer=start_layer, factor=factor)
    prompt = torch.tensor(PROMPTS["two images"])
    pixels = pixel_values_for([PROMPTS["two images"]])
    with torch.no_grad():
        logits = model(input_ids=prompt[None], pixel_values=pixels).logits[0]
    torch.testing.assert_close(logits, reference_logits(model, prompt, pixels), atol=2e-5, rtol=1e-4)


def test_layers_before_start_are_untouched(source, proxyv):
    prompt = PROMPTS["one image"]
    pixels = pixel_values_for([prompt])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ours = proxyv(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states
        theirs = source(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states
    start = proxyv.config.proxyv_start_layer
    assert len(ours) == len(theirs)
    for i in range(start + 1):
        assert torch.equal(ours[i], theirs[i]), f"hidden state {i} differs"
    assert all(h.shape == theirs[0].shape for h in ours), "proxies never appear in the hidden states"
    assert not torch.allclose(ours[start + 1], theirs[start + 1])


def test_fresh_conversion_passes_vision_states_through(source):
    """With the VisionMLP output at zero, full vision states stay at their start-layer values."""
    model = convert_in_memory(source, randomize=False)
    prompt = PROMPTS["one image"]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hidden = model(input_ids=ids, pixel_values=pixel_values_for([prompt]), output_hidden_states=True).hidden_states
    vision = ids[0] == IMAGE_TOKEN_ID
    start = model.config.proxyv_start_layer
    for i in range(start + 1, model.config.text_config.num_hidden_layers):
        assert torch.equal(hidden[i][0, vision], hidden[start][0, vision])
    assert not torch.equal(hidden[start + 1][0, ~vision], hidden[start][0, ~vision])


@pytest.mark.parametrize("grad", [False, True], ids=["fused projections", "separate projections"])
def test_vision_tokens_get_no_query_and_no_ffn(proxyv, grad):
    """Only text tokens and proxies go through q_proj and the FFN of a ProxyV layer; keys/values run on every row
    (without gradients through one fused key/value product, with them through k_proj and v_proj)."""
    rows = {}
    layers = proxyv.model.language_model.layers
    start = proxyv.config.proxyv_start_layer
    modules = [("q", layers[start].self_attn.q_proj), ("ffn", layers[start].mlp.down_proj)]
    if grad:
        modules += [("k", layers[start].self_attn.k_proj), ("gate", layers[start].mlp.gate_proj)]
    hooks = [
        module.register_forward_hook(lambda m, args, out, key=key: rows.__setitem__(key, args[0].shape[:-1].numel()))
        for key, module in modules
    ]
    prompt = PROMPTS["one image"]
    proxyv.fuse_projections(not grad)  # with gradients the separate layers run even where the weights are fused
    try:
        with torch.set_grad_enabled(grad):
            proxyv(input_ids=torch.tensor([prompt]), pixel_values=pixel_values_for([prompt]))
    finally:
        proxyv.fuse_projections(False)
        for hook in hooks:
            hook.remove()
    text = len(prompt) - GRID * GRID
    proxies = (GRID // 4) ** 2
    assert rows["q"] == rows["ffn"] == text + proxies
    if grad:
        assert rows["k"] == len(prompt) + proxies and rows["gate"] == text + proxies
    else:  # one product for k and v (and for gate and up): the separate layers are not called
        assert set(rows) == {"q", "ffn"}


def test_fused_projections_share_memory_and_change_no_result(source):
    """fuse_projections() lays each ProxyV layer's k/v and gate/up weights out in one tensor (the parameters become
    views of it: nothing is stored twice); the products use it where no gradient needs the weights; the results, the
    weights and ProxyV off stay as they were; moving the model lays them out again; a weight replaced afterwards is
    the one used. Left to itself, the model fuses on CUDA only (tests/test_cuda.py), so on CPU it stays separate."""
    model = convert_in_memory(source)
    start = model.config.proxyv_start_layer
    layers = model.model.language_model.layers
    prompts = [PROMPTS["one image"], PROMPTS["two images"]]
    ids, mask = batch(prompts)
    pixels = pixel_values_for(prompts)

    def logits(grad: bool = False, dtype=torch.float32) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return model(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(dtype)).logits.detach()

    def shared(first, second) -> bool:
        return first.weight.untyped_storage().data_ptr() == second.weight.untyped_storage().data_ptr()

    weights = {name: value.clone() for name, value in model.state_dict().items()}
    with model.proxyv_disabled(), torch.no_grad():
        off = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    separate = logits(grad=True)  # the weights require gradients: k_proj, v_proj, gate_proj, up_proj one by one
    assert torch.equal(logits(), separate)  # on CPU the first ProxyV forward keeps the products separate
    assert not any(shared(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in layers)
    model.fuse_projections()
    fused = logits()
    for i, layer in enumerate(layers):
        assert shared(layer.self_attn.k_proj, layer.self_attn.v_proj) == (i >= start)
        assert shared(layer.mlp.gate_proj, layer.mlp.up_proj) == (i >= start)
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    torch.testing.assert_close(fused, separate)
    with model.proxyv_disabled(), torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, off)

    model.to(torch.float64)  # new parameter tensors: laid out again
    assert all(shared(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in layers[start:])
    assert layers[start].self_attn.k_proj.weight.dtype == torch.float64
    torch.testing.assert_close(logits(dtype=torch.float64).float(), separate, atol=1e-4, rtol=1e-4)

    model.fuse_projections(False)  # separate tensors again, and the forward leaves them so
    assert not any(shared(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in layers)
    torch.testing.assert_close(logits(dtype=torch.float64).float(), separate, atol=1e-4, rtol=1e-4)
    assert not any(shared(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in layers)

    model.fuse_projections()
    attn = layers[start].self_attn
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach() * 2)
    replaced = logits(dtype=torch.float64)
    assert not torch.allclose(replaced.float(), separate, atol=1e-3)
    torch.testing.assert_close(replaced, logits(grad=True, dtype=torch.float64))


def test_a_model_with_fused_projections_saves_and_loads(source, tmp_path):
    """Parameters that are views of one fused tensor are saved as the ordinary separate tensors."""
    model = convert_in_memory(source)
    model.fuse_projections()
    model.save_pretrained(tmp_path)
    loaded = ProxyVLlavaForConditionalGeneration.from_pretrained(tmp_path)
    saved, again = model.state_dict(), loaded.state_dict()
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[name], again[name]) for name in saved)


# --- ProxyV off is the original model, bit for bit -----------------------------------------------------------------

BATCHES = {
    "single": (["one image"], "left"),
    "left padding": (["one image", "two images", "image first"], "left"),
    "right padding": (["image last", "one image", "two images"], "right"),
    "mixed with text-only": (["no image", "one image", "two images"], "left"),
    "images anywhere": (["image first", "image last"], "right"),
}


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_off_is_bit_exact(name, attn):
    source = tiny_llava(seed=0)
    source.config._attn_implementation = attn
    source.model.language_model.config._attn_implementation = attn
    model = convert_in_memory(source, attn=attn)
    keys, side = BATCHES[name]
    prompts = [PROMPTS[k] for k in keys]
    ids, mask = batch(prompts, side)
    pixels = pixel_values_for(prompts)
    with torch.no_grad():
        expected = source(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True)
        with model.proxyv_disabled():
            got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True)
    assert torch.equal(got.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, expected.hidden_states, strict=True))


def test_off_by_config_flag(source):
    model = convert_in_memory(source)
    model.config.proxyv_enabled = False
    prompt = PROMPTS["two images"]
    ids, pixels = torch.tensor([prompt]), pixel_values_for([prompt])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits,
                           source(input_ids=ids, pixel_values=pixels).logits)


def test_off_generation_is_identical(source, proxyv):
    prompts = [PROMPTS["one image"], PROMPTS["two images"]]
    ids, mask = batch(prompts, "left")
    pixels = pixel_values_for(prompts)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    with proxyv.proxyv_disabled():
        ours = proxyv.generate(**kwargs)
    assert torch.equal(ours, source.generate(**kwargs))


# --- the inputs users send -----------------------------------------------------------------------------------------

# A prompt alone and inside a padded batch run different matrix shapes, so float32 results agree to rounding only.
BATCH_TOLERANCE = dict(atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in BATCHES if n != "single"])
def test_single_equals_batched(proxyv, name):
    keys, side = BATCHES[name]
    prompts = [PROMPTS[k] for k in keys]
    ids, mask = batch(prompts, side)
    all_pixels = pixel_values_for(prompts)
    with torch.no_grad():
        batched = proxyv(input_ids=ids, attention_mask=mask, pixel_values=all_pixels).logits
    first_image = 0
    for i, prompt in enumerate(prompts):
        count = n_images(prompt)
        pixels = all_pixels[first_image : first_image + count] if count else None
        first_image += count
        with torch.no_grad():
            alone = proxyv(input_ids=torch.tensor([prompt]), pixel_values=pixels).logits[0]
        real = mask[i].bool()
        torch.testing.assert_close(batched[i, real], alone, **BATCH_TOLERANCE)


@pytest.mark.parametrize("name", ["single", "left padding", "mixed with text-only"])
def test_inference_and_gradient_paths_agree(proxyv, name):
    """Without gradients a ProxyV layer writes into its own buffers in place; with them it takes the autograd-safe
    path. Both give the same numbers, and neither writes into the hidden states it is given."""
    keys, side = BATCHES[name]
    prompts = [PROMPTS[k] for k in keys]
    ids, mask = batch(prompts, side)
    pixels = pixel_values_for(prompts)
    given = []  # each layer's input hidden states and a copy made when the layer got them

    def keep(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        given.append((hidden, hidden.clone()))

    hooks = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in proxyv.model.language_model.layers]
    try:
        with torch.no_grad():
            inference = proxyv(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        trained = proxyv(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    finally:
        for hook in hooks:
            hook.remove()
    assert trained.requires_grad and not inference.requires_grad
    assert torch.equal(trained.detach(), inference)
    assert len(given) == 2 * len(proxyv.model.language_model.layers)
    assert all(torch.equal(hidden, copy) for hidden, copy in given), "a layer wrote into its input"
    with torch.no_grad(), proxyv.proxyv_disabled():
        off = proxyv(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert not torch.allclose(off, inference), "ProxyV must be on"


def test_attention_mask_is_made_a_bias_once_per_forward(proxyv, monkeypatch):
    """ProxyV layers give SDPA the plan's masks as additive biases made once per forward (a boolean mask would be
    converted inside every layer), in the states' dtype: one for the text queries over every key, one for the proxy
    queries over the key rows a proxy sees; a second forward with another prompt gets its own."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        if key.shape[-2] != query.shape[-2]:  # a ProxyV layer: queries are the text and proxy slots only
            calls.append((attn_mask, key.shape[-2]))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    proxyv_layers = len(proxyv.model.language_model.layers) - proxyv.config.proxyv_start_layer
    plans, biases = [], []
    original = type(proxyv.model)._pending_plan

    def keep_plan(self, arguments, device=None):
        plans.append(original(self, arguments, device))
        return plans[-1]

    monkeypatch.setattr(type(proxyv.model), "_pending_plan", keep_plan)
    for names in (["one image"], ["two images", "one image"]):
        prompts = [PROMPTS[n] for n in names]
        ids, mask = batch(prompts, "left")
        plans.clear()
        calls.clear()
        with torch.no_grad():
            proxyv(input_ids=ids, attention_mask=mask, pixel_values=pixel_values_for(prompts))
        plan = plans[0].get()
        assert len(calls) == 2 * proxyv_layers
        text_calls, proxy_calls = calls[0::2], calls[1::2]
        for part, allowed, keys in ((text_calls, plan.mask, ids.shape[1] + plan.num_proxies),
                                    (proxy_calls, plan.proxy_mask, len(plan.proxy_columns))):
            assert all(bias is part[0][0] for bias, _ in part), "one bias per forward, shared by the layers"
            assert all(width == keys for _, width in part)
            bias = part[0][0]
            assert bias.dtype == proxyv.dtype and bias.shape == allowed.shape
            assert torch.equal(bias, torch.where(allowed, 0.0, -65504.0).to(bias.dtype))
            biases.append(bias)
        # Proxies attend over the rows that are text (not padding) in some prompt, and the proxies.
        text_rows = mask.bool() & (ids != proxyv.config.image_token_id)
        expected = torch.cat([text_rows.any(0).nonzero().squeeze(1), ids.shape[1] + torch.arange(plan.num_proxies)])
        assert torch.equal(plan.proxy_columns, expected)
    assert biases[0].shape != biases[2].shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_bias_computes_what_the_boolean_mask_computes(proxyv, dtype, monkeypatch):
    import copy

    from proxyv_convert.remote import modeling_proxyv

    model = copy.deepcopy(proxyv).to(dtype)
    prompts = [PROMPTS[n] for n in ["one image", "two images", "no image"]]
    ids, mask = batch(prompts, "left")
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values_for(prompts).to(dtype)}
    with torch.no_grad():
        with_bias = model(**inputs).logits
        attention = modeling_proxyv.proxyv_attention
        monkeypatch.setattr(modeling_proxyv, "proxyv_attention",
                            lambda attn, query, key, value, mask, bias: attention(attn, query, key, value, mask, mask))
        with_mask = model(**inputs).logits
    assert torch.equal(with_bias, with_mask)


def greedy_without_cache(model, ids, mask, pixels, steps: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole sequence at every step (no KV cache)."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=False).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return ids


@pytest.mark.parametrize("names", [["one image"], ["one image", "two images", "no image"]])
def test_generate_with_cache_equals_recompute(proxyv, names):
    prompts = [PROMPTS[n] for n in names]
    ids, mask = batch(prompts, "left")
    pixels = pixel_values_for(prompts)
    cached = proxyv.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8,
                             do_sample=False, min_new_tokens=8)
    assert torch.equal(cached, greedy_without_cache(proxyv, ids, mask, pixels, 8))
    with proxyv.proxyv_disabled():
        original = proxyv.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8,
                                   do_sample=False, min_new_tokens=8)
    assert not torch.equal(cached, original), "random ProxyV weights should change some generated tokens"


def test_decoding_steps_make_no_plan(proxyv, monkeypatch):
    """Only the prefill looks for image tokens (a device-to-host copy); decoding steps go straight to the original
    forward, and give the same tokens as recomputing the whole sequence each step."""
    prompts = [PROMPTS["one image"]]
    ids, mask = batch(prompts)
    pixels = pixel_values_for(prompts)
    core = proxyv.model
    made = []
    monkeypatch.setattr(core, "_pending_plan",
                        lambda arguments: made.append(type(core)._pending_plan(core, arguments)) or made[-1])
    cached = proxyv.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6,
                             do_sample=False, min_new_tokens=6)
    assert len(made) == 1 and made[0].get() is not None
    monkeypatch.undo()
    assert torch.equal(cached, greedy_without_cache(proxyv, ids, mask, pixels, 6))


def test_the_plan_is_built_when_the_start_layer_needs_it(proxyv, monkeypatch):
    """A forward starts copying the masks to the host and goes on with the vision tower and the layers before the
    start layer; the start layer builds the plan (on a GPU the host builds it while the device runs what was queued
    before). A prompt without images builds none."""
    from proxyv_convert.remote import modeling_proxyv

    events = []

    class Recorded(modeling_proxyv.ProxyVPlan):
        def __init__(self, *args, **kwargs):
            events.append("plan")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(modeling_proxyv, "ProxyVPlan", Recorded)
    layers = proxyv.model.language_model.layers
    handles = [layer.register_forward_pre_hook(lambda module, args, i=i: events.append(f"layer {i}"))
               for i, layer in enumerate(layers)]
    handles.append(proxyv.model.vision_tower.register_forward_pre_hook(lambda module, args: events.append("vision")))
    start = proxyv.config.proxyv_start_layer
    try:
        for name, expected in (("one image", ["vision", *(f"layer {i}" for i in range(start + 1)), "plan"]),
                               ("no image", [f"layer {i}" for i in range(start + 1)])):
            events.clear()
            with torch.no_grad():
                proxyv(input_ids=torch.tensor([PROMPTS[name]]), pixel_values=pixel_values_for([PROMPTS[name]]))
            assert events[: len(expected)] == expected, events
            assert events.count("plan") == (name == "one image")
            assert len(events) == len(expected) + len(layers) - start - 1, events
    finally:
        for handle in handles:
            handle.remove()


def test_a_compiled_language_model_gets_its_plan_built(proxyv):
    """With the language model compiled, the forward builds the plan before calling it: the compiled graph takes
    the plan as an input and has no host code in it (fullgraph=True fails on any graph break)."""
    prompt = PROMPTS["one image"]
    kwargs = {"input_ids": torch.tensor([prompt]), "pixel_values": pixel_values_for([prompt]), "use_cache": False}
    core = proxyv.model
    original = core.language_model
    with torch.no_grad():
        expected = proxyv(**kwargs).logits
        torch._dynamo.reset()
        core.language_model = torch.compile(original, backend="eager", fullgraph=True)
        try:
            got = proxyv(**kwargs).logits
        finally:
            core.language_model = original
    torch.testing.assert_close(got, expected)


def test_cache_holds_sequence_not_proxies(proxyv):
    prompt = PROMPTS["two images"]
    with torch.no_grad():
        out = proxyv(input_ids=torch.tensor([prompt]), pixel_values=pixel_values_for([prompt]), use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    for layer in range(proxyv.config.text_config.num_hidden_layers):
        assert cache.layers[layer].keys.shape[-2] == len(prompt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(source, dtype):
    model = convert_in_memory(source)
    prompt = PROMPTS["two images"]
    ids, pixels = torch.tensor([prompt]), pixel_values_for([prompt])
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixels).logits
        model = model.to(dtype)
        low = model(input_ids=ids, pixel_values=pixels.to(dtype)).logits
    assert low.dtype == dtype and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), full, atol=0.15, rtol=0.05)
    generated = model.generate(input_ids=ids, pixel_values=pixels.to(dtype), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3


def test_eager_and_sdpa_agree(source):
    prompts = [PROMPTS["one image"], PROMPTS["two images"]]
    ids, mask = batch(prompts, "left")
    pixels = pixel_values_for(prompts)
    outs = []
    for attn in ("sdpa", "eager"):
        with torch.no_grad():
            outs.append(convert_in_memory(source, attn=attn)(input_ids=ids, attention_mask=mask,
                                                             pixel_values=pixels).logits)
    real = mask.bool()  # padding rows are never read; backends differ there
    torch.testing.assert_close(outs[0][real], outs[1][real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("text,vision", [("mistral", "clip"), ("qwen2", "siglip"), ("llama", "siglip")])
def test_other_backbones_and_towers(text, vision):
    source = tiny_llava(seed=3, text=text, vision=vision)
    model = convert_in_memory(source)
    prompt = torch.tensor(PROMPTS["two images"])
    pixels = pixel_values_for([PROMPTS["two images"]])
    with torch.no_grad():
        logits = model(input_ids=prompt[None], pixel_values=pixels).logits[0]
        with model.proxyv_disabled():
            assert torch.equal(model(input_ids=prompt[None], pixel_values=pixels).logits,
                               source(input_ids=prompt[None], pixel_values=pixels).logits)
    torch.testing.assert_close(logits, reference_logits(model, prompt, pixels), atol=2e-5, rtol=1e-4)


def test_base_model_class(source):
    """`AutoModel` maps to ProxyVLlavaModel: hidden states without the head."""
    model = convert_in_memory(source)
    base = ProxyVLlavaModel(model.config).eval()
    base.load_state_dict(model.model.state_dict())
    prompt = PROMPTS["one image"]
    ids, pixels = torch.tensor([prompt]), pixel_values_for([prompt])
    with torch.no_grad():
        hidden = base(input_ids=ids, pixel_values=pixels).last_hidden_state
        logits = model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(model.lm_head(hidden), logits)


def test_inputs_embeds_path(proxyv):
    prompt = PROMPTS["one image"]
    ids, pixels = torch.tensor([prompt]), pixel_values_for([prompt])
    with torch.no_grad():
        by_ids = proxyv(input_ids=ids, pixel_values=pixels).logits
        embeds = proxyv.get_input_embeddings()(ids)
        by_embeds = proxyv(inputs_embeds=embeds, pixel_values=pixels).logits
    torch.testing.assert_close(by_embeds, by_ids)


def test_return_dict_false(proxyv):
    prompt = PROMPTS["one image"]
    with torch.no_grad():
        out = proxyv(input_ids=torch.tensor([prompt]), pixel_values=pixel_values_for([prompt]), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape[:2] == (1, len(prompt))


# --- training ------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients(source):
    prompt = PROMPTS["two images"]
    ids, pixels = torch.tensor([prompt]), pixel_values_for([prompt])
    grads, calls = [], []
    for checkpointing in (False, True):
        model = convert_in_memory(source).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        model.requires_grad_(False)
        model.model.proxyv.requires_grad_(True)
        last = model.model.language_model.layers[-1].mlp.down_proj
        forward_calls = []
        hook = last.register_forward_hook(lambda *args, seen=forward_calls: seen.append(1))
        model(input_ids=ids, pixel_values=pixels, use_cache=False).logits.pow(2).mean().backward()
        hook.remove()
        calls.append(len(forward_calls))
        grads.append({n: p.grad.clone() for n, p in model.model.proxyv.named_parameters()})
    assert calls == [1, 2], "with checkpointing the ProxyV layer runs again in the backward pass"
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


# --- errors --------------------------------------------------------------------------------------------------------


def test_partial_image_is_refused(proxyv):
    """Image tokens that are not whole images are refused (given as embeddings, which LLaVA passes on as they are;
    token ids without images are ordinary tokens, tests/test_downstream.py)."""
    prompt = PROMPTS["one image"][:100]
    with pytest.raises(ValueError, match="whole images of 576 image tokens"):
        proxyv(inputs_embeds=proxyv.get_input_embeddings()(torch.tensor([prompt])))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(proxyv_start_layer=4), r"start layer 4 is out of range: the model has 4 decoder layers \(0-3\)"),
        (dict(proxyv_start_layer=-1), "out of range"),
        (dict(proxyv_reduce_factor=5), "reduce factor 5 does not divide the 24x24 vision grid; use one of 1, 2, 3, 4"),
        (dict(proxyv_vision_mlp="paper"), "proxyv_vision_mlp"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProxyVLlavaConfig.from_llava_config(tiny_llava_config(), **kwargs)


def test_config_refuses_a_grid_with_a_cls_token():
    config = tiny_llava_config()
    config.vision_feature_select_strategy = "full"  # CLIP's CLS token stays: 577 tokens
    with pytest.raises(ValueError, match="577 tokens per image, which is not a 24x24 grid"):
        ProxyVLlavaConfig.from_llava_config(config, proxyv_start_layer=2)


def test_config_defaults_and_round_trip(tmp_path):
    config = ProxyVLlavaConfig.from_llava_config(tiny_llava_config())
    assert config.proxyv_start_layer == 2 and config.proxyv_reduce_factor == 4
    assert config.proxyv_vision_mlp_size == 32  # H/2 for H < 1024
    assert config.proxyv_learned_proxies == 36  # with --proxy learned: as many as the 6x6 spatial proxies
    config.save_pretrained(tmp_path)
    again = ProxyVLlavaConfig.from_pretrained(tmp_path)
    assert again.model_type == "proxyv_llava"
    assert (again.proxyv_start_layer, again.proxyv_grid) == (2, 24)


def test_plan_tensors_move_to_a_device_packed_by_dtype():
    host = {
        "rows": torch.arange(12).view(3, 4),
        "slots": torch.tensor([5, 6]),
        "valid": torch.tensor([[True, False], [False, True]]),
        "empty": torch.zeros(0, dtype=torch.long),
    }
    assert to_device(host, torch.device("cpu")) is host  # nothing to move
    moved = to_device(host, torch.device("meta"))
    assert set(moved) == set(host)
    for name, tensor in host.items():
        assert moved[name].device.type == "meta"
        assert (moved[name].shape, moved[name].dtype) == (tensor.shape, tensor.dtype)
    # One buffer per dtype: the long tensors are views of one storage, the bool tensor of another.
    packed = moved["rows"]._base
    assert packed is not None and moved["slots"]._base is packed and moved["empty"]._base is packed
    assert moved["valid"]._base is not packed
