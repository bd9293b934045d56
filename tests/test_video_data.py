"""Videos through the data loader (frames in a dataset column, video files), and the processors of the video families
where torchvision does not import: distill and eval of tiny OneVision and NeXT-Video models on data that mixes
video, image and text-only rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hub_fixtures import save_llava_hf
from PIL import Image
from tiny_models import save_tiny_llava, tiny_next_video, tiny_onevision

from proxyv_convert.batching import Batcher
from proxyv_convert.config import Columns, DistillSettings
from proxyv_convert.convert import convert
from proxyv_convert.data import TEXT_ONLY, load_data
from proxyv_convert.distill import distill
from proxyv_convert.errors import ProxyVError
from proxyv_convert.evaluate import evaluate
from proxyv_convert.families import FAMILIES
from proxyv_convert.model_folder import load_model, load_processor
from proxyv_convert.remote.processing_proxyv import NO_VIDEO_PROCESSOR, video_processor_available
from proxyv_convert.video import FrameProcessor, Video, evenly_spaced, same_length

FACTORS = {"llava_onevision": 3, "llava_next_video": 4}  # divide the 9x9 and 8x8 grids
QUESTIONS = ["what is the colour of the circle", "how many red square", "is the blue circle left of the square"]
ANSWERS = ["red", "two", "yes"]
KINDS = ("video", "image", "text", "video", "image", "video")  # the rows' kinds, in turn


def random_image(seed: int, height: int = 40, width: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def mixed_rows(n: int, offset: int = 0) -> dict[str, list]:
    """Video rows (3 or 4 frames), image rows and text-only rows, in turn."""
    rows = {"image": [], "video": [], "question": [], "answer": []}
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        rows["image"].append(random_image(offset + i) if kind == "image" else None)
        frames = 3 + i % 2
        rows["video"].append([random_image(10_000 + offset * 10 + i * 10 + f) for f in range(frames)]
                             if kind == "video" else None)
        rows["question"].append(QUESTIONS[i % 3])
        rows["answer"].append(ANSWERS[i % 3])
    return rows


def save_mixed(path: Path, train: int = 12, validation: int = 6) -> Path:
    features = datasets.Features({"image": datasets.Image(), "video": datasets.List(datasets.Image()),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string")})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(mixed_rows(train), features=features),
        "validation": datasets.Dataset.from_dict(mixed_rows(validation, offset=500), features=features),
    }).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module", params=list(FACTORS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folders(tmp_path_factory, family) -> tuple[Path, Path, Path]:
    """(the source in the llava-hf layout, its ProxyV conversion, the mixed data)."""
    root = tmp_path_factory.mktemp(family)
    source = save_llava_hf(root / "source", family, seed=3, layers=4, hidden=64)
    converted = root / "converted"
    convert(str(source), converted, layer=2, reduce_factor=FACTORS[family], progress=False)
    return source, converted, save_mixed(root / "data")


# --- the processor without torchvision ---------------------------------------------------------------------------


def test_torchvision_does_not_import_here():
    """The tests below are about a machine without torchvision: this one is."""
    assert not video_processor_available()


def test_processor_loads_without_torchvision_and_refuses_videos_in_one_line(folders, family):
    source, converted, _ = folders
    for folder in (source, converted):
        processor = load_processor(folder)
        assert type(processor) is FAMILIES[family].processor and processor.video_processor is None
        assert type(processor.image_processor).__name__.endswith("Pil")
        text = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "what is the colour"}]}], add_generation_prompt=True)
        batch = processor(images=[random_image(1)], text=[text], return_tensors="pt")
        assert set(FAMILIES[family].image_inputs) <= set(batch)
        with pytest.raises(ValueError) as error:
            processor(videos=[[random_image(2)] * 2], text=["user : <video> what"], return_tensors="pt")
        assert str(error.value) == NO_VIDEO_PROCESSOR and "torchvision" in str(error.value)
        assert "\n" not in str(error.value)


def test_converted_processor_files_are_complete_and_name_the_proxyv_processor(folders, family):
    source, converted, _ = folders
    for name in ("video_preprocessor_config.json", "preprocessor_config.json", "chat_template.json",
                 "tokenizer.json", "tokenizer_config.json", "processing_proxyv.py"):
        assert (converted / name).is_file(), name
    assert (converted / "video_preprocessor_config.json").read_bytes() == (
        source / "video_preprocessor_config.json").read_bytes()
    processor_config = json.loads((converted / "processor_config.json").read_text())
    original = json.loads((source / "processor_config.json").read_text())
    assert processor_config == {**original, "auto_map": {
        "AutoProcessor": f"processing_proxyv.{FAMILIES[family].processor.__name__}"}}


USER = """
import sys
sys.modules["proxyv_convert"] = None  # a user without proxyv
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
print(type(processor).__module__, type(processor).__name__, processor.video_processor)
"""


def test_a_user_without_proxyv_or_torchvision_loads_the_processor(folders, family, tmp_path):
    _, converted, _ = folders
    result = subprocess.run([sys.executable, "-c", USER, str(converted)], capture_output=True, text=True,
                            env={"HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    module, name, video = result.stdout.split()
    assert module.startswith("transformers_modules.") and name == FAMILIES[family].processor.__name__
    assert video == "None"


# --- frames to pixels --------------------------------------------------------------------------------------------


def reference_pixels(frames: list[Image.Image], settings: dict) -> torch.Tensor:
    """The video processors' documented steps, by hand: resize (to height x width, or the shortest edge to its size
    keeping the aspect ratio), center crop, rescale by 1/255, normalise with mean and std; bicubic resampling."""
    out = []
    for frame in frames:
        size = settings["size"]
        if "shortest_edge" in size:
            short, (width, height) = size["shortest_edge"], frame.size
            scale = short / min(width, height)
            width, height = (short, int(height * scale)) if width <= height else (int(width * scale), short)
        else:
            height, width = size["height"], size["width"]
        frame = frame.resize((width, height), Image.Resampling.BICUBIC)
        array = np.asarray(frame, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W)
        if settings.get("do_center_crop"):
            crop_h, crop_w = settings["crop_size"]["height"], settings["crop_size"]["width"]
            top, left = (array.shape[1] - crop_h) // 2, (array.shape[2] - crop_w) // 2
            array = array[:, top : top + crop_h, left : left + crop_w]
        array = array / 255.0
        mean = np.asarray(settings["image_mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(settings["image_std"], dtype=np.float32)[:, None, None]
        out.append(torch.from_numpy((array - mean) / std))
    return torch.stack(out)


@pytest.mark.parametrize("settings", [
    {"size": {"height": 36, "width": 36}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    {"size": {"shortest_edge": 32}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
     "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
], ids=["onevision", "next-video"])
def test_frame_processor_follows_the_video_processor_steps(settings):
    full = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, **settings}
    frames = [random_image(seed, 40, 70) for seed in range(3)]
    pixels = FrameProcessor(full, "pixels")([frames, frames[::-1]])["pixels"]
    expected = reference_pixels(frames, full)
    assert pixels.shape == (2, 3, *expected.shape[1:])
    torch.testing.assert_close(pixels[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[1], expected.flip(0), atol=1e-5, rtol=0)


def test_frame_processor_settings_come_from_the_checkpoint_then_the_video_processor_class(folders, family, tmp_path):
    source, _, _ = folders
    processor = load_processor(source)
    saved = json.loads((source / "video_preprocessor_config.json").read_text())
    frames = processor.frame_processor
    assert frames.output == FAMILIES[family].video_inputs[0]
    assert {k: frames.settings[k] for k in saved if k in frames.settings} == {
        k: v for k, v in saved.items() if k in frames.settings}
    # settings a checkpoint leaves out are transformers' class defaults (NeXT-Video: a 224x224 center crop), even
    # where the class itself cannot be used (no torchvision)
    trimmed = {k: v for k, v in saved.items() if k not in ("crop_size", "do_center_crop", "image_std")}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(trimmed))
    defaults = FrameProcessor.from_folder(tmp_path, processor, "pixels").settings
    assert defaults["image_std"] == [0.26862954, 0.26130258, 0.27577711]  # OPENAI_CLIP_STD
    if family == "llava_next_video":
        assert defaults["crop_size"] == {"height": 224, "width": 224} and defaults["do_center_crop"] is True
    else:
        assert "crop_size" not in defaults and "do_center_crop" not in defaults


def test_videos_of_a_batch_share_a_frame_count():
    assert evenly_spaced(3, 7) == [0, 3, 6] and evenly_spaced(4, 2) == [0, 1] and evenly_spaced(1, 5) == [0]
    long, short = Video(tuple(random_image(i) for i in range(5))), Video(tuple(random_image(i) for i in range(3)))
    cut = same_length([long, short])
    assert [len(v.frames) for v in cut] == [3, 3] and cut[0].frames == (long.frames[0], long.frames[2],
                                                                           long.frames[4])


# --- the loader and the batches ----------------------------------------------------------------------------------


def test_the_loader_gives_videos_images_and_text_only_rows(folders):
    _, _, data = folders
    rows = load_data(str(data), split="train")
    assert rows.video == "video" and rows.image == "image"
    kinds = [rows.example(i)[0] for i in range(len(KINDS))]
    assert isinstance(kinds[0], Video) and len(kinds[0].frames) == 3 and isinstance(kinds[1], Image.Image)
    assert kinds[2] is TEXT_ONLY and isinstance(kinds[3], Video) and len(kinds[3].frames) == 4
    renamed = datasets.load_from_disk(str(data))["train"].rename_column("video", "clip")
    assert load_data(renamed, split="train").video is None
    assert load_data(renamed, split="train", columns=Columns(video="clip")).example(0)[0] == kinds[0]
    with pytest.raises(ProxyVError, match="no column 'frames'.*--video-column"):
        load_data(renamed, split="train", columns=Columns(video="frames"))


def test_a_video_only_dataset_needs_no_image_column(folders):
    _, _, data = folders
    videos = datasets.load_from_disk(str(data))["train"].remove_columns("image")
    rows = load_data(videos, split="train")
    assert rows.image is None and isinstance(rows.example(0)[0], Video) and rows.example(1)[0] is TEXT_ONLY


def write_video(path: Path, frames: int, size: int = 32) -> list[int]:
    """An MPEG-4 file of `frames` flat grey frames, frame i of value 12 * i; returns the values."""
    import av

    greys = [12 * i for i in range(frames)]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for grey in greys:
            pixels = np.full((size, size, 3), grey, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return greys


def test_video_files_decode_to_evenly_spaced_frames(tmp_path):
    """Video files in a table (paths relative to it) and as bytes in a dataset column give FILE_FRAMES frames, evenly
    spaced over the file; a file that does not decode is a row that does not decode (None), as a broken image."""
    from proxyv_convert.video import FILE_FRAMES

    greys = write_video(tmp_path / "clip.mp4", 21)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    table = tmp_path / "data.jsonl"
    table.write_text("".join(json.dumps({"video": name, "question": "what"}) + "\n"
                             for name in ("clip.mp4", "broken.mp4")))
    expected = evenly_spaced(FILE_FRAMES, len(greys))
    from_table = load_data(str(table), split="train")
    in_column = load_data(datasets.Dataset.from_dict(
        {"video": [(tmp_path / "clip.mp4").read_bytes()], "question": ["what"]}), split="train")
    for video in (from_table.example(0)[0], in_column.example(0)[0]):
        assert isinstance(video, Video) and len(video.frames) == FILE_FRAMES
        assert all(frame.size == (32, 32) and frame.mode == "RGB" for frame in video.frames)
        # Each frame is the file's frame whose grey it is closest to (the codec moves greys by a few levels).
        decoded = [int(np.abs(np.asarray(frame).mean() - np.array(greys)).argmin()) for frame in video.frames]
        assert decoded == expected
    assert from_table.example(1)[0] is None


def test_video_files_without_a_decoder_are_a_one_line_error(tmp_path, monkeypatch):
    for decoder in ("av", "decord"):
        monkeypatch.setitem(sys.modules, decoder, None)  # neither installed: importing raises ImportError
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    table = tmp_path / "data.jsonl"
    table.write_text(json.dumps({"video": "clip.mp4", "question": "what"}) + "\n")
    rows = load_data(str(table), split="train")
    with pytest.raises(ProxyVError, match=r"video files, and decoding them needs PyAV or decord") as error:
        rows.example(0)
    assert "\n" not in str(error.value)


def test_a_batch_with_videos_computes_what_the_original_model_computes(folders, family):
    """The Batcher's mixed batch (video, image and text-only rows) through the converted model with ProxyV off equals
    transformers' own model on the same inputs, and the video tokens are as many as the model lays out."""
    source, converted, data = folders
    entry = FAMILIES[family]
    model = load_model(converted, dtype=torch.float32)
    processor = load_processor(converted)
    batcher = Batcher(load_data(str(data), split="train"), processor, entry.visual_token_ids(model.config), 4096,
                      entry.image_inputs, entry.video_inputs)
    batch = batcher(list(range(6)))
    assert batch.used == 6 and batch.skipped_images == 0
    videos = batch.inputs[entry.video_inputs[0]]
    assert videos.shape[:2] == (3, 3)  # three videos of 3, 4 and 3 frames, cut to 3
    per_video = model.model.video_layout(3)[0]
    video_tokens = (batch.inputs["input_ids"] == model.config.video_token_id).sum(1)
    assert video_tokens.tolist() == [per_video, 0, 0, per_video, 0, per_video]
    assert batch.image_mask.sum(1)[2] == 0 and batch.image_mask.sum(1).tolist()[1] > 0
    original = (tiny_onevision if family == "llava_onevision" else tiny_next_video)(seed=3, layers=4, hidden=64)
    with torch.no_grad(), model.proxyv_disabled():
        ours = model(**batch.inputs).logits
        theirs = original(**batch.inputs).logits
    mask = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-5, rtol=1e-5)


