"""Package-side access to the one ProxyV implementation in `proxyv_convert/remote/`.

The remote files are the canonical implementation: the package imports them, and every converted checkpoint carries
byte-for-byte copies of them (loaded there with `trust_remote_code=True`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, LlavaForConditionalGeneration

from .errors import ProxyVError
from .remote.configuration_proxyv import ProxyVLlavaConfig, ProxyVLlavaNextConfig
from .remote.modeling_proxyv import (
    ProxyVLlavaForConditionalGeneration,
    ProxyVLlavaModel,
    ProxyVLlavaNextForConditionalGeneration,
    ProxyVLlavaNextModel,
    ProxyVModules,
)

REMOTE_DIR = Path(__file__).parent / "remote"
CODE_FILES = ("configuration_proxyv.py", "modeling_proxyv.py")
# source model type -> (ProxyV config, base model, model with head)
FAMILIES = {
    "llava": (ProxyVLlavaConfig, ProxyVLlavaModel, ProxyVLlavaForConditionalGeneration),
    "llava_next": (ProxyVLlavaNextConfig, ProxyVLlavaNextModel, ProxyVLlavaNextForConditionalGeneration),
}
PROXYV_MODEL_TYPES = {family[0].model_type: family for family in FAMILIES.values()}


def auto_map(config_class: type = ProxyVLlavaConfig) -> dict[str, str]:
    """The `auto_map` of a ProxyV config.json: where transformers finds the classes in the folder's code files."""
    _, base, head = PROXYV_MODEL_TYPES[config_class.model_type]
    return {
        "AutoConfig": f"configuration_proxyv.{config_class.__name__}",
        "AutoModel": f"modeling_proxyv.{base.__name__}",
        "AutoModelForImageTextToText": f"modeling_proxyv.{head.__name__}",
    }


AUTO_MAP = auto_map(ProxyVLlavaConfig)
ARCHITECTURE = "ProxyVLlavaForConditionalGeneration"

__all__ = [
    "AUTO_MAP",
    "CODE_FILES",
    "FAMILIES",
    "ProxyVLlavaConfig",
    "ProxyVLlavaForConditionalGeneration",
    "ProxyVLlavaModel",
    "ProxyVLlavaNextConfig",
    "ProxyVLlavaNextForConditionalGeneration",
    "ProxyVLlavaNextModel",
    "auto_map",
    "ProxyVModules",
    "canonical_code",
    "code_differences",
    "is_proxyv_folder",
    "load_model",
    "register_auto_classes",
]

_registered = False


def register_auto_classes() -> None:
    """Let transformers' Auto classes resolve `proxyv_llava` to the package's classes (no remote code needed), and
    make `save_pretrained` write the code files and `auto_map` into every folder it saves."""
    global _registered
    if _registered:
        return
    for config_class, base, head in FAMILIES.values():
        config_class.register_for_auto_class()
        base.register_for_auto_class("AutoModel")
        head.register_for_auto_class("AutoModelForImageTextToText")
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, head, exist_ok=True)
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
    import json

    config = Path(folder) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_proxyv_folder(folder: Path) -> bool:
    return folder_model_type(folder) in PROXYV_MODEL_TYPES


def load_model(
    folder: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> LlavaForConditionalGeneration:
    """Load a ProxyV folder with the package's classes, or a plain LLaVA folder with transformers' own class."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ProxyVError(f"{folder} is not a model folder (no config.json)")
    kwargs = {"dtype": dtype or "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if is_proxyv_folder(folder):
        stale = code_differences(folder)
        if stale:
            raise ProxyVError(
                f"{folder} carries code that differs from this proxyv version ({', '.join(stale)}); "
                "convert the model again with this version"
            )
        head = PROXYV_MODEL_TYPES[folder_model_type(folder)][2]
        model = head.from_pretrained(folder, **kwargs)
    else:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


register_auto_classes()
