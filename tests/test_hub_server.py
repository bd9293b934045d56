"""LocalHub (tests/hub_server.py) against the real huggingface_hub, transformers and datasets clients."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import LocalHub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

FILES = {
    "config.json": b'{"hidden_size": 32}',
    "README.md": b"---\nlicense: mit\n---\n# tiny\n",
    "weights/model.bin": bytes(range(256)) * 40,
    "weights/nested/empty.txt": b"",
}
TOKEN = "hf_localhubTestToken0123456789"


def _folder(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _api(hub: LocalHub) -> HfApi:
    return HfApi(endpoint=hub.url, token=False)


def _download(hub: LocalHub, tmp_path: Path, repo_id: str, filename: str, **kwargs: object) -> bytes:
    kwargs.setdefault("token", False)
    path = hf_hub_download(repo_id, filename, endpoint=hub.url, cache_dir=tmp_path / "cache", **kwargs)
    return Path(path).read_bytes()


def _commit_requests(hub: LocalHub) -> list[list[dict]]:
    """NDJSON payloads of the commits the client sent, in order."""
    return [[json.loads(line) for line in r.body.splitlines()] for r in hub.requests if "/commit/" in r.path]


def test_upload_folder_round_trip(local_hub: LocalHub, tmp_path: Path) -> None:
    api = _api(local_hub)
    url = api.create_repo("user/tiny")
    assert (url.repo_id, url.endpoint) == ("user/tiny", local_hub.url)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("user/tiny")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("user/tiny", exist_ok=True).repo_id == "user/tiny"
    initial = api.repo_info("user/tiny").sha

    info = api.upload_folder(repo_id="user/tiny", folder_path=_folder(tmp_path / "src"))

    assert len(info.oid) == 40 and info.oid != initial
    assert api.repo_info("user/tiny").sha == info.oid
    assert sorted(api.list_repo_files("user/tiny")) == sorted([".gitattributes", *FILES])
    for name, data in FILES.items():
        assert _download(local_hub, tmp_path, "user/tiny", name) == data
    assert {k: v for k, v in local_hub.files("user/tiny").items() if k != ".gitattributes"} == FILES
    assert any(r.path == "/api/validate-yaml" for r in local_hub.requests)  # README.md metadata was checked
    assert [e.path for e in api.list_repo_tree("user/tiny", path_in_repo="weights")] == [
        "weights/nested",
        "weights/model.bin",
    ]


def test_snapshot_download_allow_patterns(local_hub: LocalHub, tmp_path: Path) -> None:
    api = _api(local_hub)
    api.create_repo("user/tiny")
    api.upload_folder(repo_id="user/tiny", folder_path=_folder(tmp_path / "src"))

    snapshot = Path(
        snapshot_download(
            "user/tiny", endpoint=local_hub.url, cache_dir=tmp_path / "cache", token=False,
            allow_patterns=["*.json", "weights/*.bin"],
        )
    )

    got = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert got == {"config.json": FILES["config.json"], "weights/model.bin": FILES["weights/model.bin"]}


def test_missing_repo_file_and_revision_raise_hub_errors(local_hub: LocalHub, tmp_path: Path) -> None:
    api = _api(local_hub)
    api.create_repo("user/tiny")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="user/tiny")

    with pytest.raises(RepositoryNotFoundError):
        _download(local_hub, tmp_path, "user/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/missing")
    with pytest.raises(RemoteEntryNotFoundError):
        _download(local_hub, tmp_path, "user/tiny", "absent.json")
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree("user/tiny", path_in_repo="no_such_folder"))
    with pytest.raises(RevisionNotFoundError):
        _download(local_hub, tmp_path, "user/tiny", "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/tiny", revision="no-such-branch")
    assert _download(local_hub, tmp_path, "user/tiny", "config.json") == b"{}"


def test_branch_and_pull_request_commits(local_hub: LocalHub, tmp_path: Path) -> None:
    api = _api(local_hub)
    api.create_repo("user/tiny")
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id="user/tiny")
    main_sha = api.repo_info("user/tiny").sha

    api.create_branch("user/tiny", branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id="user/tiny", revision="dev")
    assert "dev.txt" in api.list_repo_files("user/tiny", revision="dev")
    assert "dev.txt" not in api.list_repo_files("user/tiny")

    pr = api.create_commit(
        "user/tiny",
        operations=[CommitOperationAdd("pr.txt", b"proposed"), CommitOperationDelete(".gitattributes")],
        commit_message="propose",
        create_pr=True,
    )
    assert (pr.pr_revision, pr.pr_num) == ("refs/pr/1", 1)
    assert sorted(api.list_repo_files("user/tiny", revision=pr.pr_revision)) == ["a.txt", "pr.txt"]
    assert _download(local_hub, tmp_path, "user/tiny", "pr.txt", revision="refs/pr/1") == b"proposed"

    folder_pr = api.upload_folder(repo_id="user/tiny", folder_path=_folder(tmp_path / "src"), create_pr=True)
    assert folder_pr.pr_revision == "refs/pr/2"
    assert local_hub.files("user/tiny", revision="refs/pr/2")["weights/model.bin"] == FILES["weights/model.bin"]

    assert api.repo_info("user/tiny").sha == main_sha  # neither the branch nor the PRs touched main
    refs = api.list_repo_refs("user/tiny", include_pull_requests=True)
    assert sorted(b.name for b in refs.branches) == ["dev", "main"]
    assert {p.ref: p.target_commit for p in refs.pull_requests or []} == {
        "refs/pr/1": pr.oid,
        "refs/pr/2": folder_pr.oid,
    }


def test_reuploading_identical_files_is_idempotent(local_hub: LocalHub, tmp_path: Path) -> None:
    api = _api(local_hub)
    api.create_repo("user/tiny")
    src = _folder(tmp_path / "src")
    first = api.upload_folder(repo_id="user/tiny", folder_path=src)
    commits = len(_commit_requests(local_hub))

    again = api.upload_folder(repo_id="user/tiny", folder_path=src)
    same = api.create_commit(
        "user/tiny", operations=[CommitOperationAdd("config.json", FILES["config.json"])], commit_message="same"
    )

    assert again.oid == same.oid == first.oid == api.repo_info("user/tiny").sha
    assert len(_commit_requests(local_hub)) == commits  # preupload oids told the client nothing changed
    (src / "config.json").write_bytes(b'{"hidden_size": 64}')
    changed = api.upload_folder(repo_id="user/tiny", folder_path=src)
    assert changed.oid != first.oid
    assert [line["value"]["path"] for line in _commit_requests(local_hub)[-1][1:]] == ["config.json"]
    assert local_hub.files("user/tiny") == {
        **local_hub.files("user/tiny", revision=first.oid),
        "config.json": b'{"hidden_size": 64}',
    }


@pytest.mark.parametrize("local_hub", [{"token": TOKEN}], indirect=True)
def test_private_repo_needs_the_token_which_only_travels_in_authorization(
    local_hub: LocalHub, tmp_path: Path
) -> None:
    anonymous, authed = _api(local_hub), HfApi(endpoint=local_hub.url, token=TOKEN)
    with pytest.raises(HfHubHTTPError) as denied:
        anonymous.create_repo("user/secret", private=True)
    assert denied.value.response.status_code == 401

    authed.create_repo("user/secret", private=True)
    authed.upload_file(path_or_fileobj=b"s3cret", path_in_repo="s.txt", repo_id="user/secret")

    assert authed.whoami()["name"] == local_hub.user
    assert authed.model_info("user/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("user/secret")
    with pytest.raises(RepositoryNotFoundError):
        _download(local_hub, tmp_path, "user/secret", "s.txt")
    with pytest.raises(RepositoryNotFoundError):
        _download(local_hub, tmp_path, "user/secret", "s.txt", token="hf_wrong")
    assert _download(local_hub, tmp_path, "user/secret", "s.txt", token=TOKEN) == b"s3cret"

    with_token = [r for r in local_hub.requests if r.headers.get("authorization") == f"Bearer {TOKEN}"]
    assert {r.method for r in with_token} >= {"GET", "HEAD", "POST"}
    assert all(r.headers.get("authorization") != f"Bearer {TOKEN}" for r in local_hub.requests if r.status == 401)
    for r in local_hub.requests:
        assert TOKEN not in r.path and TOKEN.encode() not in r.body
        assert all(TOKEN not in value for name, value in r.headers.items() if name != "authorization")


def test_range_reads_through_hf_file_system(local_hub: LocalHub) -> None:
    data = bytes(range(256)) * 8
    api = _api(local_hub)
    api.create_repo("user/tiny")
    api.upload_file(path_or_fileobj=data, path_in_repo="blob.bin", repo_id="user/tiny")
    fs = HfFileSystem(endpoint=local_hub.url, token=False)

    with fs.open("user/tiny/blob.bin", "rb") as f:
        f.seek(1500)
        assert f.read(100) == data[1500:1600]
    assert any(r.status == 206 and r.headers.get("range", "").startswith("bytes=1500-") for r in local_hub.requests)


def _run(code: str, hub: LocalHub, tmp_path: Path) -> str:
    """Run `code` in a fresh interpreter that only knows the Hub through HF_ENDPOINT."""
    env = hub.env(tmp_path / "hf_home")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


TOKENIZER_JSON = {
    "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None, "decoder": None,
    "added_tokens": [{"id": 0, "content": "[UNK]", "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True}],
    "pre_tokenizer": {"type": "Whitespace"},
    "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"},
}


@pytest.mark.slow
def test_transformers_loads_config_and_tokenizer_by_repo_id(local_hub: LocalHub, tmp_path: Path) -> None:
    config = {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "vocab_size": 3}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}
    api = _api(local_hub)
    api.create_repo("user/tiny-llama")
    api.create_commit("user/tiny-llama", commit_message="tiny", operations=[
        CommitOperationAdd("config.json", json.dumps(config).encode()),
        CommitOperationAdd("tokenizer.json", json.dumps(TOKENIZER_JSON).encode()),
        CommitOperationAdd("tokenizer_config.json", json.dumps(tokenizer_config).encode()),
    ])

    out = _run(
        "import json; from transformers import AutoConfig, AutoTokenizer\n"
        "c = AutoConfig.from_pretrained('user/tiny-llama'); t = AutoTokenizer.from_pretrained('user/tiny-llama')\n"
        "print(json.dumps([c.model_type, c.hidden_size, t('hello world')['input_ids']]))",
        local_hub, tmp_path,
    )

    assert json.loads(out) == ["llama", 48, [1, 2]]
    paths = {r.path.split("?")[0] for r in local_hub.requests}
    assert "/api/models/user/tiny-llama/tree/main/additional_chat_templates" in paths  # answered 404 EntryNotFound


@pytest.mark.slow
def test_datasets_load_dataset_by_repo_id(local_hub: LocalHub, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"x": [1, 2, 3], "label": ["a", "b", "c"]}), buf)
    api = _api(local_hub)
    api.create_repo("user/tiny-ds", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=buf.getvalue(), path_in_repo="data/train-00000-of-00001.parquet",
        repo_id="user/tiny-ds", repo_type="dataset",
    )

    out = _run(
        "import json, datasets\n"
        "print(json.dumps(datasets.load_dataset('user/tiny-ds', split='train').to_dict()))",
        local_hub, tmp_path,
    )

    assert json.loads(out) == {"x": [1, 2, 3], "label": ["a", "b", "c"]}
    assert any(r.path.startswith("/datasets/user/tiny-ds/resolve/") and r.status == 200 for r in local_hub.requests)
