"""lmms-eval's `proxyv` model (`lmms-eval --model proxyv --model_args pretrained=REPO_OR_FOLDER,...`): lmms-eval's own
`llava_hf` model, whose prompts, chat template, generation settings and scoring path it keeps, loading a ProxyV
model with the code in its repository.

`llava_hf` cannot load one by itself: it reads the config without `trust_remote_code` and knows the model types
llava, llava_next and llava_onevision only. Here the config is read with the repository's code and the model loaded
through `AutoModelForImageTextToText`; everything else is `llava_hf`'s. The model arguments are `llava_hf`'s (pin
`revision` to the commit you reviewed: its code runs), plus `proxyv_enabled` (default true; false computes what the
original LLaVA computes with the same weights). `device` defaults to CUDA when there is one, else the CPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from lmms_eval.models.chat.llava_hf import LlavaHf as LlavaHfChat
from lmms_eval.models.simple import llava_hf
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig


class ProxyV(LlavaHfChat):
    """`--model proxyv`: `llava_hf`'s chat model (messages through the processor's chat template), run as it is with a
    ProxyV model loaded. Its simple variant is left out: it passes the prompt as one string to chat templates that take
    a list of image and text items (as the llava-hf templates do), which then render no image token."""

    def __init__(self, pretrained: str, revision: str = "main", device: str | None = None,
                 proxyv_enabled: bool = True, **kwargs) -> None:
        config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=True)
        if not hasattr(config, "proxyv_enabled"):
            raise ValueError(f"{pretrained} is not a ProxyV model (model type {config.model_type!r}); "
                             "evaluate it with --model llava_hf")
        config.proxyv_enabled = bool(proxyv_enabled)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs["trust_remote_code"] = True  # the processor's code too (families with videos ship their own)
        with _llava_hf_loads(config):
            super().__init__(pretrained=pretrained, revision=revision, device=device, **kwargs)


@contextlib.contextmanager
def _llava_hf_loads(config: PretrainedConfig) -> Iterator[None]:
    """For the length of one `llava_hf.LlavaHf.__init__`: its `AutoConfig.from_pretrained(pretrained)` gives `config`
    and its `model_map[model_type].from_pretrained(...)` loads through `AutoModelForImageTextToText` with `config`."""
    saved_config, saved_models = llava_hf.AutoConfig, dict(llava_hf.model_map)
    llava_hf.AutoConfig = SimpleNamespace(from_pretrained=lambda *args, **kwargs: config)
    llava_hf.model_map[config.model_type] = SimpleNamespace(from_pretrained=functools.partial(_load, config=config))
    try:
        yield
    finally:
        llava_hf.AutoConfig = saved_config
        llava_hf.model_map.clear()
        llava_hf.model_map.update(saved_models)


def _load(pretrained: str, *, config: PretrainedConfig, torch_dtype="auto", device_map=None, **kwargs):
    # llava_hf passes transformers 4's `torch_dtype`, and `device_map=""` for "no device map", which transformers 5
    # refuses.
    return AutoModelForImageTextToText.from_pretrained(pretrained, config=config, dtype=torch_dtype,
                                                       device_map=device_map or None, **kwargs)
