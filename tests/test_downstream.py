"""What a downstream user does with a published ProxyV model besides `generate`: adapters (peft), torch.compile,
multi-turn chat continuing a cache, and the behaviours transformers' own model tests check."""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
from proxyv_reference import reference_logits
from test_modeling import PROMPTS, batch, convert_in_memory, images, pixel_values_for
from tiny_models import IMAGE_TOKEN_ID, image_prompt, tiny_llava
from transformers import (
    DynamicCache,
    GenerationMixin,
    LlavaModel,
    LlavaNextModel,
    LlavaNextVideoModel,
    LlavaOnevisionModel,
    StaticCache,
)

from proxyv_convert.families import FAMILIES
from proxyv_convert.remote.modeling_proxyv import (
    ProxyVLlavaModel,
    ProxyVLlavaNextModel,
    ProxyVLlavaNextVideoModel,
    ProxyVLlavaOnevisionModel,
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

HEADS = [family.head for family in FAMILIES.values()]  # every family's generation head
BASES = [(ProxyVLlavaModel, LlavaModel), (ProxyVLlavaNextModel, LlavaNextModel),
         (ProxyVLlavaOnevisionModel, LlavaOnevisionModel), (ProxyVLlavaNextVideoModel, LlavaNextVideoModel)]


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


# --- attention weights with ProxyV on -------------------------------------------------------------------------------


def eager_original(source):
    original = copy.deepcopy(source)
    original.set_attn_implementation("eager")
    return original


def check_proxyv_rows(weights: torch.Tensor, expected: torch.Tensor, vision: torch.Tensor) -> None:
    """weights (heads, T, keys) of a ProxyV layer: text rows as `expected` (heads, T, T) and summing to 1, vision rows
    zero (`vision`: (T,) which rows are full vision tokens)."""
    text = ~vision
    torch.testing.assert_close(weights[:, text, : expected.shape[-1]], expected[:, text], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights[:, text].sum(-1), torch.ones_like(weights[:, text, 0]))
    assert weights[:, vision].abs().max() == 0
    assert weights[:, text][..., vision].sum() > 0.05 * weights[:, text].sum()  # text attends to vision tokens


def test_output_attentions_with_proxyv_on(source):
    """Eager attention, ProxyV on: every layer's weights (batch, heads, T, T) over the sequence (no proxies). Before
    the start layer they are the original layers'; from it on, the text queries' rows are the ProxyV attention over
    text and full vision tokens as the naive reference computes it, and full vision tokens' rows (no query there) are
    zeros. ProxyV off gives the original model's weights exactly; the logits do not change."""
    model = convert_in_memory(source, attn="eager")
    name = "two images"
    prompt = torch.tensor(PROMPTS[name])
    pixels = pixel_values_for([PROMPTS[name]])
    with torch.no_grad():
        out = model(input_ids=prompt[None], pixel_values=pixels, output_attentions=True)
        logits = model(input_ids=prompt[None], pixel_values=pixels).logits
        with model.proxyv_disabled():
            off = model(input_ids=prompt[None], pixel_values=pixels, output_attentions=True).attentions
        original = eager_original(source)(input_ids=prompt[None], pixel_values=pixels, output_attentions=True)
    expected: dict = {}
    reference_logits(model, prompt, pixels, attentions=expected)
    start, layers = model.config.proxyv_start_layer, model.config.text_config.num_hidden_layers
    seq, heads = prompt.shape[0], model.config.text_config.num_attention_heads
    assert torch.equal(out.logits, logits)
    assert len(off) == len(original.attentions) == len(out.attentions) == layers
    assert all(torch.equal(a, b) for a, b in zip(off, original.attentions, strict=True))
    assert all(a.shape == (1, heads, seq, seq) for a in out.attentions)
    for i in range(start):
        assert torch.equal(out.attentions[i], off[i])
    vision = prompt == IMAGE_TOKEN_ID
    assert sorted(expected) == list(range(start, layers))
    for i in range(start, layers):
        check_proxyv_rows(out.attentions[i][0], expected[i], vision)
        change = (out.attentions[i][0, :, ~vision] - off[i][0, :, ~vision]).abs().max()
        # the start layer's text queries see what the original layer's see; the layers after it compute other states
        assert change < 1e-5 if i == start else change > 1e-4


def test_output_attentions_of_a_padded_batch_and_generate(source):
    """Left-padded prompts: each prompt's rows and columns are those it gets alone. generate with output_attentions
    and return_dict_in_generate: the same tokens, the prefill step's weights are the forward's, each decoding step's
    the ordinary (batch, heads, 1, keys)."""
    model = convert_in_memory(source, attn="eager")
    names = ["one image", "two images"]
    batch_inputs = inputs(names)
    width = batch_inputs["input_ids"].shape[1]
    with torch.no_grad():
        together = model(**batch_inputs, output_attentions=True).attentions
        for b, (name, pixels) in enumerate(zip(names, batch_inputs["pixel_values"].split([1, 2]), strict=True)):
            alone = model(input_ids=torch.tensor([PROMPTS[name]]), pixel_values=pixels,
                          output_attentions=True).attentions
            real = slice(width - len(PROMPTS[name]), width)
            for ours, theirs in zip(together, alone, strict=True):
                torch.testing.assert_close(ours[b, :, real, real], theirs[0], atol=1e-5, rtol=1e-4)
        plain = model.generate(**batch_inputs, max_new_tokens=3, do_sample=False)
        out = model.generate(**batch_inputs, max_new_tokens=3, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert len(out.attentions) == 3
    for prefill, forward in zip(out.attentions[0], together, strict=True):
        torch.testing.assert_close(prefill, forward)
    for step, layers in enumerate(out.attentions[1:], start=1):
        assert all(a.shape == (2, 4, 1, width + step) for a in layers)


def test_output_attentions_with_sdpa_are_as_the_original(source):
    """SDPA computes no weights, in the original layers or the ProxyV ones: an empty tuple, as the original model."""
    model = convert_in_memory(source)
    batch_inputs = inputs(["one image"])
    with torch.no_grad():
        on = model(**batch_inputs, output_attentions=True)
        original = source(**batch_inputs, output_attentions=True)
    assert on.attentions == original.attentions == ()
    with torch.no_grad():
        assert torch.equal(on.logits, model(**batch_inputs).logits)


def test_output_attentions_continuing_a_static_cache(source):
    """A turn with an image continuing a static cache (eager): the weights span the cache's rows as the original
    layers' do, and each turn-two row equals that row of the whole conversation run at once (zeros past it)."""
    model = convert_in_memory(source, attn="eager")
    first = inputs(["one image"])
    second = torch.tensor([TURN_TWO])
    pixels = images(1, seed=5)
    whole_ids = torch.cat([first["input_ids"], second], dim=1)
    whole_mask = torch.ones_like(whole_ids)
    total, rows = whole_ids.shape[1], 1400
    with torch.no_grad():
        whole = model(input_ids=whole_ids, attention_mask=whole_mask,
                      pixel_values=torch.cat([first["pixel_values"], pixels]), output_attentions=True).attentions
        cache = StaticCache(config=model.config.text_config, max_cache_len=rows)
        model(**first, past_key_values=cache, use_cache=True)
        turn = model(input_ids=second, attention_mask=whole_mask, pixel_values=pixels, past_key_values=cache,
                     use_cache=True, output_attentions=True).attentions
    assert len(turn) == len(whole)
    for ours, theirs in zip(turn, whole, strict=True):
        assert ours.shape == (1, 4, second.shape[1], rows)
        torch.testing.assert_close(ours[..., :total], theirs[:, :, -second.shape[1] :], atol=1e-5, rtol=1e-4)
        assert ours[..., total:].abs().max() == 0


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


# --- fast by default: the prefill replayed from a captured graph ----------------------------------------------------
# No CUDA here: a stand-in captures as a CUDA graph does, on the CPU, and drives the model's own graph cache.

SAME_SHAPE = [PROMPTS["one image"], image_prompt(["user : what is", None, "the colour of the circle assistant :"]),
              image_prompt(["user : what is the colour", None, "of the circle assistant :"])]


class StandInGraph:
    """Captures as a CUDA graph does: the function runs once and its output tensors are kept; a replay runs it again
    and writes its results into those tensors (a graph writes the tensors it captured). Whatever the model forgets to
    copy into the captured inputs or out of the captured outputs shows in its results."""

    def __init__(self, fail: bool = False):
        self.captured = self.replayed = 0
        self.fail = fail

    def __call__(self, fn):
        from torch.utils._pytree import tree_leaves

        self.captured += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        outputs = fn()
        stand_in = self

        class Graph:
            def replay(self):
                stand_in.replayed += 1
                for target, value in zip(tree_leaves(outputs), tree_leaves(fn()), strict=True):
                    target.copy_(value)

        return Graph(), outputs


def with_graphs(source, stand_in: StandInGraph | None = None, **settings):
    """A converted model whose prefill graphs capture with `stand_in` on the CPU, and the same model without."""
    from proxyv_convert.remote.modeling_proxyv import ProxyVPrefillGraphs

    model, reference = convert_in_memory(source), convert_in_memory(source)
    stand_in = stand_in or StandInGraph()
    model.model._proxyv_graphs = ProxyVPrefillGraphs(capture=stand_in, devices=("cpu",), **settings)
    return model, reference, stand_in


def cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values


def one(prompt: list[int], seed: int = 0, **extra) -> dict:
    return {"input_ids": torch.tensor([prompt]), "pixel_values": pixel_values_for([prompt], seed=seed), **extra}


def test_prefill_graph_replays_equal_the_eager_forward(source):
    """A prompt shape is captured the second time it is seen and replayed after that, with each new prompt's plan
    (images elsewhere), embeddings and pixels: logits and cache as the eager forward's, and a call's results are its
    own (a later replay does not write over them)."""
    model, reference, stand_in = with_graphs(source)
    kept = []
    with torch.no_grad():
        for i, prompt in enumerate(SAME_SHAPE + SAME_SHAPE[:1]):
            inputs_i = one(prompt, seed=i, use_cache=True)
            got, expected = model(**inputs_i), reference(**inputs_i)
            assert torch.equal(got.logits, expected.logits), i
            ours, theirs = cache_of(got), cache_of(expected)
            assert ours.get_seq_length() == theirs.get_seq_length() == len(prompt)
            for a, b in zip(ours.layers, theirs.layers, strict=True):
                assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            kept.append((got.logits, got.logits.clone(), ours.layers[-1].keys, ours.layers[-1].keys.clone()))
    assert all(torch.equal(a, b) and torch.equal(c, d) for a, b, c, d in kept)
    graphs = model.model._proxyv_graphs
    assert (stand_in.captured, stand_in.replayed) == (1, 3)
    assert graphs.counts == {"captured": 1, "replayed": 3, "eager": 1}


def test_generate_and_the_next_chat_turn_with_prefill_graphs(source):
    """generate at batch 1 replays the prefill (decoding stays the ordinary path) and gives the eager model's tokens;
    a next turn with an image continues the cache a replayed prefill filled (the proxies' keys beside it)."""
    model, reference, stand_in = with_graphs(source)
    first = inputs(["one image"])
    with torch.no_grad():
        for side in (model, reference):
            side.generate(**first, max_new_tokens=2, do_sample=False)  # the shape is seen once
        answers = []
        for side in (model, reference):
            cache = DynamicCache(config=side.config.text_config)
            out = side.generate(**first, past_key_values=cache, max_new_tokens=3, do_sample=False,
                                return_dict_in_generate=True)
            conversation = torch.cat([out.sequences, torch.tensor([TURN_TWO])], dim=1)
            continued = side.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                                      pixel_values=images(1, seed=5), past_key_values=cache, max_new_tokens=4,
                                      do_sample=False)
            answers.append((out.sequences, continued))
    assert torch.equal(answers[0][0], answers[1][0]) and torch.equal(answers[0][1], answers[1][1])
    assert stand_in.captured == 1 and stand_in.replayed == 1  # the first turn's prefill; the second continues a cache


def _two_prompts(model):
    return model(**inputs(["one image", "two images"])).logits


def _gradients(model):
    with torch.enable_grad():
        return model(**one(PROMPTS["one image"])).logits.detach()


def _padding(model):
    prompt = PROMPTS["one image"]
    ids = torch.tensor([[0] + prompt])
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    return model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values_for([prompt])).logits


