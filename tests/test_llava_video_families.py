"""LLaVA-OneVision and LLaVA-NeXT-Video: AnyRes images (unpadding, OneVision's shrinking to anyres_max, newline
tokens), several images per prompt, videos (per-frame proxies, or proxies across neighbouring frames), mixed in one
batch with text-only prompts. ProxyV off is transformers' own class, bit for bit; ProxyV on matches the naive
token-by-token reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from proxyv_reference import reference_logits
from tiny_models import (
    VIDEO_MARK,
    expand_videos,
    tiny_next_video,
    tiny_next_video_processor,
    tiny_onevision,
    tiny_onevision_processor,
    video_tokens,
)

from proxyv_convert.convert import convert
from proxyv_convert.families import FAMILIES
from proxyv_convert.model_folder import load_model

SIZES = {"wide": (40, 70), "tall": (90, 30), "big": (110, 110), "small": (20, 20)}  # (height, width)
FRAMES = 3
FAMILY_MODELS = {
    "llava_onevision": (tiny_onevision, tiny_onevision_processor, 3),  # reduce factor 3 divides the 9x9 grid
    "llava_next_video": (tiny_next_video, tiny_next_video_processor, 4),
}
PROMPTS = {  # text, images; VIDEO_MARK stands where a video goes
    "one wide": ("user : <image> what is the colour", ["wide"]),
    "big": ("user : <image> how many", ["big"]),
    "two images": ("user : <image> left or right <image> which one", ["tall", "small"]),
    "video": (f"user : {VIDEO_MARK} what is the colour", []),
    "image and video": (f"user : <image> and {VIDEO_MARK} which one", ["tall"]),
    "text only": ("user : what is the colour of the circle", []),
}


def image(name: str, seed: int = 0) -> Image.Image:
    height, width = SIZES[name]
    rng = np.random.default_rng(seed * 100 + list(SIZES).index(name))
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def converted(source, family: str, factor: int, video_frames: int = 1, attn: str = "sdpa", proxy: str = "spatial"):
    entry = FAMILIES[family]
    config = entry.config.from_llava_config(source.config, proxyv_start_layer=2, proxyv_reduce_factor=factor,
                                            proxyv_video_frames=video_frames, proxyv_proxy=proxy)
    config._attn_implementation = attn
    model = entry.head(config).eval()
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("model.proxyv.") for k in missing)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.model.proxyv.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.3 / param.shape[-1] ** 0.5
            param.copy_(noise + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture(scope="module", params=list(FAMILY_MODELS))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def source(family):
    return FAMILY_MODELS[family][0](seed=4)


@pytest.fixture(scope="module")
def processor(source):
    return FAMILY_MODELS[source.config.model_type][1](source.config)


@pytest.fixture(scope="module")
def model(source, family):
    return converted(source, family, FAMILY_MODELS[family][2])


def inputs(processor, config, names: list[str], side: str = "left") -> dict[str, torch.Tensor]:
    """A batch of the named prompts: images through the processor (one list per prompt), videos of FRAMES random
    frames spliced in as their video tokens."""
    prompts = [PROMPTS[n] for n in names]
    images = [[image(name, position) for position, name in enumerate(names)] for _, names in prompts]
    batch = processor(images=images if any(images) else None, text=[text for text, _ in prompts], padding=True,
                      padding_side=side, return_tensors="pt")
    batch = expand_videos(dict(batch), config, FRAMES, side)
    size = config.vision_config.image_size
    videos = [torch.randn(FRAMES, 3, size, size, generator=torch.Generator().manual_seed(list(PROMPTS).index(name)))
              for name in names for _ in range(PROMPTS[name][0].split().count(VIDEO_MARK))]  # the same per prompt
    if videos:
        batch["pixel_values_videos"] = torch.stack(videos)
    return batch


MIXED = [(["one wide"], "left"), (["video"], "left"), (["two images", "video", "text only", "big"], "left"),
         (["image and video", "text only", "one wide"], "right")]


@pytest.mark.parametrize("names,side", MIXED)
def test_off_is_bit_exact(source, model, processor, names, side):
    batch = inputs(processor, source.config, names, side)
    with torch.no_grad():
        expected = source(**batch, output_hidden_states=True)
        with model.proxyv_disabled():
            got = model(**batch, output_hidden_states=True)
    assert torch.equal(got.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, expected.hidden_states, strict=True))


def grids_of(model, batch) -> list[tuple[int, ...]]:
    """(first row, rows, columns, stride, frames, frame stride) of every grid of a one-prompt batch."""
    core, ids = model.model, batch["input_ids"][0]
    grids = []
    for token, layouts in ((model.config.image_token_id, core._layouts(batch)[0]),
                           (model.config.video_token_id, core._layouts(batch)[1])):
        starts = [int(i) for i in torch.nonzero(ids == token)[:, 0]]
        position = 0
        for tokens, parts in layouts:
            grids += [(starts[position] + g.start, g.height, g.width, g.stride, g.frames, g.frame_stride)
                      for g in parts]
            position += tokens
        assert position == len(starts)
    return grids


def assert_matches_reference(model, batch) -> None:
    grids = grids_of(model, batch)
    with torch.no_grad():
        logits = model(**batch).logits[0]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    expected = reference_logits(model, batch["input_ids"][0], batch.get("pixel_values"), grids, **extra)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["one wide", "big", "two images", "video", "image and video"])
def test_matches_naive_reference(model, source, processor, name):
    assert_matches_reference(model, inputs(processor, source.config, [name]))


@pytest.mark.parametrize("group", [2, 3])
def test_proxies_across_frames_match_the_reference(source, family, processor, group):
    """Proxies shared by `group` neighbouring frames (the last group may be shorter: 3 frames in groups of 2)."""
    model = converted(source, family, FAMILY_MODELS[family][2], video_frames=group)
    batch = inputs(processor, source.config, ["image and video"])
    grids = grids_of(model, batch)
    assert [g[4] for g in grids if g[4] > 1 or g[5]] == [min(group, FRAMES - first)
                                                         for first in range(0, FRAMES, group)]
    assert_matches_reference(model, batch)


def test_learned_proxies_with_video_match_the_reference(source, family, processor):
    model = converted(source, family, FAMILY_MODELS[family][2], proxy="learned")
    assert_matches_reference(model, inputs(processor, source.config, ["image and video"]))


def test_layouts_follow_the_processor(model, source, processor, family):
    """Token counts of every layout equal the processor's (OneVision: the 110x110 image takes the 3x3-crop pinpoint,
    27x27 tokens, shrunk to 18x18 by anyres_max_4; an image among several is its base crop and one newline)."""
    core = model.model
    for name in ["wide", "tall", "big", "small"]:
        batch = processor(images=[image(name)], text=["<image>"], return_tensors="pt")
        tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
        assert core.image_layout(SIZES[name])[0] == tokens
    assert core.video_layout(FRAMES)[0] == video_tokens(source.config, FRAMES)
    if family == "llava_onevision":
        tokens, (base, high) = core.image_layout(SIZES["big"])
        assert (base.height, high.height, high.width, high.stride) == (9, 18, 18, 19) and tokens == 81 + 18 * 19
        assert core.image_layout(SIZES["big"], patched=False) == (82, [base])
        side = 5  # ceil(9 / 2)
    else:
        side = 4  # 8 // 2
    grids = core.video_layout(FRAMES)[1]
    assert [(g.start, g.height, g.frames) for g in grids] == [(f * side * side, side, 1) for f in range(FRAMES)]


def test_single_equals_batched(model, source, processor):
    names = ["two images", "video", "text only", "big"]
    batch = inputs(processor, source.config, names)
    with torch.no_grad():
        batched = model(**batch).logits
    for i, name in enumerate(names):
        alone = inputs(processor, source.config, [name])
        with torch.no_grad():
            logits = model(**alone).logits[0]
        real = batch["attention_mask"][i].bool()
        torch.testing.assert_close(batched[i, real], logits, atol=1e-5, rtol=1e-4)


def test_generate_with_cache_equals_recompute(model, source, processor):
    batch = inputs(processor, source.config, ["image and video", "two images"])  # OneVision: batch_num_images [1, 2]
    cached = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    for _ in range(5):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(cached, ids)


def test_video_tokens_without_their_video_are_refused(model, source, processor):
    batch = inputs(processor, source.config, ["image and video"])
    batch.pop("pixel_values_videos")
    with pytest.raises(ValueError, match="more video tokens than the 0 videos passed describe"):
        model(**batch)


def test_bad_settings_are_one_line_errors(source, family):
    entry = FAMILIES[family]
    with pytest.raises(ValueError, match="proxyv_video_frames"):
        entry.config.from_llava_config(source.config, proxyv_start_layer=2, proxyv_reduce_factor=1,
                                       proxyv_video_frames=0)
    if family == "llava_onevision":
        with pytest.raises(ValueError, match="does not divide the 9x9 vision grid; use one of 1, 3, 9"):
            entry.config.from_llava_config(source.config, proxyv_start_layer=2, proxyv_reduce_factor=4)


@pytest.mark.slow
def test_convert_a_next_video_checkpoint(tmp_path):
    source = tiny_next_video(seed=4)
    source.save_pretrained(tmp_path / "source")  # weights and config: its processor needs torchvision to be saved
    convert(str(tmp_path / "source"), tmp_path / "m", layer=2, progress=False, video_frames=2)
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is FAMILIES["llava_next_video"].head and loaded.config.proxyv_video_frames == 2
    recipe = (tmp_path / "m" / "recipe.yaml").read_text()
    assert "--video-frames 2" in recipe and "video_frames: 2" in recipe
    batch = inputs(tiny_next_video_processor(source.config), source.config, ["image and video", "text only"])
    with torch.no_grad(), loaded.proxyv_disabled():
        assert torch.equal(loaded(**batch).logits, source(**batch).logits)


@pytest.mark.slow
@pytest.mark.parametrize("family_name,repo_id,factor", [
    ("llava_onevision", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", 3),
    ("llava_next_video", "llava-hf/LLaVA-NeXT-Video-7B-hf", 4),
])
def test_convert_from_the_hub_layout(tmp_path, family_name, repo_id, factor):
    """`proxyv convert <Hub id>` of a checkpoint in the llava-hf key layout (served by the loopback Hub) gives a model
    that, with ProxyV off, is transformers' own class loaded from the same files, bit for bit."""
    import subprocess
    import sys

    from hub_fixtures import publish_folder, save_llava_hf
    from hub_server import LocalHub
    from transformers import AutoModelForImageTextToText

    folder = save_llava_hf(tmp_path / "hub", family_name, seed=3, layers=4, hidden=32)
    with LocalHub() as hub:
        publish_folder(hub, repo_id, folder)
        result = subprocess.run(
            [sys.executable, "-m", "proxyv_convert.cli", "convert", repo_id, "--layer", "2", "--reduce-factor",
             str(factor), "--out", str(tmp_path / "m")],
            env=hub.env(tmp_path / "hf") | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    original = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert original.config.model_type == family_name
    converted_model = load_model(tmp_path / "m")
    assert type(converted_model) is FAMILIES[family_name].head
    assert converted_model.config.proxyv_base_model == repo_id
    processor = FAMILY_MODELS[family_name][1](original.config)
    batch = inputs(processor, original.config, ["image and video", "two images", "text only"])
    with torch.no_grad(), converted_model.proxyv_disabled():
        assert torch.equal(converted_model(**batch).logits, original(**batch).logits)


def test_bench_measures_the_largest_image(model, family):
    """`proxyv bench` on these families: the family's synthetic input is its largest AnyRes image."""
    from proxyv_convert.bench import bench

    report = bench(model, cases=((1, 1),), text_tokens=8, repeats=1, warmup=0, decode_tokens=2, memory=False)
    (case,) = report.cases
    expected = model.model.image_layout(max(model.config.image_grid_pinpoints, key=lambda hw: hw[0] * hw[1]))[0]
    assert case.image_tokens == expected and 0 < case.flops_ratio < 1


def test_video_frames_on_a_family_without_video_is_refused(tmp_path):
    from tiny_models import save_tiny_llava

    from proxyv_convert.errors import ProxyVError

    folder = save_tiny_llava(tmp_path / "source", layers=2, hidden=32)
    with pytest.raises(ProxyVError, match="video_frames 2 applies to video families only; 'llava' takes no video"):
        convert(str(folder), tmp_path / "m", layer=1, progress=False, video_frames=2)
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_video_benchmark_script_runs(tmp_path):
    """benchmarks/video_prefill.py end to end on a tiny shape: every case prints its ratios."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "video_prefill.py"
    result = subprocess.run([sys.executable, str(script), "--hidden", "64", "--intermediate", "128", "--layers", "4",
                             "--heads", "4", "--start-layer", "2", "--vocab", "300", "--repeats", "1",
                             "--decode-tokens", "2"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.startswith(("video-", "image-"))}
    assert set(rows) == {"video-32f-g1", "video-32f-g2", "image-max-anyres"}
    assert rows["video-32f-g1"][0] == str(32 * 14 * 14 + 1 + 32) and rows["image-max-anyres"][0] == str(7371 + 32)
    assert all(0 < float(values[2]) < 1 for values in rows.values())  # FLOPs ratio
    assert float(rows["video-32f-g2"][2]) < float(rows["video-32f-g1"][2])  # half the proxies, fewer FLOPs
