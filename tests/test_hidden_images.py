"""A ProxyV model never computes the original model quietly: driven the way vLLM's Transformers backend drives a model
(no token ids, the image features already merged into `inputs_embeds`, prompts packed into one row) it refuses with
one line saying what to do, and computes exactly the original model inside `proxyv_disabled()`."""

from __future__ import annotations

import pytest
import torch
from test_modeling import PROMPTS, convert_in_memory, pixel_values_for
from tiny_models import IMAGE_TOKEN_ID, tiny_llava


@pytest.fixture(scope="module")
def models():
    source = tiny_llava(seed=0)
    return source, convert_in_memory(source)


def merged_embeds(model, prompt: list[int]) -> torch.Tensor:
    """`prompt`'s embeddings with its image features in place of the image tokens, as vLLM hands them over."""
    ids = torch.tensor([prompt])
    embeds = model.get_input_embeddings()(ids)
    features = model.model.get_image_features(pixel_values=pixel_values_for([prompt]))
    features = torch.cat(list(features.pooler_output if hasattr(features, "pooler_output") else features))
    return embeds.masked_scatter((ids == IMAGE_TOKEN_ID)[..., None], features.to(embeds.dtype))


def test_merged_image_features_without_token_ids_are_refused_not_computed_as_the_original(models):
    source, proxyv = models
    embeds = merged_embeds(proxyv, PROMPTS["one image"])
    positions = torch.arange(embeds.shape[1])[None]
    with torch.no_grad(), pytest.raises(ValueError, match=r"cannot find images merged into inputs_embeds") as error:
        proxyv.model(input_ids=None, inputs_embeds=embeds, position_ids=positions, use_cache=False)
    assert "\n" not in str(error.value) and 'pip install "proxyv[vllm]"' in str(error.value)
    with torch.no_grad(), proxyv.proxyv_disabled():  # off: exactly the original model
        off = proxyv.model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        original = source.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    torch.testing.assert_close(off, original, rtol=0, atol=0)


def test_text_only_embeddings_need_proxyv_off(models):
    _, proxyv = models
    embeds = proxyv.get_input_embeddings()(torch.tensor([PROMPTS["no image"]]))
    with torch.no_grad(), pytest.raises(ValueError, match="proxyv_disabled"):
        proxyv(inputs_embeds=embeds)
    with torch.no_grad(), proxyv.proxyv_disabled():
        assert proxyv(inputs_embeds=embeds).logits.shape[:2] == embeds.shape[:2]


def test_packed_prompts_are_refused(models):
    _, proxyv = models
    first, second = PROMPTS["one image"], PROMPTS["image last"]
    ids = torch.tensor([first + second])
    embeds = proxyv.get_input_embeddings()(ids)  # image places hold the image token's embedding: findable
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None]
    with torch.no_grad(), pytest.raises(ValueError, match="packed prompts"):
        proxyv(inputs_embeds=embeds, pixel_values=pixel_values_for([first, second]), position_ids=positions)


def test_embeddings_with_the_image_placeholders_still_run_proxyv(models):
    _, proxyv = models
    prompt = PROMPTS["one image"]
    ids, pixels = torch.tensor([prompt]), pixel_values_for([prompt])
    with torch.no_grad():
        by_ids = proxyv(input_ids=ids, pixel_values=pixels).logits
        embeds = proxyv.get_input_embeddings()(ids)
        by_embeds = proxyv(inputs_embeds=embeds, pixel_values=pixels, position_ids=torch.arange(len(prompt))[None])
        with proxyv.proxyv_disabled():
            off = proxyv(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(by_embeds.logits, by_ids)
    assert (by_ids - off).abs().max() > 1e-2  # ProxyV really ran
