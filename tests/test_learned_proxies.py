"""The non-spatial variant: learned queries make each image's proxies and carry their context back."""

from __future__ import annotations

import pytest
import torch
from proxyv_reference import reference_logits
from test_llava_next import PROMPTS as NEXT_PROMPTS
from test_llava_next import assert_matches_reference
from test_llava_next import inputs as next_inputs
from test_modeling import PROMPTS, pixel_values_for
from tiny_models import save_tiny_llava, tiny_llava, tiny_llava_config, tiny_llava_next, tiny_next_processor

from proxyv_convert.convert import convert
from proxyv_convert.model_folder import load_model
from proxyv_convert.remote.configuration_proxyv import ProxyVLlavaConfig, ProxyVLlavaNextConfig
from proxyv_convert.remote.modeling_proxyv import (
    ProxyVLlavaForConditionalGeneration,
    ProxyVLlavaNextForConditionalGeneration,
)


def learned_model(source, config_class, head, count: int = 5, **settings):
    config = config_class.from_llava_config(source.config, proxyv_start_layer=2, proxyv_proxy="learned",
                                            proxyv_learned_proxies=count, **settings)
    model = head(config).eval()
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("model.proxyv.") for k in missing)
    assert {k for k in missing if k.startswith("model.proxyv.learned.")} == {
        "model.proxyv.learned.queries", "model.proxyv.learned.key.weight", "model.proxyv.learned.norm.weight"}
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.model.proxyv.named_parameters():
            if "learned" in name and "norm" not in name:  # scores of order one: a soft, well-conditioned mix
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5 * 2)
            elif "vision_mlps" in name and "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 / param.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("name", ["one image", "two images", "image first"])
def test_llava_matches_reference(name):
    model = learned_model(tiny_llava(seed=1), ProxyVLlavaConfig, ProxyVLlavaForConditionalGeneration)
    prompt = torch.tensor(PROMPTS[name])
    pixels = pixel_values_for([PROMPTS[name]])
    with torch.no_grad():
        logits = model(input_ids=prompt[None], pixel_values=pixels).logits[0]
        with model.proxyv_disabled():
            original = model(input_ids=prompt[None], pixel_values=pixels).logits[0]
    torch.testing.assert_close(logits, reference_logits(model, prompt, pixels), atol=2e-5, rtol=1e-4)
    assert (logits - original).abs().max() > 1e-2


def test_llava_next_matches_reference():
    source = tiny_llava_next(seed=4)
    processor = tiny_next_processor(source.config)
    model = learned_model(source, ProxyVLlavaNextConfig, ProxyVLlavaNextForConditionalGeneration, count=3)
    assert_matches_reference(model, next_inputs(processor, [NEXT_PROMPTS["two sizes"]]))


def test_any_number_of_tokens_per_image():
    """CLIP with its CLS token kept gives 577 tokens per image, no square grid: spatial refuses, learned works."""
    config = tiny_llava_config()
    config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="not a 24x24 grid.*use proxy 'learned'"):
        ProxyVLlavaConfig.from_llava_config(config, proxyv_start_layer=2)
    torch.manual_seed(0)
    from transformers import LlavaForConditionalGeneration

    source = LlavaForConditionalGeneration(config).eval()
    model = learned_model(source, ProxyVLlavaConfig, ProxyVLlavaForConditionalGeneration)
    prompt = torch.tensor([1, 5, 6] + [config.image_token_id] * 577 + [7, 8])
    pixels = pixel_values_for([PROMPTS["one image"]])
    with torch.no_grad():
        logits = model(input_ids=prompt[None], pixel_values=pixels).logits[0]
    rows = len(prompt)
    grids = [(3, 1, 577, 577)]
    torch.testing.assert_close(logits, reference_logits(model, prompt, pixels, grids), atol=2e-5, rtol=1e-4)
    assert logits.shape[0] == rows


def test_batched_and_generation():
    model = learned_model(tiny_llava(seed=1), ProxyVLlavaConfig, ProxyVLlavaForConditionalGeneration)
    from test_modeling import batch, greedy_without_cache

    prompts = [PROMPTS["two images"], PROMPTS["one image"], PROMPTS["no image"]]
    ids, mask = batch(prompts, "left")
    pixels = pixel_values_for(prompts)
    cached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5,
                            min_new_tokens=5, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(model, ids, mask, pixels, 5))
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        alone = model(input_ids=torch.tensor([prompts[1]]), pixel_values=pixels[2:3]).logits[0]
    torch.testing.assert_close(batched[1, mask[1].bool()], alone, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_and_learned_parameters_train():
    prompt = torch.tensor([PROMPTS["two images"]])
    pixels = pixel_values_for([PROMPTS["two images"]])
    grads = []
    for checkpointing in (False, True):
        model = learned_model(tiny_llava(seed=1), ProxyVLlavaConfig, ProxyVLlavaForConditionalGeneration).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        model.requires_grad_(False)
        model.model.proxyv.requires_grad_(True)
        model(input_ids=prompt, pixel_values=pixels, use_cache=False).logits.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.model.proxyv.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
    assert grads[0]["learned.queries"].abs().sum() > 0 and grads[0]["learned.key.weight"].abs().sum() > 0


def test_convert_with_learned_proxies(tmp_path):
    source = save_tiny_llava(tmp_path / "source", seed=2)
    convert(str(source), tmp_path / "m", layer=2, proxy="learned", learned_proxies=4, progress=False)
    model = load_model(tmp_path / "m")
    assert model.config.proxyv_proxy == "learned" and model.model.proxyv.learned.queries.shape[0] == 4
    expected = ProxyVLlavaForConditionalGeneration(model.config).model.proxyv
    torch.manual_seed(0)
    expected.reset_parameters(model.config.text_config.initializer_range)
    for name, param in expected.named_parameters():
        assert torch.equal(model.model.proxyv.get_parameter(name), param), name
    prompt = torch.tensor([PROMPTS["one image"]])
    pixels = pixel_values_for([PROMPTS["one image"]])
    reference = tiny_llava(seed=2)
    with torch.no_grad(), model.proxyv_disabled():
        assert torch.equal(model(input_ids=prompt, pixel_values=pixels).logits,
                           reference(input_ids=prompt, pixel_values=pixels).logits)
