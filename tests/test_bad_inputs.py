"""Bad input through every command, as a careless or hostile user gives it: each is exit code 2, one line on stderr
naming the problem, and no file anywhere under the test's folder changed (nothing created, removed or rewritten)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import save_tiny_llava

from proxyv_convert.cli import main
from proxyv_convert.convert import convert

ROOT_CASES: list[tuple[str, list[str], str]] = []  # (id, arguments with {root} in them, expected text in the error)


def case(name: str, args: str | list[str], expected: str) -> None:
    ROOT_CASES.append((name, args.split() if isinstance(args, str) else args, expected))


# convert
case("convert-missing-source", "convert {root}/nope --layer 2 --out {root}/o", "does not exist")
case("convert-source-is-a-file", "convert {root}/data.jsonl --layer 2 --out {root}/o", "is a file")
case("convert-layer-too-high", "convert {root}/source --layer 99 --out {root}/o", "layer")
case("convert-layer-negative", "convert {root}/source --layer -1 --out {root}/o", "layer")
case("convert-factor-zero", "convert {root}/source --layer 2 --reduce-factor 0 --out {root}/o", "reduce")
case("convert-factor-not-dividing", "convert {root}/source --layer 2 --reduce-factor 5 --out {root}/o", "5")
case("convert-unknown-dtype", "convert {root}/source --layer 2 --dtype float8 --out {root}/o", "--dtype")
case("convert-unknown-proxy", "convert {root}/source --layer 2 --proxy magic --out {root}/o", "magic")
case("convert-zero-learned-proxies",
     "convert {root}/source --layer 2 --proxy learned --learned-proxies 0 --out {root}/o", "learned")
case("convert-huge-learned-proxies",
     "convert {root}/source --layer 2 --proxy learned --learned-proxies 1000000000 --out {root}/o", "learned")
case("convert-out-exists", "convert {root}/source --layer 2 --out {root}/model", "already exists")
case("convert-out-inside-source", "convert {root}/source --layer 2 --out {root}/source/inner", "inside")
case("convert-out-under-a-file", "convert {root}/source --layer 2 --out {root}/data.jsonl/o", "file")
case("convert-a-proxyv-model", "convert {root}/model --layer 2 --out {root}/o", "already a ProxyV model")
case("convert-invalid-config-json", "convert {root}/bad-json --layer 2 --out {root}/o", "JSON")
case("convert-text-config-not-a-dict", "convert {root}/bad-text-config --layer 2 --out {root}/o", "text_config")
case("convert-config-is-a-list", "convert {root}/config-list --layer 2 --out {root}/o", "config")
case("convert-no-weights", "convert {root}/no-weights --layer 2 --out {root}/o", "safetensors")
case("convert-truncated-weights", "convert {root}/truncated --layer 2 --out {root}/o", "model.safetensors")
case("convert-hostile-header", "convert {root}/hostile-header --layer 2 --out {root}/o", "model.safetensors")
case("convert-wrong-tensor-dtype", "convert {root}/int-weights --layer 2 --out {root}/o", "dtype")
case("convert-custom-code-config", "convert {root}/remote-code --layer 2 --out {root}/o", "--trust-remote-code")
case("convert-unsupported-model-type", "convert {root}/bert --layer 2 --out {root}/o", "bert")
case("convert-revision-of-a-folder", "convert {root}/source --layer 2 --revision main --out {root}/o", "--revision")
case("convert-not-a-hub-id", "convert a/b/c/d --layer 2 --out {root}/o", "does not exist")
case("convert-no-layer", "convert {root}/source --out {root}/o", "--layer")
case("convert-layer-not-a-number", "convert {root}/source --layer two --out {root}/o", "--layer")
# distill
case("distill-plain-llava", "distill {root}/source --data {root}/data.jsonl", "not a ProxyV model folder")
case("distill-missing-model", "distill {root}/nope --data {root}/data.jsonl", "not a ProxyV model folder")
case("distill-no-data", "distill {root}/model", "--data")
case("distill-missing-data", "distill {root}/model --data {root}/nope.jsonl", "does not exist")
case("distill-unknown-data-file", "distill {root}/model --data {root}/notes.txt", ".parquet, .jsonl or .json")
case("distill-zero-steps", "distill {root}/model --data {root}/data.jsonl --steps 0", "--steps")
case("distill-huge-steps", "distill {root}/model --data {root}/data.jsonl --steps 100000000000", "--steps")
case("distill-negative-lr", "distill {root}/model --data {root}/data.jsonl --lr -1", "--lr")
case("distill-infinite-lr", "distill {root}/model --data {root}/data.jsonl --lr inf", "--lr")
case("distill-nan-weight", "distill {root}/model --data {root}/data.jsonl --kl-weight nan", "--kl-weight")
case("distill-unknown-loss", "distill {root}/model --data {root}/data.jsonl --hidden-loss l1", "--hidden-loss")
case("distill-unknown-precision", "distill {root}/model --data {root}/data.jsonl --mixed-precision fp8",
     "--mixed-precision")
case("distill-zero-batch", "distill {root}/model --data {root}/data.jsonl --batch-size 0", "--batch-size")
case("distill-unknown-image-column", "distill {root}/model --data {root}/data.jsonl --image-column picture",
     "picture")
case("distill-unknown-prompt-column", "distill {root}/model --data {root}/data.jsonl --prompt-column q", "'q'")
case("distill-unknown-split", "distill {root}/model --data {root}/data.jsonl --train-split test", "'test'")
case("distill-malformed-split", "distill {root}/model --data {root}/data.jsonl --train-split train[1:2:3]",
     "split")
case("distill-overlapping-held-out",
     "distill {root}/model --data {root}/data.jsonl --train-split train[:3] --eval-split train[2:]", "shares")
case("distill-nothing-to-resume", "distill {root}/model --data {root}/data.jsonl --resume", "nothing to resume")
case("distill-out-exists", "distill {root}/model --data {root}/data.jsonl --out {root}/source", "already exists")
case("distill-one-row", "distill {root}/model --data {root}/one.jsonl", "at least 2")
case("distill-empty-jsonl", "distill {root}/model --data {root}/empty.jsonl", "empty.jsonl")
case("distill-non-utf8-jsonl", "distill {root}/model --data {root}/latin1.jsonl", "latin1.jsonl")
case("distill-undecodable-images", "distill {root}/model --data {root}/broken.jsonl", "no image could be decoded")
case("distill-absolute-image-path", "distill {root}/model --data {root}/absolute.jsonl", "absolute.jsonl")
case("distill-image-path-outside", "distill {root}/model --data {root}/escaping.jsonl", "escaping.jsonl")
case("distill-zero-threads", "distill {root}/model --data {root}/data.jsonl --threads 0", "--threads")
case("distill-too-long-prompts", "distill {root}/model --data {root}/data.jsonl --max-length 8", "--max-length")
# eval
case("eval-missing-model", "eval {root}/nope --data {root}/data.jsonl", "nope")
case("eval-missing-data", "eval {root}/model --data {root}/nope.jsonl", "does not exist")
case("eval-zero-limit", "eval {root}/model --data {root}/data.jsonl --split train --limit 0", "limit")
case("eval-zero-batch", "eval {root}/model --data {root}/data.jsonl --split train --batch-size 0", "batch")
case("eval-unknown-split", "eval {root}/model --data {root}/data.jsonl --split validation", "'validation'")
case("eval-no-answer-column", "eval {root}/model --data {root}/no-answer.jsonl --split train", "answer column")
case("eval-original-of-a-plain-llava",
     "eval {root}/source --data {root}/data.jsonl --split train --against-original", "ProxyV model")
case("eval-other-and-original",
     "eval {root}/model --data {root}/data.jsonl --split train --against-original --other {root}/source", "either")
# bench
case("bench-plain-llava", "bench {root}/source", "ProxyV model")
case("bench-missing-model", "bench {root}/nope", "ProxyV model")
case("bench-cuda-absent", "bench {root}/model --device cuda", "CUDA")
case("bench-unknown-device", "bench {root}/model --device tpu9", "--device")
case("bench-unknown-dtype", "bench {root}/model --dtype float8", "--dtype")
case("bench-unknown-attention", "bench {root}/model --attn flash", "--attn")
case("bench-huge-batch", "bench {root}/model --batch-sizes 10000", "batch")
case("bench-zero-batch", "bench {root}/model --batch-sizes 0", "batch")
case("bench-cuda-graph-on-cpu", "bench {root}/model --cuda-graph", "CUDA")
case("bench-two-modes", "bench {root}/model --cuda-graph --compile", "one")
case("bench-two-batch-values", "bench {root}/model --batch-sizes 1 8", "unexpected extra argument")
# push (HF_ENDPOINT points at a closed port: a request would not fail this way)
case("push-missing-folder", "push {root}/nope --repo-id me/m", "nope")
case("push-plain-llava", "push {root}/source --repo-id me/m", "not a ProxyV model folder")
case("push-bad-repo-id", "push {root}/model --repo-id me/bad!!name", "repo-id")
case("push-no-repo-id", "push {root}/model", "--repo-id")
case("push-pr-and-branch", "push {root}/model --repo-id me/m --create-pr --revision dev", "--create-pr")
case("push-symlink-out-of-the-folder", "push {root}/with-symlink --repo-id me/m", "symlink")
case("push-foreign-code", "push {root}/with-code --repo-id me/m", "evil.py")
case("push-token-with-newline", ["push", "{root}/model", "--repo-id", "me/m", "--token", "hf_a\nbc"], "token")
case("push-token-with-space", ["push", "{root}/model", "--repo-id", "me/m", "--token", "hf_a bc"], "token")
case("push-non-ascii-token", "push {root}/model --repo-id me/m --token hf_kéy", "token")
# card, run, validate, recipes
case("card-plain-llava", "card {root}/source", "not a ProxyV model folder")
case("card-broken-report", "card {root}/broken-report", "distill_report.json")
case("run-unknown-recipe", "run nope-recipe", "nope-recipe")
case("run-unknown-key", "run {root}/unknown-key.yaml", "unknown key")
case("run-invalid-yaml", "run {root}/invalid.yaml", "YAML")
case("run-non-utf8-recipe", "run {root}/latin1.yaml", "latin1.yaml")
case("run-malformed-override", "run {root}/good.yaml distill.steps", "section.key=value")
case("run-unknown-stage", "run {root}/good.yaml --skip distil", "distil")
case("validate-huge-steps", "validate {root}/good.yaml distill.steps=1e29", "steps")
case("validate-infinite-lr", "validate {root}/good.yaml distill.lr=.inf", "lr")
case("validate-layer-too-high", "validate {root}/good.yaml proxyv.start_layer=40", "layer")
case("validate-not-a-mapping", "validate {root}/list.yaml", "mapping")
case("recipes-show-unknown", "recipes show nope-recipe", "nope-recipe")
case("unknown-command", "frobnicate", "frobnicate")
case("unknown-option", "convert {root}/source --layer 2 --out {root}/o --colour red", "--colour")


def image(i: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Every folder and file the cases name, made once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    source = save_tiny_llava(root / "source", seed=1, layers=3, hidden=32)
    convert(str(source), root / "model", layer=2, progress=False)
    (root / "images").mkdir()
    for i in range(4):
        image(i).save(root / "images" / f"{i}.png")
    rows = [{"image": f"images/{i}.png", "question": "what is the colour", "answer": "red"} for i in range(4)]
    write_jsonl(root / "data.jsonl", rows)
    write_jsonl(root / "one.jsonl", rows[:1])
    write_jsonl(root / "no-answer.jsonl", [{"image": r["image"], "question": r["question"]} for r in rows])
    (root / "broken.png").write_bytes(b"not an image")
    write_jsonl(root / "broken.jsonl", [{**r, "image": "broken.png"} for r in rows])
    write_jsonl(root / "absolute.jsonl", [{**r, "image": str(root / r["image"])} for r in rows])
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    image(9).save(outside / "x.png")
    write_jsonl(root / "escaping.jsonl", [{**r, "image": f"../{outside.name}/x.png"} for r in rows])
    (root / "empty.jsonl").write_text("")
    (root / "latin1.jsonl").write_bytes('{"image": "images/0.png", "question": "caf\xe9"}\n'.encode("latin-1"))
    (root / "notes.txt").write_text("hello")

    def broken_source(name: str, change) -> None:
        shutil.copytree(source, root / name)
        change(root / name)

    def edit_config(**changes):
        def change(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text())
            config.update(changes)
            (folder / "config.json").write_text(json.dumps(config))
        return change

    broken_source("bad-json", lambda f: (f / "config.json").write_text("{not json"))
    broken_source("bad-text-config", edit_config(text_config="llama"))
    broken_source("config-list", lambda f: (f / "config.json").write_text("[1, 2]"))
    broken_source("no-weights", lambda f: (f / "model.safetensors").unlink())
    broken_source("truncated", lambda f: truncate(f / "model.safetensors"))
    broken_source("hostile-header", lambda f: nested_header(f / "model.safetensors"))
    broken_source("int-weights", lambda f: retype_first_float(f / "model.safetensors"))
    broken_source("remote-code", edit_config(auto_map={"AutoConfig": "custom.Config"}))
    broken_source("bert", edit_config(model_type="bert"))

    shutil.copytree(root / "model", root / "with-symlink")
    (root / "secret.txt").write_text("not for the Hub")
    (root / "with-symlink" / "notes.txt").symlink_to(root / "secret.txt")
    shutil.copytree(root / "model", root / "with-code")
    (root / "with-code" / "evil.py").write_text("open('pwned', 'w').write('x')\n")
    processor = json.loads((root / "with-code" / "processor_config.json").read_text())
    (root / "with-code" / "processor_config.json").write_text(json.dumps(
        {**processor, "auto_map": {"AutoProcessor": "evil.Processor"}}))
    shutil.copytree(root / "model", root / "broken-report")
    (root / "broken-report" / "distill_report.json").write_text("{broken")

    good = {"output": str(root / "run-out"), "model": {"source": str(source)},
            "proxyv": {"start_layer": 2}, "distill": {"data": str(root / "data.jsonl"), "steps": 1}}
    (root / "good.yaml").write_text(json.dumps(good))
    (root / "unknown-key.yaml").write_text(json.dumps({**good, "distil": {"steps": 1}}))
    (root / "invalid.yaml").write_text("model: [unclosed\n")
    (root / "latin1.yaml").write_bytes("# caf\xe9\nmodel: {source: x}\n".encode("latin-1"))
    (root / "list.yaml").write_text("- model\n- proxyv\n")
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def nested_header(path: Path) -> None:
    header = b"[" * 20000 + b"]" * 20000
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def retype_first_float(path: Path) -> None:
    """The first F32 tensor declared I32 (the same byte size): a header that lies about the dtype."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[name]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text)) if len(text) <= length else b""
    assert len(text) == length
    path.write_bytes(data[:8] + text + data[8 + length :])


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under `root`, with the size and modification time of each file (a folder's own time changes when
    a command takes its lock, which is no change to any file)."""
    return {str(p.relative_to(root)): None if p.is_dir() and not p.is_symlink() else (p.lstat().st_size,
            p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("name,args,expected", ROOT_CASES, ids=[c[0] for c in ROOT_CASES])
def test_bad_input(root, name, args, expected, capsys, monkeypatch, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # whatever a command might write in the working folder is seen too
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # caches (datasets') are not the user's files
    monkeypatch.setenv("HF_TOKEN", "hf_testTokenThatNeverLeaves")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed: no command may get as far as a request
    before, cwd_before = snapshot(root), snapshot(work)
    with pytest.raises(SystemExit) as exit_:
        main([arg.format(root=root) for arg in args])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, (exit_.value.code, out[-500:], err[-2000:])
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert expected in lines[0], lines[0]
    assert "hf_testTokenThatNeverLeaves" not in out + err and "hf_a" not in out + err and "hf_k" not in out + err
    assert snapshot(root) == before, "a bad input changed files"
    assert snapshot(work) == cwd_before, "a bad input wrote into the working folder"
    assert not (root / "with-code" / "pwned").exists() and not (work / "pwned").exists()


def test_at_least_sixty_distinct_bad_inputs_are_covered():
    assert len(ROOT_CASES) >= 60 and len({c[0] for c in ROOT_CASES}) == len(ROOT_CASES)
    commands = {args[0] for _, args, _ in ROOT_CASES}
    assert {"convert", "distill", "eval", "bench", "push", "card", "run", "validate", "recipes"} <= commands
