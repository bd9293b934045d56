"""`proxyv push` against a loopback Hub (tests/hub_server.py): checks before upload, the two-commit push whose card pins
the model commit, idempotent and interrupted pushes, branches and pull requests, token secrecy, and a user without
proxyv loading the pushed model by repo id."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from hub_server import HubError, LocalHub
from huggingface_hub import HfApi
from PIL import Image
from tiny_models import save_tiny_llava
from typer.testing import CliRunner

from proxyv_convert import push as push_module
from proxyv_convert.card import pinned_revision
from proxyv_convert.cli import app
from proxyv_convert.convert import convert
from proxyv_convert.errors import ProxyVError
from proxyv_convert.model_folder import load_model
from proxyv_convert.push import push
from proxyv_convert.weights import write_proxyv_weights

TOKEN = "hf_pushTestSecret0123456789abcdef"
REPO = "local-user/tiny-proxyv"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny converted model whose ProxyV weights are non-zero, so that every comparison covers them."""
    root = tmp_path_factory.mktemp("push")
    out = root / "tiny-proxyv"
    convert(str(save_tiny_llava(root / "source", seed=3)), out, layer=2, progress=False)
    generator = torch.Generator().manual_seed(0)
    params = {f"model.proxyv.{n}": torch.randn(p.shape, generator=generator) * 0.05
              for n, p in load_model(out).model.proxyv.named_parameters()}
    write_proxyv_weights(out, params)
    return out


@pytest.fixture
def folder(converted, tmp_path) -> Path:
    return Path(shutil.copytree(converted, tmp_path / "tiny-proxyv"))


@pytest.fixture
def no_load_check(monkeypatch):
    """Skip the load-and-run subprocess (covered by its own tests) where a test is about the upload."""
    monkeypatch.setattr(push_module, "check_runs", lambda folder, progress=True: None)


def _push(hub: LocalHub, folder: Path, **kwargs):
    return push(folder, kwargs.pop("repo_id", REPO), endpoint=hub.url, token=kwargs.pop("token", TOKEN),
                progress=False, **kwargs)


def _commits(hub: LocalHub) -> list:
    return [r for r in hub.requests if "/commit/" in r.path and r.method == "POST"]


def _expected_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _pin(card: bytes) -> str:
    pin = pinned_revision(card.decode())
    assert pin is not None
    return pin


def _check_consistent(hub: LocalHub, folder: Path, revision: str = "main") -> dict[str, bytes]:
    """The repo holds exactly the folder's files, the card and .gitattributes, and the card pins a commit whose files
    are the same (minus the card)."""
    files = hub.files(REPO, revision=revision)
    assert {k: v for k, v in files.items() if k not in ("README.md", ".gitattributes")} == _expected_files(folder)
    pinned = hub.files(REPO, revision=_pin(files["README.md"]))
    assert {k: v for k, v in pinned.items() if k != "README.md"} == {
        k: v for k, v in files.items() if k != "README.md"
    }
    return files


# --- the round trip: CLI push, then a user without proxyv loads by repo id ------------------------------------------

