"""The built-in shapes task and the small LLaVA trained on it (`proxyv_convert/assets/llava-shapes`)."""

from pathlib import Path

from .task import KINDS, build_split, generate, load_shapes, render, shapes_dataset

MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "llava-shapes"

__all__ = ["KINDS", "MODEL_DIR", "build_split", "generate", "load_shapes", "render", "shapes_dataset"]