def _text_only(model):
    return model(input_ids=torch.tensor([PROMPTS["no image"]])).logits


def _static_cache(model):
    cache = StaticCache(config=model.config.text_config, max_cache_len=700)
    return model(**one(PROMPTS["one image"]), past_key_values=cache, use_cache=True).logits


def _continuing_a_cache(model):
    cache = DynamicCache(config=model.config.text_config)
    model.config.proxyv_cuda_graphs = False  # the first turn eagerly: the call continuing the cache is in question
    model(**one(PROMPTS["one image"]), past_key_values=cache, use_cache=True)
    model.config.proxyv_cuda_graphs = True
    whole = torch.tensor([PROMPTS["one image"] + TURN_TWO])
    return model(input_ids=whole[:, -len(TURN_TWO):], attention_mask=torch.ones_like(whole),
                 pixel_values=images(1, seed=5), past_key_values=cache, use_cache=True).logits


def _attentions(model):
    return model(**one(PROMPTS["one image"]), output_attentions=True).logits


def _hidden_states(model):
    return model(**one(PROMPTS["one image"]), output_hidden_states=True).logits


def _plain(model):
    return model(**one(PROMPTS["one image"])).logits


class _WrappedLinear(torch.nn.Linear):
    """A projection wrapped by code the graphs do not know (an adapter, a quantized layer): same results."""