USER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["proxyv_convert"] = None  # as on a machine where proxyv is not installed
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    snippet, repo, revision, image_path, out = sys.argv[1:]
    torch.set_num_threads(1)
    exec(snippet)  # the model card's usage example, as a user would paste it
    card_answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    model = AutoModelForImageTextToText.from_pretrained(repo, revision=revision, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(repo, revision=revision, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(repo, revision=revision, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = base(**inputs).last_hidden_state
    generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    torch.save({"logits": logits, "hidden": hidden, "generated": generated, "input_ids": inputs["input_ids"],
                "pixel_values": inputs["pixel_values"]}, out)
    print(json.dumps({"model": type(model).__module__, "base": type(base).__name__,
                      "processor": type(processor).__name__, "card_answer": card_answer}))
    """
)


def _snippet(card: str, image: Path) -> str:
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    url = re.search(r'load_image\("([^"]+)"\)', code).group(1)
    return code.replace(url, str(image))  # no internet here: the same call on a local image


@pytest.mark.slow
@pytest.mark.parametrize("local_hub", [{"token": TOKEN}], indirect=True)
def test_cli_push_then_a_user_without_proxyv_loads_by_repo_id(local_hub, folder, tmp_path):
    env = local_hub.env(tmp_path / "hf") | {"HF_TOKEN": TOKEN}
    pushed = subprocess.run([sys.executable, "-m", "proxyv_convert.cli", "push", folder, "--repo-id", REPO],
                            env=env, capture_output=True, text=True, timeout=300)

    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert TOKEN not in pushed.stdout + pushed.stderr
    files = _check_consistent(local_hub, folder)
    assert all(TOKEN.encode() not in data for data in files.values())
    pin = _pin(files["README.md"])
    assert set(local_hub.refs(REPO)) == {"main"} and pin != local_hub.refs(REPO)["main"]  # model commit, then card
    assert f"{local_hub.url}/{REPO}" in pushed.stdout and f'revision="{pin}"' in pushed.stdout
    assert "Next: AutoModelForImageTextToText.from_pretrained" in pushed.stdout
    assert "Checking that" in pushed.stderr  # progress of the load-and-run check

    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(image)
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    user_env = local_hub.env(tmp_path / "user-hf")  # no token: the repository is public
    user = subprocess.run(
        [sys.executable, script, _snippet(files["README.md"].decode(), image), REPO, pin, image, tmp_path / "out.pt"],
        cwd=tmp_path, env=user_env, capture_output=True, text=True, timeout=300,
    )
    assert user.returncode == 0, user.stderr[-3000:]
    info = json.loads(user.stdout.strip().splitlines()[-1])
    assert info["model"].startswith("transformers_modules.")
    assert (info["base"], info["processor"]) == ("ProxyVLlavaModel", "LlavaProcessor")
    assert isinstance(info["card_answer"], str)
    assert any(f"/{REPO}/resolve/{pin}/model-proxyv.safetensors" in r.path for r in local_hub.requests)

    torch.set_num_threads(1)
    outputs = torch.load(tmp_path / "out.pt")
    model = load_model(folder)
    with torch.no_grad():
        logits = model(input_ids=outputs["input_ids"], pixel_values=outputs["pixel_values"]).logits
    torch.testing.assert_close(outputs["logits"], logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.lm_head(outputs["hidden"]), logits, atol=1e-5, rtol=1e-5)
    generated = model.generate(input_ids=outputs["input_ids"], pixel_values=outputs["pixel_values"],
                               max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(outputs["generated"], generated)


# --- refusals: nothing reaches the Hub -------------------------------------------------------------------------------


def _not_proxyv(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "llava"}))


def _missing_shard(folder: Path) -> None:
    (folder / "model-00001-of-00001.safetensors").unlink()


def _truncated_shard(folder: Path) -> None:
    path = folder / "model-proxyv.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _edited_code(folder: Path) -> None:
    with open(folder / "modeling_proxyv.py", "a") as f:
        f.write("\n# a local tweak\n")


def _missing_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model-proxyv.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _no_processor(folder: Path) -> None:
    (folder / "processor_config.json").unlink()


@pytest.mark.parametrize(
    ("breaks", "message"),
    [
        (_not_proxyv, "is not a ProxyV model folder"),
        (_missing_shard, "model-00001-of-00001.safetensors listed in model.safetensors.index.json is missing"),
        (_truncated_shard, "model-proxyv.safetensors is not a valid safetensors file"),
        (_edited_code, "modeling_proxyv.py in .* differ from the ProxyV code"),
        (_missing_tensor, r"do not match its config: 1 tensors are missing \(model.proxyv."),
        (_no_processor, "has no processor_config.json or preprocessor_config.json"),
    ],
    ids=["not-proxyv", "missing-shard", "truncated-shard", "edited-code", "missing-tensor", "no-processor"],
)
def test_a_broken_folder_is_refused_before_any_request(local_hub, folder, monkeypatch, breaks, message):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("the static checks must catch this before the load-and-run check")

    monkeypatch.setattr(push_module, "check_runs", no_subprocess)
    breaks(folder)
    with pytest.raises(ProxyVError, match=message):
        _push(local_hub, folder)
    assert local_hub.requests == []


@pytest.mark.slow
def test_a_folder_whose_forward_fails_in_a_fresh_process_is_refused(local_hub, folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"image_token_index": 5}))  # not the processor's <image>
    with pytest.raises(ProxyVError) as refused:
        _push(local_hub, folder)
    message = str(refused.value)
    assert "failed the load-and-run check" in message and "nothing was uploaded" in message
    assert "at step 'run one forward pass'" in message
    assert re.search(r"Error: .*image tokens", message), message  # the subprocess's last error line
    assert local_hub.requests == []


# --- token --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("local_hub", [{"token": TOKEN}], indirect=True)
def test_the_token_never_appears_in_output_or_errors(local_hub, folder, no_load_check, monkeypatch):
    wrong = "hf_wrongTokenABCDEFGHIJ0123456789"
    result = CliRunner().invoke(app, ["push", str(folder), "--repo-id", REPO, "--endpoint", local_hub.url,
                                      "--token", wrong, "-q"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: the Hub at ") and "rejected the token" in result.stderr
    assert result.stderr.count("\n") == 1 and wrong not in result.output and TOKEN not in result.output
    assert not _commits(local_hub)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = CliRunner().invoke(app, ["push", str(folder), "--repo-id", REPO, "--endpoint", local_hub.url, "-q"])
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    assert all(TOKEN.encode() not in data for data in local_hub.files(REPO).values())
    assert all(TOKEN.encode() not in r.body and TOKEN not in r.path for r in local_hub.requests)

    def failing(*args, **kwargs):
        raise HubError(500, f"internal error while handling Bearer {TOKEN}")  # a server that echoes the header

    monkeypatch.setattr(local_hub, "handle", failing)
    with pytest.raises(ProxyVError) as refused:
        _push(local_hub, folder)
    assert TOKEN not in str(refused.value) and "***" in str(refused.value)


def test_no_token_or_offline_mode_is_refused_before_any_request(local_hub, folder, no_load_check, monkeypatch):
    with pytest.raises(ProxyVError, match="no Hugging Face token found: pass --token, set HF_TOKEN"):
        push(folder, REPO, endpoint=local_hub.url, progress=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ProxyVError, match="HF_HUB_OFFLINE is set, which blocks uploads"):
        _push(local_hub, folder)
    assert local_hub.requests == []


# --- repeated, interrupted, branch and pull-request pushes -----------------------------------------------------------


def test_repeated_push_changes_nothing_and_a_change_pushes_only_it(local_hub, folder, no_load_check):
    (folder / ".distill").mkdir()
    (folder / ".distill" / "state.pt").write_bytes(b"checkpoint")
    (folder / ".model-proxyv.safetensors.tmp").write_bytes(b"half written")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.pyc").write_bytes(b"cache")
    (folder / "README.md").write_text("an old card")
    first = _push(local_hub, folder)
    for junk in (".distill", ".model-proxyv.safetensors.tmp", "__pycache__", "README.md"):
        shutil.rmtree(folder / junk) if (folder / junk).is_dir() else (folder / junk).unlink()
    files = _check_consistent(local_hub, folder)
    assert not any(p.startswith((".distill", "__pycache__", ".model")) for p in files)
    assert files["README.md"].decode().startswith("---\n")  # the generated card, not the folder's README.md
    assert len(_commits(local_hub)) == 2 and first.revision != first.commit
    assert _pin(files["README.md"]) == first.revision and first.commit == local_hub.refs(REPO)["main"]

    requests = len(local_hub.requests)
    again = _push(local_hub, folder)
    assert (again.commit, again.revision, again.changed) == (first.commit, first.revision, ())
    assert len(_commits(local_hub)) == 2  # no commit: every file id matched
    assert not any(r.path.startswith("/api/models/" + REPO + "/commit") for r in local_hub.requests[requests:])
    assert local_hub.files(REPO) == files

    api = HfApi(endpoint=local_hub.url, token=TOKEN)  # a stale shard from an older conversion
    api.upload_file(path_or_fileobj=b"old", path_in_repo="model-00002-of-00002.safetensors", repo_id=REPO)
    report = {"model": str(folder), "data": "shapes", "steps": 3}
    (folder / "distill_report.json").write_text(json.dumps(report))
    changed = _push(local_hub, folder)
    assert changed.changed == ("README.md", "distill_report.json", "model-00002-of-00002.safetensors")
    assert changed.revision not in (first.revision, first.commit)
    _check_consistent(local_hub, folder)


@pytest.mark.parametrize("failing_commit", [1, 2], ids=["model-commit-fails", "card-commit-fails"])
def test_an_interrupted_push_completes_when_run_again(local_hub, folder, no_load_check, monkeypatch, failing_commit):
    handle, seen = local_hub.handle, []

    def flaky(method, target, headers, body):
        if method == "POST" and "/commit/" in target:
            seen.append(target)
            if len(seen) == failing_commit:
                raise HubError(500, "the connection was lost")
        return handle(method, target, headers, body)

    monkeypatch.setattr(local_hub, "handle", flaky)
    with pytest.raises(ProxyVError, match="refused the push: .*run the same command again"):
        _push(local_hub, folder)
    interrupted = local_hub.files(REPO)  # nothing, or the model without its card
    assert "README.md" not in interrupted and ("config.json" in interrupted) == (failing_commit == 2)

    result = _push(local_hub, folder)
    _check_consistent(local_hub, folder)
    assert result.commit == local_hub.refs(REPO)["main"]


def test_push_to_a_new_branch_and_as_a_pull_request(local_hub, folder, no_load_check):
    on_branch = _push(local_hub, folder, revision="dev", commit_message="ProxyV from layer 2")
    assert set(local_hub.refs(REPO)) == {"main", "dev"}
    assert set(local_hub.files(REPO)) == {".gitattributes"}  # main untouched
    _check_consistent(local_hub, folder, revision="dev")
    assert on_branch.commit == local_hub.refs(REPO)["dev"] and on_branch.pr_url is None
    titles = [json.loads(r.body.splitlines()[0])["value"]["summary"] for r in _commits(local_hub)]
    assert titles == ["ProxyV from layer 2", f"ProxyV from layer 2 (pins revision {on_branch.revision[:12]})"]

    proposed = _push(local_hub, folder, create_pr=True)
    assert proposed.pr_url == f"{local_hub.url}/{REPO}/discussions/1"
    assert local_hub.refs(REPO)["refs/pr/1"] == proposed.commit
    _check_consistent(local_hub, folder, revision="refs/pr/1")
    assert set(local_hub.files(REPO)) == {".gitattributes"}

    with pytest.raises(ProxyVError, match="--create-pr opens a pull request against main"):
        _push(local_hub, folder, create_pr=True, revision="dev")


def test_card_front_matter_of_a_pushed_model_is_yaml(local_hub, folder, no_load_check):
    _push(local_hub, folder, private=True)
    card = local_hub.files(REPO)["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and "proxyv" in meta["tags"]
    assert HfApi(endpoint=local_hub.url, token=TOKEN).model_info(REPO).private is True
