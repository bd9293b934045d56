"""Videos for the commands that read a dataset: frames from a dataset column or a video file, and their pixel values.

transformers' video processors need torchvision; `FrameProcessor` computes what they compute (per frame: resize,
center crop, rescale, normalise, with the checkpoint's video processor settings) on transformers' PIL image backend,
so that distillation and evaluation take videos wherever images work.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from .errors import ProxyVError

FILE_FRAMES = 16  # frames taken (evenly spaced) from a video file
VIDEO_CONFIGS = ("video_preprocessor_config.json", "processor_config.json")  # where a checkpoint keeps the settings
# The video processor settings that decide the pixels; those a checkpoint does not name come from its image processor
SETTINGS = ("do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
            "rescale_factor", "do_normalize", "image_mean", "image_std")


@dataclass(frozen=True)
class Video:
    """A video as its frames, in order."""

    frames: tuple[Image.Image, ...]


def evenly_spaced(count: int, total: int) -> list[int]:
    """`count` frame indices spread evenly over `total` frames, first and last included (all of them if fewer)."""
    if total <= count:
        return list(range(total))
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def same_length(videos: list[Video]) -> list[Video]:
    """The videos with the frame count of the shortest (evenly spaced frames): a batch holds one count of frames."""
    if not videos:
        return videos
    count = min(len(v.frames) for v in videos)
    return [Video(tuple(v.frames[i] for i in evenly_spaced(count, len(v.frames)))) for v in videos]


def read_video_file(value) -> Video | None:
    """FILE_FRAMES evenly spaced frames of a video file (a path, bytes, or a datasets value {bytes, path}), decoded
    with PyAV or decord, whichever is installed; None when it does not decode. ProxyVError when neither is."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, os.PathLike)) and not Path(value).is_file():
        return None  # a FIFO or a device would block or never end
    source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value
    if source is None:
        return None
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        try:
            with av.open(source) as container:
                stream = container.streams.video[0]
                wanted = set(evenly_spaced(FILE_FRAMES, stream.frames)) if stream.frames else None  # 0: unknown
                frames = [frame.to_image() for i, frame in enumerate(container.decode(stream))
                          if wanted is None or i in wanted]
        except Exception:  # noqa: BLE001 - a file that does not decode is skipped and counted, like an image
            return None
    else:
        try:
            import decord
        except ImportError:
            raise ProxyVError("the data holds video files, and decoding them needs PyAV or decord (pip install av); "
                              "or give each video as a list of frames (images)") from None
        try:
            reader = decord.VideoReader(source)
            indices = evenly_spaced(FILE_FRAMES, len(reader))
            frames = [Image.fromarray(array) for array in reader.get_batch(indices).asnumpy()]
        except Exception:  # noqa: BLE001
            return None
    frames = [frames[i].convert("RGB") for i in evenly_spaced(FILE_FRAMES, len(frames))]
    return Video(tuple(frames)) if frames else None


class FrameProcessor:
    """The family's video processor for lists of frames, without torchvision: transformers' video processors run,
    per frame, resize -> center crop -> rescale -> normalise, which is what its PIL image backend runs per image."""

    def __init__(self, settings: dict, output: str):
        from transformers.image_processing_backends import PilBackend

        self.settings = {k: v for k, v in settings.items() if k in SETTINGS and v is not None}
        self.output = output  # the name of the pixel values in the model's forward
        self.backend = PilBackend(**self.settings)

    @classmethod
    def from_folder(cls, folder: str | Path, processor: ProcessorMixin, output: str) -> FrameProcessor:
        """The settings of the checkpoint's video processor: its own file (or its section of the processor config),
        then the defaults of its transformers class, then (for a class not found) the image processor's."""
        saved = {}
        for name in VIDEO_CONFIGS:
            path = Path(folder) / name
            try:
                data = json.loads(path.read_text()) if path.is_file() else {}
            except (OSError, ValueError):
                continue
            data = data.get("video_processor", {}) if name == "processor_config.json" else data
            if isinstance(data, dict) and data:
                saved = data
                break
        settings = {key: getattr(processor.image_processor, key, None) for key in SETTINGS}
        settings.update(class_defaults(processor, saved.get("video_processor_type")))
        settings.update({k: v for k, v in saved.items() if k in SETTINGS})
        return cls(settings, output)

    def __call__(self, videos: list[list[Image.Image]], **kwargs) -> BatchFeature:
        """{output: (videos, frames, 3, H, W)} of videos of one frame count; `kwargs` (the processor's video
        options) are the checkpoint's settings already."""
        pixels = [self.backend(list(frames), return_tensors="pt")["pixel_values"] for frames in videos]
        return BatchFeature({self.output: torch.stack(pixels)})


def class_defaults(processor: ProcessorMixin, class_name: str | None) -> dict:
    """The settings the family's transformers video processor class defines. Its module sits beside the processor's
    and imports without torchvision (only using the class needs it); {} when there is none."""
    base = next(c for c in type(processor).__mro__ if c.__module__.startswith("transformers.models."))
    package, _, name = base.__module__.rpartition(".")  # ....llava_onevision, processing_llava_onevision
    try:
        module = importlib.import_module(f"{package}.video_{name}")
    except ImportError:
        return {}
    found = [c for n, c in vars(module).items() if isinstance(c, type) and c.__module__ == module.__name__
             and (class_name is None or n == class_name)]
    return {k: getattr(found[0], k) for k in SETTINGS if getattr(found[0], k, None) is not None} if found else {}


def with_frame_processor(processor: ProcessorMixin) -> ProcessorMixin:
    """`processor` itself, or where it has no video processor (no torchvision) and a `frame_processor` was attached
    by `model_folder.load_processor`, a shallow copy that processes videos with it."""
    frames = getattr(processor, "frame_processor", None)
    if getattr(processor, "video_processor", None) is not None or frames is None:
        return processor
    view = copy.copy(processor)  # the loaded processor keeps refusing videos, as its users expect
    view.video_processor = frames
    return view
