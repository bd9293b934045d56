"""ProxyV model folders: the canonical code files they carry, telling them apart, and loading them.

The remote files in `proxyv_convert/remote/` are the one ProxyV implementation: the package imports them, and every
converted checkpoint carries byte-for-byte copies of them (loaded there with `trust_remote_code=True`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from .errors import ProxyVError
from .families import FAMILIES, PROXYV_FAMILIES, Family
from .video import FrameProcessor

REMOTE_DIR = Path(__file__).parent / "remote"
CODE_FILES = ("configuration_proxyv.py", "modeling_proxyv.py", "processing_proxyv.py")
PROXYV_PREFIX = "model.proxyv."  # every parameter ProxyV adds
# What the commands write into a model folder beside the weights, code and recipe.yaml
CARD_FILE = "README.md"
DISTILL_REPORT = "distill_report.json"
EVAL_REPORT = "eval_report.json"
BENCH_REPORT = "bench_report.json"
RUN_STATE = "run_state.json"
CHECKPOINT_DIR = ".distill"  # an unfinished distillation
# Files that describe the model's weights as they were: a distilled model must not inherit them.
MEASURED_FILES = (EVAL_REPORT, BENCH_REPORT, RUN_STATE, CARD_FILE)

_registered = False


def register_auto_classes() -> None:
    """Let transformers' Auto classes resolve the ProxyV model types to the package's classes (no remote code
    needed), and make `save_pretrained` write the code files and `auto_map` into every folder it saves."""
    global _registered
    if _registered:
        return
    for family in FAMILIES.values():
        family.config.register_for_auto_class()
        family.base.register_for_auto_class("AutoModel")
        family.head.register_for_auto_class("AutoModelForImageTextToText")
        AutoConfig.register(family.proxyv_model_type, family.config, exist_ok=True)
        AutoModel.register(family.config, family.base, exist_ok=True)
        AutoModelForImageTextToText.register(family.config, family.head, exist_ok=True)
    _registered = True


def canonical_code() -> dict[str, bytes]:
    """The bytes of the code files every converted checkpoint must carry."""
    return {name: (REMOTE_DIR / name).read_bytes() for name in CODE_FILES}


def code_differences(folder: Path) -> list[str]:
    """Names of the code files in `folder` that are missing or differ from the package's implementation."""
    different = []
    for name, data in canonical_code().items():
        path = Path(folder) / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).digest() != hashlib.sha256(data).digest():
            different.append(name)
    return different


def folder_model_type(folder: Path) -> str | None:
    config = Path(folder) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def folder_family(folder: Path) -> Family | None:
    """The family of a ProxyV model folder; None when the folder holds no ProxyV model."""
    return PROXYV_FAMILIES.get(folder_model_type(folder))


def is_proxyv_folder(folder: Path) -> bool:
    return folder_family(folder) is not None


def load_model(
    folder: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a ProxyV folder with the package's classes, or a plain LLaVA folder with transformers' own class."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ProxyVError(f"{folder} is not a model folder (no config.json)")
    kwargs = {"dtype": dtype or "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    family = folder_family(folder)
    if family is not None:
        stale = code_differences(folder)
        if stale:
            raise ProxyVError(
                f"{folder} carries code that differs from this proxyv version ({', '.join(stale)}); "
                "convert the model again with this version"
            )
        model = family.head.from_pretrained(folder, **kwargs)
    else:
        model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_processor(folder: str | Path) -> ProcessorMixin:
    """The processor of a model folder (ProxyV or its source): the family's ProxyV processor class where it has one
    (it loads without torchvision: images and text work, videos raise), else transformers' own. A video family's
    processor carries a `frame_processor` (video.py) with which the data loader processes videos without
    torchvision."""
    folder = Path(folder)
    family = folder_family(folder) or FAMILIES.get(folder_model_type(folder))
    processor_class = family.processor if family is not None and family.processor is not None else AutoProcessor
    processor = processor_class.from_pretrained(folder)
    if family is not None and family.video_inputs:  # what the data loader turns a video's frames into pixels with
        processor.frame_processor = FrameProcessor.from_folder(folder, processor, family.video_inputs[0])
    return processor


register_auto_classes()
