"""What a downstream user does with a published ProxyV model besides `generate`: adapters (peft), torch.compile,
multi-turn chat continuing a cache, and the behaviours transformers' own model tests check."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_modeling import PROMPTS, batch, convert_in_memory, images, pixel_values_for
from tiny_models import IMAGE_TOKEN_ID, image_prompt, tiny_llava
from transformers import DynamicCache, GenerationMixin, LlavaModel, LlavaNextModel, StaticCache

from proxyv_convert.remote.modeling_proxyv import (
    ProxyVLlavaForConditionalGeneration,
    ProxyVLlavaModel,
    ProxyVLlavaNextForConditionalGeneration,
    ProxyVLlavaNextModel,
)


@pytest.fixture(scope="module")
def source():
    return tiny_llava(seed=0)


def inputs(names: list[str], side: str = "left") -> dict:
    prompts = [PROMPTS[name] for name in names]
    ids, mask = batch(prompts, side)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values_for(prompts)}


# --- adapters -------------------------------------------------------------------------------------------------------


def lora_model(source, targets: list[str]):
    """A converted model with fused projections (what it does by itself on CUDA), then a LoRA on `targets` whose
    weights are random (a fresh LoRA is the identity)."""
    peft = pytest.importorskip("peft")  # in the `test` extra
    model = convert_in_memory(source)
    model.fuse_projections(True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return wrapped


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["up_proj"]], ids=["q,v", "up"])
def test_lora_computes_the_same_with_fused_and_separate_projections(source, targets):
    """A LoRA wrapping one projection of a fused pair (v of k/v, up of gate/up) changes the ProxyV layers as it
    changes the separate ones: inference, generation and gradients."""
    wrapped = lora_model(source, targets)
    base = wrapped.base_model.model
    batch_inputs = inputs(["one image"])
    with torch.no_grad():
        fused = wrapped(**batch_inputs).logits
        tokens_fused = wrapped.generate(**batch_inputs, max_new_tokens=3, do_sample=False)
    base.fuse_projections(False)
    with torch.no_grad():
        separate = wrapped(**batch_inputs).logits
        tokens_separate = wrapped.generate(**batch_inputs, max_new_tokens=3, do_sample=False)
        with wrapped.disable_adapter():
            plain = wrapped(**batch_inputs).logits
    assert not torch.allclose(separate, plain, atol=1e-2)  # the adapter matters
    torch.testing.assert_close(fused, separate, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens_fused, tokens_separate)

    base.fuse_projections(True)
    wrapped.train()
    wrapped(**batch_inputs).logits.square().mean().backward()
    start = base.config.proxyv_start_layer
    for i, layer in enumerate(base.model.language_model.layers):
        for name in targets:
            module = getattr(layer.self_attn if name.endswith(("q_proj", "v_proj")) else layer.mlp, name)
            grad = module.lora_A["default"].weight.grad
            assert grad is not None and grad.abs().sum() > 0, (i, name, i >= start)


def test_wrapped_projections_are_not_fused(source):
    """Fusing after an adapter wraps a projection leaves that pair separate (no view of a wrapped layer's weight)."""
    wrapped = lora_model(source, ["v_proj"])
    base = wrapped.base_model.model
    base.fuse_projections(False)
    base.fuse_projections(True)
    layer = base.model.language_model.layers[base.config.proxyv_start_layer]
    assert "kv" not in layer._proxyv_fused and "gate_up" in layer._proxyv_fused


# --- torch.compile --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_forward_and_generate_equal_eager(source):
    """`model.forward = torch.compile(model.forward)`: the plan (host-side NumPy) is built outside the graph, the
    ProxyV layers are traced; logits and greedy tokens as in eager mode. The "eager" backend keeps the test short:
    tracing is where the plan broke (a cumulative sum of booleans has no CPU kernel)."""
    model = convert_in_memory(source)
    batch_inputs = inputs(["one image", "no image"])
    with torch.no_grad():
        eager = model(**batch_inputs).logits
        tokens = model.generate(**batch_inputs, max_new_tokens=3, do_sample=False)
        model.forward = torch.compile(model.forward, backend="eager")
        compiled = model(**batch_inputs).logits
        compiled_tokens = model.generate(**batch_inputs, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(compiled_tokens, tokens)


# --- what transformers' model tests check ---------------------------------------------------------------------------

HEADS = [ProxyVLlavaForConditionalGeneration, ProxyVLlavaNextForConditionalGeneration]
BASES = [(ProxyVLlavaModel, LlavaModel), (ProxyVLlavaNextModel, LlavaNextModel)]


@pytest.mark.parametrize(("proxyv_class", "original"), BASES, ids=lambda c: c.__name__)
def test_the_forward_shows_the_backbones_signature(proxyv_class, original):
    """Signature-driven tools (transformers' `main_input_name` check, generate's argument filtering) see the
    original forward's parameters, not (*args, **kwargs)."""
    parameters = list(inspect.signature(proxyv_class.forward).parameters)
    assert parameters == list(inspect.signature(original.forward).parameters)
    assert parameters[1] == proxyv_class.main_input_name == "input_ids"


@pytest.mark.parametrize("head", HEADS, ids=lambda c: c.__name__)
def test_generation_mixin_is_a_direct_base(head):
    assert GenerationMixin in head.__bases__
    assert head.can_generate()


@pytest.mark.parametrize("model_class", HEADS + [base for base, _ in BASES], ids=lambda c: c.__name__)
def test_no_full_graph_is_promised(model_class):
    """generate compiles the forward with fullgraph=True where a class says it can; the ProxyV forward builds its
    plan on the host and reads the cache's length, so it says it cannot."""
    assert model_class._can_compile_fullgraph is False


@pytest.mark.skipif("mm_encoder_outputs" not in inspect.signature(LlavaModel.forward).parameters,
                    reason="this transformers selects no hidden states by layer and takes no encoded images")
def test_hidden_states_selected_by_layer(source):
    """output_hidden_states=[i, j] gives those layers' states (None elsewhere, as the original), without proxies.
    The image comes as encoded features: LLaVA's own vision tower does not take a layer selection here."""
    model = convert_in_memory(source)
    batch_inputs = inputs(["one image"])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch_inputs.pop("pixel_values"))
        encoded = {"image": features}
        every = model(**batch_inputs, mm_encoder_outputs=encoded, output_hidden_states=True).hidden_states
        selected = model(**batch_inputs, mm_encoder_outputs=encoded, output_hidden_states=[1, -1]).hidden_states
    assert len(selected) == len(every)
    for i, state in enumerate(selected):
        if i in (1, len(every) - 1):
            assert torch.equal(state, every[i]) and state.shape[1] == batch_inputs["input_ids"].shape[1]
        else:
            assert state is None


def test_eager_attention_with_a_static_cache(source):
    """generate with a static cache hands the eager model a 4-D mask; ProxyV reads the padding from it."""
    model = convert_in_memory(source, attn="eager")
    batch_inputs = inputs(["one image", "image first"])
    with torch.no_grad():
        dynamic = model.generate(**batch_inputs, max_new_tokens=4, do_sample=False)
        static = model.generate(**batch_inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_image_tokens_without_images_are_ordinary_tokens(source):
    """Image-token ids with no pixel values (or encoded images) are embedded as any token, as LLaVA does: the
    forward is the original one, whatever their number."""
    model = convert_in_memory(source)
    ids = torch.tensor([PROMPTS["one image"], PROMPTS["one image"][:-10] + [IMAGE_TOKEN_ID] * 10])
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with model.proxyv_disabled():
            off = model(input_ids=ids).logits
        original = source(input_ids=ids).logits
    assert torch.equal(on, off) and torch.equal(off, original)


# --- a chat's next turn with an image, continuing the cache ---------------------------------------------------------

TURN_TWO = image_prompt(["user :", None, "which one is blue assistant :"])[1:]  # no BOS: it continues a sequence


@pytest.mark.parametrize(("attn", "static"), [("sdpa", False), ("eager", True)], ids=["sdpa dynamic", "eager static"])
def test_a_turn_with_an_image_continuing_the_cache_equals_the_whole_conversation(source, attn, static):
    """Turn two's image is prefilled with ProxyV over the cached turn one (padded prompts, images in both turns):
    the same logits as the whole conversation in one call, and the cache still holds no proxies."""
    model = convert_in_memory(source, attn=attn)
    first = inputs(["one image", "image first"])
    second = torch.tensor([TURN_TWO] * 2)
    pixels = images(2, seed=5)
    whole_mask = torch.cat([first["attention_mask"], torch.ones_like(second)], dim=1)
    with torch.no_grad():
        in_order = torch.stack([first["pixel_values"], pixels], dim=1).flatten(0, 1)  # each sample's images in turn
        whole = model(input_ids=torch.cat([first["input_ids"], second], dim=1), attention_mask=whole_mask,
                      pixel_values=in_order).logits
        text_config = model.config.text_config
        cache = StaticCache(config=text_config, max_cache_len=1400) if static else DynamicCache(config=text_config)
        model(**first, past_key_values=cache, use_cache=True)
        turn = model(input_ids=second, attention_mask=whole_mask, pixel_values=pixels, past_key_values=cache,
                     use_cache=True).logits
    torch.testing.assert_close(turn, whole[:, -second.shape[1] :], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == whole_mask.shape[1]


@pytest.mark.parametrize(("attn", "static"), [("sdpa", False), ("eager", True)], ids=["sdpa dynamic", "eager static"])
def test_chat_generation_continuing_the_cache(source, attn, static):
    """A chat front-end's second turn: generate with the first turn's cache, the whole conversation's ids and only
    the new image; the answer equals that of generating from the whole conversation at once. (With eager attention
    and a static cache, generate hands the model 4-D masks.)"""
    model = convert_in_memory(source, attn=attn)
    first = inputs(["one image"])
    text_config = model.config.text_config
    cache = StaticCache(config=text_config, max_cache_len=1300) if static else DynamicCache(config=text_config)
    with torch.no_grad():
        out = model.generate(**first, past_key_values=cache, max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
        conversation = torch.cat([out.sequences, torch.tensor([TURN_TWO])], dim=1)
        pixels = images(1, seed=5)
        continued = model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                                   pixel_values=pixels, past_key_values=cache, max_new_tokens=4, do_sample=False)
        at_once = model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                                 pixel_values=torch.cat([first["pixel_values"], pixels]), max_new_tokens=4,
                                 do_sample=False)
    assert torch.equal(continued, at_once)


def test_llava_next_turn_continuing_the_cache():
    """The same for LLaVA-NeXT (AnyRes grids with newline tokens, image sizes per turn)."""
    from test_llava_next import converted, image
    from tiny_models import tiny_llava_next, tiny_next_processor

    source = tiny_llava_next(seed=4)
    model, processor = converted(source), tiny_next_processor(source.config)
    first_text, second_text = "user : <image> what is the colour", " user : <image> which one"
    first = processor(images=[image("wide")], text=[first_text], return_tensors="pt")
    whole = processor(images=[image("wide"), image("tall")], text=[first_text + second_text], return_tensors="pt")
    second = processor(images=[image("tall")], text=[second_text], return_tensors="pt")
    length = first["input_ids"].shape[1]
    with torch.no_grad():
        at_once = model(**whole).logits[:, length:]
        cache = DynamicCache(config=model.config.text_config)
        model(**first, past_key_values=cache, use_cache=True)
        turn = model(input_ids=whole["input_ids"][:, length:], attention_mask=whole["attention_mask"],
                     pixel_values=second["pixel_values"], image_sizes=second["image_sizes"], past_key_values=cache,
                     use_cache=True).logits
    torch.testing.assert_close(turn, at_once, atol=1e-5, rtol=1e-5)
