"""Processors of the ProxyV models whose source families take videos (LLaVA-OneVision, LLaVA-NeXT-Video).

They are the families' own transformers processors, except where torchvision does not import: transformers' video
processors need it, and the families' processors then fail to load at all. There these load with their image
processor (PIL backend) and tokenizer only, so that images and text work, and a video raises one clear error. With
torchvision they are exactly transformers' processors. The checkpoint's processor files stay complete either way.

This file is self-contained (standard library + transformers): it is copied into every converted checkpoint and
loaded with `trust_remote_code=True`.
"""

import functools

from transformers import LlavaNextVideoProcessor, LlavaOnevisionProcessor
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: a stub without torchvision
from transformers.utils import is_torchvision_available

NO_VIDEO_PROCESSOR = (
    "this processor has no video processor: transformers' video processors need torchvision, which does not import "
    "here; install torchvision (the build matching your torch) to process videos"
)


@functools.cache
def video_processor_available() -> bool:
    """Whether transformers can build a video processor: torchvision is installed and imports (a CUDA wheel beside a
    CPU torch is installed but fails to import)."""
    if not is_torchvision_available():
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a mismatched wheel fails with RuntimeError or OSError, not only ImportError
        return False
    return True


class VideoProcessorOptional:
    """Mixin for a processor with a `video_processor`: without torchvision it loads with `video_processor=None`."""

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        if video_processor_available():
            return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)
        arguments = []
        for name in cls.get_attributes():  # in the order of the processor's __init__
            if name == "video_processor":
                arguments.append(None)
            elif name == "image_processor":
                arguments.append(AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs))
            else:
                arguments.append(cls._load_tokenizer_from_pretrained(name, pretrained_model_name_or_path, **kwargs))
        return arguments

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None and not video_processor_available():
            return None  # its class cannot even be looked up without torchvision
        return super().check_argument_for_proper_class(argument_name, argument)

    def _process_videos(self, videos, **kwargs):
        if self.video_processor is None:
            raise ValueError(NO_VIDEO_PROCESSOR)
        return super()._process_videos(videos, **kwargs)


class ProxyVLlavaOnevisionProcessor(VideoProcessorOptional, LlavaOnevisionProcessor):
    pass


class ProxyVLlavaNextVideoProcessor(VideoProcessorOptional, LlavaNextVideoProcessor):
    pass