def _flag_off(model):
    model.config.proxyv_cuda_graphs = False


def _forward_hook(model):
    model.hook_calls = []
    layer = model.model.language_model.layers[-1]
    layer.mlp.register_forward_hook(lambda module, args, out: model.hook_calls.append(1))


def _foreign_module(model):
    layer = model.model.language_model.layers[-1]
    wrapped = _WrappedLinear(layer.mlp.down_proj.in_features, layer.mlp.down_proj.out_features, bias=False)
    wrapped.weight = layer.mlp.down_proj.weight
    layer.mlp.down_proj = wrapped


FALLBACKS = {  # name: (how the model is set up, the call)
    "batch of two": (None, _two_prompts),
    "gradients": (None, _gradients),
    "padding": (None, _padding),
    "text only": (None, _text_only),
    "static cache": (None, _static_cache),
    "continuing a cache": (None, _continuing_a_cache),
    "output_attentions": (None, _attentions),
    "output_hidden_states": (None, _hidden_states),
    "flag off": (_flag_off, _plain),
    "forward hook": (_forward_hook, _plain),
    "unknown module": (_foreign_module, _plain),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_prefill_graphs_fall_back_to_the_eager_forward(source, case):
    """Where a graph cannot stand in for the forward, the eager forward runs (the same call twice: a shape it would
    capture), with the same results as a model without graphs."""
    setup, call = FALLBACKS[case]
    model, reference, stand_in = with_graphs(source)
    if setup is not None:
        setup(model)
    with torch.no_grad():
        results = [call(model), call(model)]
        expected = call(reference)
    assert all(torch.equal(result, expected) for result in results)
    assert stand_in.captured == 0 and model.model._proxyv_graphs.counts["replayed"] == 0
    if case == "forward hook":
        assert len(model.hook_calls) == 2


def test_llava_next_prefill_graph_replays(source):
    """LLaVA-NeXT (AnyRes grids, newline tokens, image sizes): a prompt of the same layout with other pixels and text
    replays the captured prefill and gives the eager forward's logits."""
    from test_llava_next import converted, image
    from tiny_models import tiny_llava_next, tiny_next_processor

    from proxyv_convert.remote.modeling_proxyv import ProxyVPrefillGraphs

    next_source = tiny_llava_next(seed=4)
    model, reference = converted(next_source), converted(next_source)
    processor = tiny_next_processor(next_source.config)
    stand_in = StandInGraph()
    model.model._proxyv_graphs = ProxyVPrefillGraphs(capture=stand_in, devices=("cpu",), after=1)
    with torch.no_grad():
        for seed, text in enumerate(["user : <image> what is the colour", "user : <image> which one is red"]):
            batch_inputs = processor(images=[image("wide", seed)], text=[text], return_tensors="pt")
            assert torch.equal(model(**batch_inputs).logits, reference(**batch_inputs).logits)
    assert (stand_in.captured, stand_in.replayed) == (1, 2)


def test_prefill_graphs_leave_peft_adapters_to_the_eager_forward(source):
    """A peft adapter (its layers are not torch's or transformers') keeps the eager forward, which computes it."""
    from proxyv_convert.remote.modeling_proxyv import ProxyVPrefillGraphs

    wrapped = lora_model(source, ["q_proj", "v_proj"])
    base = wrapped.base_model.model
    stand_in = StandInGraph()
    base.model._proxyv_graphs = ProxyVPrefillGraphs(capture=stand_in, devices=("cpu",))
    with torch.no_grad():
        results = [wrapped(**one(PROMPTS["one image"])).logits for _ in range(2)]
        base.config.proxyv_cuda_graphs = False
        expected = wrapped(**one(PROMPTS["one image"])).logits
        with wrapped.disable_adapter():
            plain = wrapped(**one(PROMPTS["one image"])).logits
    assert all(torch.equal(result, expected) for result in results) and not torch.allclose(expected, plain)
    assert stand_in.captured == 0 and base.model._proxyv_graphs.counts["eager"] == 2


def test_prefill_graphs_follow_the_weights_and_the_attention(source):
    """Weights changed in place are read by the graph where they are; a weight replaced (or laid out anew) drops the
    graphs, and the next call captures again; another attention implementation is another graph."""
    model, reference, stand_in = with_graphs(source)
    call = functools.partial(model, **one(PROMPTS["one image"]))
    expected = functools.partial(reference, **one(PROMPTS["one image"]))
    with torch.no_grad():
        call(), call()
        assert stand_in.captured == 1
        for side in (model, reference):
            side.model.language_model.layers[-1].mlp.down_proj.weight.mul_(1.5)
        assert torch.equal(call().logits, expected().logits) and stand_in.captured == 1
        for side in (model, reference):
            mlp = side.model.language_model.layers[-1].mlp
            mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight * 2)
        assert torch.equal(call().logits, expected().logits) and stand_in.captured == 2
        model.fuse_projections(True)
        reference.fuse_projections(True)
        assert torch.equal(call().logits, expected().logits) and stand_in.captured == 3
        for side in (model, reference):
            side.set_attn_implementation("eager")
        results = [call().logits for _ in range(3)]
        assert all(torch.equal(result, expected().logits) for result in results)
    assert stand_in.captured == 4 and len(model.model._proxyv_graphs.entries) == 2