# --- distill and eval ------------------------------------------------------------------------------------------------


def test_distill_and_eval_on_videos_images_and_text(folders, family, tmp_path):
    _, converted, data = folders
    settings = DistillSettings(steps=3, batch_size=3, eval_examples=6, warmup_steps=1, max_length=4096,
                               checkpoint_every=100)
    result = distill(converted, str(data), settings=settings, out=tmp_path / "distilled", progress=False)
    report = result.report
    assert report["steps"] == 3 and report["skipped"] == {"undecodable_images": 0, "too_long": 0}
    losses = [row["loss"] for row in report["loss_curve"]]
    assert all(np.isfinite(losses)) and all(row["vision"] > 0 for row in report["loss_curve"])
    assert report["before"]["examples"] == 6 and report["after"]["examples"] == 6
    assert report["after"]["task"]["examples"] == 6
    assert report["after"]["cosine_vision"] != report["before"]["cosine_vision"]  # it learned something
    before = dict(load_model(converted).model.proxyv.named_parameters())
    after = dict(load_model(tmp_path / "distilled").model.proxyv.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)

    result = evaluate(tmp_path / "distilled", str(data), split="validation", limit=6, against_original=True,
                      batch_size=3, progress=False)
    assert result.n == 6 and result.skipped_images == 0 and result.agreement is not None
    assert len(result.predictions) == len(result.other_predictions) == 6


