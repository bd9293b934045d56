"""A converted folder loads anywhere with plain transformers and `trust_remote_code=True`, without proxyv installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_llava, save_tiny_llava_next
from transformers import AutoProcessor

from proxyv_convert.convert import convert
from proxyv_convert.model_folder import canonical_code, load_model

USER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["proxyv_convert"] = None  # as on a machine where proxyv is not installed
    try:
        import proxyv_convert  # noqa: F401
        raise SystemExit("proxyv_convert must not be importable here")
    except ImportError:
        pass
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    folder, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = base(**inputs).last_hidden_state
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    torch.save({"logits": logits, "hidden": hidden, "generated": generated, "inputs": dict(inputs)}, out)
    print(json.dumps({"model": type(model).__module__ + "." + type(model).__name__,
                      "base": type(base).__name__, "processor": type(processor).__name__}))
    """
)


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def converted(tmp_path_factory, request) -> Path:
    root = tmp_path_factory.mktemp("remote")
    save = save_tiny_llava if request.param == "llava" else save_tiny_llava_next
    source = save(root / "source", seed=5)
    out = root / "converted"
    convert(str(source), out, layer=2, progress=False)
    # Give the ProxyV weights non-zero values so that the comparison below covers them.
    model = load_model(out)
    with torch.no_grad():
        for param in model.model.proxyv.parameters():
            param.normal_(0.0, 0.05)
    model.save_pretrained(out)
    return out


def run_as_user(folder: Path, tmp_path: Path) -> tuple[dict, dict]:
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), torch.load(tmp_path / "out.pt")


def test_fresh_process_loads_and_matches(converted, tmp_path):
    info, outputs = run_as_user(converted, tmp_path)
    torch.set_num_threads(1)
    model = load_model(converted)
    family = type(model).__name__.removesuffix("ForConditionalGeneration")  # ProxyVLlava or ProxyVLlavaNext
    assert info["model"].startswith("transformers_modules.") and info["model"].endswith(
        f"{family}ForConditionalGeneration"
    )
    assert info["base"] == f"{family}Model"
    assert info["processor"] == family.removeprefix("ProxyV") + "Processor"
    inputs = outputs["inputs"]
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(outputs["logits"], logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.lm_head(outputs["hidden"]), logits, atol=1e-5, rtol=1e-5)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(outputs["generated"], generated)


def test_saved_folder_keeps_the_canonical_code(converted):
    """save_pretrained (as distillation does) writes the same code files and auto_map."""
    for name, data in canonical_code().items():
        assert (converted / name).read_bytes() == data
    config = json.loads((converted / "config.json").read_text())
    family = "ProxyVLlavaNext" if config["model_type"] == "proxyv_llava_next" else "ProxyVLlava"
    assert config["auto_map"]["AutoModelForImageTextToText"] == f"modeling_proxyv.{family}ForConditionalGeneration"
    assert config["auto_map"]["AutoModel"] == f"modeling_proxyv.{family}Model"


def test_processor_loads_from_converted_folder(converted):
    processor = AutoProcessor.from_pretrained(converted)
    image = Image.fromarray(np.zeros((96, 96, 3), dtype=np.uint8))
    inputs = processor(images=image, text="user : <image> what", return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    if "image_sizes" in inputs:  # LLaVA-NeXT: the count comes from the model's own layout of this image
        model = load_model(converted)
        assert image_tokens == model.model.image_layout(inputs["image_sizes"][0].tolist())[0]
    else:
        assert image_tokens == 576