def test_prefill_graphs_keep_a_few_shapes_and_survive_failures(source):
    """At most `limit` graphs are kept (the least recently used goes); a shape whose capture fails runs eagerly from
    then on, with a warning, and is not captured again. A copied model starts with no graphs of its own."""
    model, reference, stand_in = with_graphs(source, limit=1, after=1)
    shapes = [PROMPTS["one image"], PROMPTS["image first"], PROMPTS["one image"]]
    with torch.no_grad():
        for prompt in shapes:
            assert torch.equal(model(**one(prompt)).logits, reference(**one(prompt)).logits)
    graphs = model.model._proxyv_graphs
    assert stand_in.captured == 3 and len(graphs.entries) == 1
    assert not copy.deepcopy(model).model._proxyv_graphs.entries

    failing, reference, stand_in = with_graphs(source, stand_in=StandInGraph(fail=True), after=1)
    with torch.no_grad(), pytest.warns(UserWarning, match="could not capture the prefill"):
        first = failing(**one(PROMPTS["one image"])).logits
    with torch.no_grad():
        again = failing(**one(PROMPTS["one image"])).logits
        expected = reference(**one(PROMPTS["one image"])).logits
    assert torch.equal(first, expected) and torch.equal(again, expected) and stand_in.captured == 1


def test_no_graphs_on_the_cpu_by_default(source):
    """Graphs serve CUDA devices only: on the CPU the model never makes them."""
    model = convert_in_memory(source)
    with torch.no_grad():
        model(**one(PROMPTS["one image"]))
        model(**one(PROMPTS["one image"]))
    assert "_proxyv_graphs" not in model.model.__dict__
    assert model.config.proxyv_cuda_graphs is True