def test_videos_for_a_model_without_video_are_a_one_line_error(folders, tmp_path):
    _, _, data = folders
    source = save_tiny_llava(tmp_path / "source", seed=1)
    convert(str(source), tmp_path / "llava", layer=1, progress=False)
    with pytest.raises(ProxyVError, match="the data holds videos, and this model takes none") as error:
        distill(tmp_path / "llava", str(data), settings=DistillSettings(steps=1), progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "llava" / ".distill").exists()


@pytest.mark.slow
def test_video_proxies_benchmark_runs(tmp_path):
    """benchmarks/video_proxies.py end to end on a tiny shape: both proxy settings print their row."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "video_proxies.py"
    result = subprocess.run([sys.executable, str(script), "--hidden", "32", "--layers", "3", "--heads", "2",
                             "--vocab", "64", "--start-layer", "1", "--frames", "4", "--steps", "2",
                             "--train-videos", "4", "--eval-videos", "2", "--batch-size", "2", "--new-tokens", "2"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {" ".join(line.split()[:2]): line.split()[2:] for line in result.stdout.splitlines()
            if line.startswith(("per frame", "2 frames"))}
    assert set(rows) == {"per frame", "2 frames"}
    per_frame, pairs = rows["per frame"], rows["2 frames"]
    assert int(per_frame[0]) == 2 * int(pairs[0])  # half the proxies
    assert 0 < float(pairs[1]) < float(per_frame[1]) < 1  # and fewer FLOPs
    assert float(per_frame[2]) == float(pairs[2]) > 0  # undistilled, both compute the same (not the original)


def test_frame_and_video_paths_in_a_table_stay_inside_its_folder(tmp_path):
    folder = tmp_path / "data"
    (folder / "frames").mkdir(parents=True)
    for i in range(3):
        random_image(i).save(folder / "frames" / f"{i}.png")
    random_image(9).save(tmp_path / "secret.png")
    table = folder / "data.jsonl"
    rows = [{"video": [f"frames/{i}.png" for i in range(3)], "question": "what"}, {"video": None, "question": "what"}]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data(str(table), split="train")
    video = data.example(0)[0]
    assert isinstance(video, Video) and [f.size for f in video.frames] == [(56, 40)] * 3
    assert data.example(1)[0] is TEXT_ONLY
    for escaping in ({"video": ["frames/0.png", "../secret.png"], "question": "what"},
                     {"video": str(tmp_path / "secret.png"), "question": "what"}):
        table.write_text(json.dumps(escaping) + "\n")
        with pytest.raises(ProxyVError, match="outside the table's folder"):
            load_data(str(table), split="train")
