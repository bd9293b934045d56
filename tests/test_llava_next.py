"""LLaVA-NeXT (AnyRes): per-crop grids, unpadding and newline tokens; ProxyV off is transformers' own class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from proxyv_reference import reference_logits
from tiny_models import save_tiny_llava_next, tiny_llava_next, tiny_next_processor

from proxyv_convert.convert import convert
from proxyv_convert.model_folder import load_model
from proxyv_convert.remote.configuration_proxyv import ProxyVLlavaNextConfig
from proxyv_convert.remote.modeling_proxyv import ProxyVLlavaNextForConditionalGeneration

SIZES = {"wide": (40, 70), "tall": (90, 30), "square": (64, 64), "small": (20, 20)}  # (height, width)


def image(name: str, seed: int = 0) -> Image.Image:
    height, width = SIZES[name]
    seed = seed * 100 + list(SIZES).index(name)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def converted(source, attn: str = "sdpa"):
    config = ProxyVLlavaNextConfig.from_llava_config(source.config, proxyv_start_layer=2)
    config._attn_implementation = attn
    model = ProxyVLlavaNextForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("model.proxyv.") for k in missing)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.model.proxyv.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.3 / param.shape[-1] ** 0.5
            param.copy_(noise + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture(scope="module")
def source():
    return tiny_llava_next(seed=4)


@pytest.fixture(scope="module")
def processor(source):
    return tiny_next_processor(source.config)


@pytest.fixture(scope="module")
def model(source):
    return converted(source)


def inputs(processor, prompts: list[tuple[str, list[str]]], side: str = "left") -> dict[str, torch.Tensor]:
    texts = [text for text, _ in prompts]
    images = [image(name, position) for _, names in prompts for position, name in enumerate(names)]
    return processor(images=images or None, text=texts, padding=True, padding_side=side, return_tensors="pt")


PROMPTS = {
    "one wide": ("user : <image> what is the colour", ["wide"]),
    "two sizes": ("user : <image> left or right <image> which one", ["tall", "square"]),
    "small": ("<image> how many", ["small"]),
    "text only": ("user : what is the colour of the circle", []),
}


@pytest.mark.parametrize("names,side", [(["one wide"], "left"), (["two sizes", "one wide", "small"], "left"),
                                         (["small", "text only", "two sizes"], "right")])
def test_off_is_bit_exact(source, model, processor, names, side):
    batch = inputs(processor, [PROMPTS[n] for n in names], side)
    with torch.no_grad():
        expected = source(**batch, output_hidden_states=True)
        with model.proxyv_disabled():
            got = model(**batch, output_hidden_states=True)
    assert torch.equal(got.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, expected.hidden_states, strict=True))


def grids_of(model, batch) -> list[tuple[int, int, int, int]]:
    """(first row, rows, columns, stride) of every grid of the first prompt, from the model's image layouts."""
    ids = batch["input_ids"][0]
    starts = [int(i) for i in torch.nonzero(ids == model.config.image_token_id)[:, 0]]
    grids, position = [], 0
    for size in batch["image_sizes"].tolist():
        tokens, parts = model.model.image_layout(size)
        grids += [(starts[position] + offset, h, w, stride) for offset, h, w, stride in parts]
        position += tokens
    assert position == len(starts)
    return grids


def assert_matches_reference(model, batch) -> None:
    """The model's logits for a one-prompt batch equal the naive reference's."""
    grids = grids_of(model, batch)
    with torch.no_grad():
        logits = model(**batch).logits[0]
    expected = reference_logits(model, batch["input_ids"][0], batch["pixel_values"], grids,
                                image_sizes=batch["image_sizes"])
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["one wide", "two sizes", "small"])
def test_matches_naive_reference(model, processor, name):
    assert_matches_reference(model, inputs(processor, [PROMPTS[name]]))


def test_grids_follow_the_unpadded_layout(model):
    """A 40x70 image picks the 32x64 pinpoint (1x2 crops: 8x16 tokens), unpadded to fewer rows, newline per row."""
    tokens, parts = model.model.image_layout([40, 70])
    (base_offset, *base), (hr_offset, rows, columns, stride) = parts
    assert base == [8, 8, 8] and hr_offset == 64
    assert stride == columns + 1 and tokens == 64 + rows * stride
    assert columns == 16 and rows < 16


def test_single_equals_batched(model, processor):
    names = ["two sizes", "one wide", "small"]
    batch = inputs(processor, [PROMPTS[n] for n in names])
    with torch.no_grad():
        batched = model(**batch).logits
    for i, name in enumerate(names):
        alone = inputs(processor, [PROMPTS[name]])
        with torch.no_grad():
            logits = model(**alone).logits[0]
        real = batch["attention_mask"][i].bool()
        torch.testing.assert_close(batched[i, real], logits, atol=1e-5, rtol=1e-4)


def test_generate_with_cache_equals_recompute(model, processor):
    batch = inputs(processor, [PROMPTS["two sizes"], PROMPTS["small"]])
    cached = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = {"image_sizes": batch["image_sizes"]}
    for _ in range(6):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                           use_cache=False, **extra).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(cached, ids)


def test_missing_image_sizes_is_refused(model, processor):
    batch = inputs(processor, [PROMPTS["one wide"]])
    batch.pop("image_sizes")
    with pytest.raises((ValueError, TypeError)):
        model(**batch)


def test_convert_a_next_checkpoint(tmp_path, source, processor):
    folder = save_tiny_llava_next(tmp_path / "source", seed=4)
    convert(str(folder), tmp_path / "m", layer=2, progress=False)
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, ProxyVLlavaNextForConditionalGeneration)
    batch = inputs(processor, [PROMPTS["two sizes"]])
    with torch.no_grad(), loaded.proxyv_disabled():
        assert torch.equal(loaded(**batch).logits, source(**batch).logits)
