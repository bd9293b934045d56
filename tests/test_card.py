"""The model card: generated from the folder (config, recipe, weights, reports), valid YAML metadata, no placeholders,
and report sections only when the reports exist."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from tiny_models import save_tiny_llava
from typer.testing import CliRunner

from proxyv_convert.card import model_card, pinned_revision, transformers_requirement
from proxyv_convert.cli import app
from proxyv_convert.config import read_recipe
from proxyv_convert.convert import convert
from proxyv_convert.errors import ProxyVError

PLACEHOLDERS = re.compile(r"<[A-Za-z][^>]*>|TODO|TBD|More Information Needed|\[More|\{\{|\}\}|None\b|nan\b", re.I)
SHA = "0123456789abcdef0123456789abcdef01234567"

DISTILL_REPORT = {
    "model": "./tiny-proxyv", "data": "shapes", "settings": {"steps": 40, "batch_size": 8, "lr": 0.01, "seed": 0,
                                                             "kl_weight": 0.5, "gradient_checkpointing": True},
    "steps": 40, "wall_seconds": 12.7, "steps_per_second": 3.15, "device": "cpu",
    "loss_curve": [{"step": 1, "loss": 0.5123}, {"step": 40, "loss": 0.0312}],
    "before": {"cosine_vision": 0.8123, "cosine_text": 0.9561, "kl": 0.2345, "top1": 0.71, "examples": 16,
               "task": {"student_accuracy": 0.25, "teacher_accuracy": 0.875, "answer_agreement": 0.3125,
                        "examples": 16}},
    "after": {"cosine_vision": 0.9987, "cosine_text": 0.9995, "kl": 0.00042, "top1": 0.985, "examples": 16,
              "task": {"student_accuracy": 0.8125, "teacher_accuracy": 0.875, "answer_agreement": 0.9375,
                       "examples": 16}},
}
BENCH_REPORT = {
    "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "mode": "eager", "command": "proxyv bench ./m --batch 1",
    "cases": [{"batch": 1, "images": 1, "image_tokens": 576, "text_tokens": 64, "flops_ratio": 0.52,
               "prefill_ms": {"off": 44.5, "proxyv": 30.25}, "prefill_ratio": 0.68,
               "decode_ms_per_token": {"off": 34.6, "proxyv": 34.7}, "decode_ratio": 1.0,
               "peak_memory_mb": {"off": 14012.0, "proxyv": 14090.0}}],
}


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card")
    out = root / "tiny-proxyv"
    convert(str(save_tiny_llava(root / "llava-source")), out, layer=2, progress=False)
    return out


@pytest.fixture
def folder(local_model, tmp_path) -> Path:
    return Path(shutil.copytree(local_model, tmp_path / "tiny-proxyv"))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_card_of_a_hub_conversion_names_its_base_model_and_licence(tmp_path, local_hub, monkeypatch):
    source = save_tiny_llava(tmp_path / "source")
    (source / "README.md").write_text("---\nlicense: llama2\ntags:\n- llava\n---\n# tiny llava\n")
    api = HfApi(endpoint=local_hub.url)
    api.create_repo("llava-hf/tiny-llava-hf")
    api.upload_folder(repo_id="llava-hf/tiny-llava-hf", folder_path=source)
    download = functools.partial(huggingface_hub.snapshot_download, endpoint=local_hub.url, cache_dir=tmp_path / "c")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    convert("llava-hf/tiny-llava-hf", tmp_path / "m", layer=1, reduce_factor=6, progress=False)
    assert not (tmp_path / "m" / "README.md").exists()  # the source's card is read, never copied
    assert read_recipe(tmp_path / "m")[0]["model"]["license"] == "llama2"

    card = model_card(tmp_path / "m", repo_id="me/tiny-proxyv", revision=SHA)

    meta = front_matter(card)
    assert meta == {
        "license": "llama2",
        "base_model": "llava-hf/tiny-llava-hf",
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["proxyv", "llava", "image-text-to-text", "custom_code"],
    }
    assert ModelCard(card).data.to_dict()["base_model"] == "llava-hf/tiny-llava-hf"  # the Hub client parses it too
    sha = local_hub.refs("llava-hf/tiny-llava-hf")["main"]
    link = "[llava-hf/tiny-llava-hf](https://huggingface.co/llava-hf/tiny-llava-hf)"
    assert f"This is {link} (commit `{sha[:12]}`)" in card
    assert "ProxyV runs from decoder layer 1 of 4" in card
    assert "| Proxy tokens | 16 (4x4: the grid downsampled by 6 per side) |" in card
    assert pinned_revision(card) == SHA
    assert 'model_id, revision = "me/tiny-proxyv", "0123456789abcdef0123456789abcdef01234567"' in card
    assert "from_pretrained(model_id, revision=revision, trust_remote_code=True" in card
    command = f"proxyv convert llava-hf/tiny-llava-hf --layer 1 --reduce-factor 6 --dtype auto --out {tmp_path / 'm'}"
    assert command in card
    assert not PLACEHOLDERS.search(card), PLACEHOLDERS.search(card)


def test_card_without_reports_has_no_report_sections_and_no_placeholders(folder):
    card = model_card(folder)

    meta = front_matter(card)
    assert set(meta) == {"library_name", "pipeline_tag", "tags"}  # local source: no base_model; licence unknown
    assert "proxyv" in meta["tags"]
    assert "## Quality" not in card and "## Speed" not in card and "distill" not in card.lower()
    match = PLACEHOLDERS.search(card)
    assert match is None, match
    assert "the LLaVA checkpoint of a local folder (`llava-source`)" in card
    assert "decode speed and KV-cache memory are unchanged" in card
    assert "[Streamline Without Sacrifice, ICML 2025](https://arxiv.org/abs/2505.15816)" in card
    assert f"Needs `transformers{transformers_requirement()}`" in card and transformers_requirement().startswith(">=")
    assert f'model_id = "{folder.resolve()}"' in card and "revision" not in card.split("```python")[1].split("```")[0]
    assert "| Parameters | 233,856 (16,704 added by ProxyV) |" in card
    assert "| Weights dtype | float32 |" in card  # read from the weights, not the recipe's "auto"
    recipe = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe) == read_recipe(folder)[0]  # the resolved recipe, verbatim
    assert recipe.startswith("# proxyv convert ")


def test_card_shows_the_distillation_report(folder):
    (folder / "distill_report.json").write_text(json.dumps(DISTILL_REPORT))

    card = model_card(folder, repo_id="me/tiny-proxyv", revision=SHA)

    quality = card.split("## Quality\n")[1].split("\n## ")[0]
    assert ("Distilled for 40 steps on `shapes` in 13 s (cpu); the distillation loss went from 0.5123 (step 1) to "
            "0.0312 (step 40)") in quality
    assert "on 16 held-out examples (16 with answers, decoded greedily)" in quality
    for row in (
        "| Hidden-state cosine, vision tokens | 0.8123 | 0.9987 |",
        "| Hidden-state cosine, text tokens | 0.9561 | 0.9995 |",
        "| Next-token KL divergence (original ‖ ProxyV) | 0.2345 | 4.20e-04 |",
        "| Next-token top-1 agreement | 71.0% | 98.5% |",
        "| Answer accuracy, ProxyV | 25.0% | 81.2% |",
        "| Answer accuracy, original model | 87.5% | 87.5% |",
        "| Answers identical to the original model's | 31.2% | 93.8% |",
    ):
        assert row in quality, row
    command = "proxyv distill ./tiny-proxyv --data shapes --steps 40 --lr 0.01 --kl-weight 0.5 "
    command += "--gradient-checkpointing"
    assert command in card.split("## How this model was made")[1]
    assert "The resolved recipe (`recipe.yaml` with the distillation settings of `distill_report.json`;" in card
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe["distill"] == {"data": "shapes", **DISTILL_REPORT["settings"]}
    assert "## Speed" not in card
    assert not PLACEHOLDERS.search(card), PLACEHOLDERS.search(card)


def test_card_shows_the_evaluation_report(folder):
    report = {"accuracy": 0.75, "n": 4, "seconds": 1.0, "data": "merve/vqav2-small", "split": "validation[-500:]",
              "skipped_images": 1, "agreement": 0.5, "other": "original", "other_accuracy": 1.0, "examples": []}
    (folder / "eval_report.json").write_text(json.dumps(report))

    evaluation = model_card(folder).split("## Evaluation\n")[1].split("\n## ")[0]
    assert "on 4 examples of `merve/vqav2-small` (split `validation[-500:]`)" in evaluation
    assert "1 example(s) whose image did not decode were skipped" in evaluation
    for row in ("| Exact-match accuracy, ProxyV | 75.0% |",
                "| Exact-match accuracy, original model (ProxyV off) | 100.0% |",
                "| Answers identical to it | 50.0% |"):
        assert row in evaluation, row
    assert not PLACEHOLDERS.search(evaluation), PLACEHOLDERS.search(evaluation)


def test_card_shows_the_benchmark_report(folder):
    (folder / "bench_report.json").write_text(json.dumps(BENCH_REPORT))

    card = model_card(folder)

    speed = card.split("## Speed\n")[1].split("\n## ")[0]
    assert "Measured with `proxyv bench ./m --batch 1` on NVIDIA H100 80GB HBM3 (bfloat16, eager mode)" in speed
    assert "| 1 | 1 | 576 | 64 | 0.52 | 44.5 / 30.2 | 0.68 | 34.6 / 34.7 | 1.00 | 14012 / 14090 |" in speed
    assert "Decode speed and KV-cache memory are unchanged" in speed
    assert "## Quality" not in card

    language_model_only = {"batch": 8, "images": 1, "image_tokens": 576, "text_tokens": 64, "flops_ratio": 0.4,
                           "lm_prefill_ms": {"off": 144.0, "proxyv": 80.0}, "lm_prefill_ratio": 0.5556,
                           "prefill_ms": {}, "prefill_ratio": 0.0, "decode_ms_per_token": {}, "peak_memory_mb": {}}
    (folder / "bench_report.json").write_text(json.dumps(BENCH_REPORT | {"cases": [language_model_only]}))
    speed = model_card(folder).split("## Speed\n")[1]
    table = [
        "| Batch | Images | Image tokens | Text tokens | FLOPs ratio | Language-model prefill ms (off / ProxyV) "
        "| Language-model prefill ratio |",
        "|---|---|---|---|---|---|---|",
        "| 8 | 1 | 576 | 64 | 0.40 | 144.0 / 80.0 | 0.56 |",
    ]
    assert "\n".join(table) in speed


def test_card_command_prints_or_writes_the_card(folder):
    printed = CliRunner().invoke(app, ["card", str(folder), "--repo-id", "me/tiny-proxyv", "--revision", SHA])
    assert printed.exit_code == 0, printed.output
    assert printed.stdout == model_card(folder, repo_id="me/tiny-proxyv", revision=SHA)
    assert not (folder / "README.md").exists()

    written = CliRunner().invoke(app, ["card", str(folder), "--write"])
    assert written.exit_code == 0, written.output
    assert (folder / "README.md").read_text() == model_card(folder)
    assert f"Wrote {folder / 'README.md'}." in written.stdout and "Next: proxyv push" in written.stdout

    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    refused = CliRunner().invoke(app, ["card", str(folder)])
    assert refused.exit_code == 2
    assert refused.stderr == f"error: {folder} is not a ProxyV model folder; make one with `proxyv convert`\n"


def test_a_corrupt_report_is_a_user_error(folder):
    (folder / "distill_report.json").write_text("{not json")
    with pytest.raises(ProxyVError, match="distill_report.json is not valid JSON"):
        model_card(folder)


def test_a_report_without_its_fields_is_a_user_error(folder):
    (folder / "bench_report.json").write_text(json.dumps({"device": "cpu", "cases": [{"batch": 1}]}))
    with pytest.raises(ProxyVError, match=r"bench_report.json lacks expected fields \(KeyError: 'prefill_ms'\)"):
        model_card(folder)
