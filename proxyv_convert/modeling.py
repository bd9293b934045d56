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
from .remote.configuration_proxyv import ProxyVLlavaConfig
from .remote.modeling_proxyv import ProxyVLlavaForConditionalGeneration, ProxyVLlavaModel, ProxyVModules

REMOTE_DIR = Path(__file__).parent / "remote"
CODE_FILES = ("configuration_proxyv.py", "modeling_proxyv.py")
AUTO_MAP = {
    "AutoConfig": "configuration_proxyv.ProxyVLlavaConfig",
    "AutoModel": "modeling_proxyv.ProxyVLlavaModel",
    "AutoModelForImageTextToText": "modeling_proxyv.ProxyVLlavaForConditionalGeneration",
}
ARCHITECTURE = "ProxyVLlavaForConditionalGeneration"

__all__ = [
    "AUTO_MAP",
    "CODE_FILES",
    "ProxyVLlavaConfig",
    "ProxyVLlavaForConditionalGeneration",
    "ProxyVLlavaModel",
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
    ProxyVLlavaConfig.register_for_auto_class()
    ProxyVLlavaModel.register_for_auto_class("AutoModel")
    ProxyVLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    AutoConfig.register(ProxyVLlavaConfig.model_type, ProxyVLlavaConfig, exist_ok=True)
    AutoModel.register(ProxyVLlavaConfig, ProxyVLlavaModel, exist_ok=True)
    AutoModelForImageTextToText.register(ProxyVLlavaConfig, ProxyVLlavaForConditionalGeneration, exist_ok=True)
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


def is_proxyv_folder(folder: Path) -> bool:
    import json

    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == ProxyVLlavaConfig.model_type
    except (OSError, ValueError):
        return False


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
        model = ProxyVLlavaForConditionalGeneration.from_pretrained(folder, **kwargs)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


register_auto_classes()
