"""Resolve SRC (a local folder or a Hub id) to a local checkpoint folder, and read what conversion needs from it.

A Hub id goes through `huggingface_hub.snapshot_download`, the path every user with internet takes: it honours
HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and the cache. Client errors become one-line ProxyVErrors.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import ProxyVError
from .families import FAMILIES
from .model_folder import CARD_FILE  # a source's card is read for its licence, never copied
from .safetensors_stream import INDEX_FILE

# Files the converted model needs beside its weights, copied unchanged (globs, relative to the checkpoint folder).
PROCESSOR_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "*.tiktoken", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "chat_template.json", "chat_template.jinja", "additional_chat_templates/*.jinja", "generation_config.json",
)  # fmt: skip
WEIGHT_PATTERNS = ("*.safetensors", INDEX_FILE)
LICENSE_KEYS = ("license", "license_name", "license_link")

if TYPE_CHECKING:
    from transformers import LlavaConfig


@dataclass(frozen=True)
class Source:
    """A checkpoint folder on disk and where it came from."""

    name: str  # the Hub id, or the folder's absolute path
    path: Path
    revision: str | None  # the commit a Hub id resolved to; None for a local folder
    hub: bool


def resolve_source(source: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Source:
    """A local folder as is; anything else that is a valid Hub id is fetched, without its weights (see
    `fetch_weights`), so that a bad config or option is caught before gigabytes are downloaded. `builtin:NAME` is a
    model that ships with proxyv."""
    from .config import resolve_model_source

    source = resolve_model_source(source)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ProxyVError(f"{source} is a file; SRC must be a model folder or a Hub id")
        if revision is not None:
            raise ProxyVError(f"--revision applies to Hub ids, but {source} is a local folder")
        return Source(str(path.resolve()), path.resolve(), None, hub=False)
    if _looks_local(source) or not _is_hub_id(source):
        raise ProxyVError(f"SRC {source} does not exist (neither a local folder nor a valid Hub id)")
    patterns = ["config.json", CARD_FILE, *PROCESSOR_PATTERNS] + (["*.py"] if trust_remote_code else [])
    folder = _download(source, revision, patterns)
    commit = folder.name if folder.parent.name == "snapshots" else revision
    return Source(source, folder, commit, hub=True)


def fetch_weights(source: Source) -> None:
    """Download a Hub source's safetensors files (from the same commit as its config) into its folder."""
    if source.hub:
        folder = _download(source.name, source.revision, list(WEIGHT_PATTERNS))
        assert folder == source.path, f"weights went to {folder}, the config to {source.path}"


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~", "\\")) or source.count("/") > 1


def _is_hub_id(source: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def suggest_hub_id(repo_id: str) -> str | None:
    """llava-hf publishes its transformers checkpoints with an `-hf` suffix (llava-hf/llava-1.5-7b-hf)."""
    owner, _, name = repo_id.rpartition("/")
    if owner == "llava-hf" and not name.endswith("-hf"):
        return f"{repo_id}-hf"
    return None


def _did_you_mean(repo_id: str) -> str:
    suggestion = suggest_hub_id(repo_id)
    return f"; did you mean '{suggestion}'?" if suggestion else ""


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, library_name="proxyv", library_version=__version__
        )
    except GatedRepoError:
        raise ProxyVError(
            f"model '{repo_id}' is gated: accept its licence on its Hub page, then log in (`hf auth login`) or set "
            "HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        hint = _did_you_mean(repo_id) or " (if it is private, log in or set HF_TOKEN)"
        raise ProxyVError(f"model '{repo_id}' was not found on the Hub and is not a local folder{hint}") from None
    except RevisionNotFoundError:
        raise ProxyVError(f"revision '{revision}' of model '{repo_id}' was not found on the Hub") from None
    except LocalEntryNotFoundError:
        raise ProxyVError(
            f"could not reach the Hub to download '{repo_id}', and it is not in the local cache; check the connection "
            f"(and HF_HUB_OFFLINE / HF_ENDPOINT), or pass a local folder: proxyv convert ./path/to/model ..."
            f"{_did_you_mean(repo_id)}"
        ) from None
    except HfHubHTTPError as e:
        raise ProxyVError(f"the Hub refused to download '{repo_id}': {str(e).splitlines()[0]}") from None
    return Path(folder)


def read_llava_config(source: Source, *, trust_remote_code: bool = False) -> LlavaConfig:
    """The source's LlavaConfig or LlavaNextConfig; refuses other model types and, without trust_remote_code, configs
    with custom code."""
    from .config import load_model_config, read_config_json

    config_path = source.path / "config.json"
    if not config_path.is_file():
        raise ProxyVError(f"{source.name} is not a model folder (no config.json)")
    raw = read_config_json(config_path)
    model_type = raw.get("model_type")
    supported = ", ".join(FAMILIES)
    if str(model_type).startswith("proxyv_"):
        raise ProxyVError(f"{source.name} is already a ProxyV model; convert the LLaVA checkpoint it came from")
    if "AutoConfig" in raw.get("auto_map", {}) and not trust_remote_code:
        raise ProxyVError(
            f"{source.name} needs custom code to read its config ({raw['auto_map']['AutoConfig']}); pass "
            "--trust-remote-code if you trust it"
        )
    if model_type not in FAMILIES and "auto_map" not in raw:
        raise ProxyVError(f"{source.name} is a '{model_type}' checkpoint; proxyv converts model types: {supported}")
    config = load_model_config(config_path, trust_remote_code=trust_remote_code)
    if config.model_type not in FAMILIES:
        raise ProxyVError(
            f"{source.name} has a {type(config).__name__} config; proxyv converts model types: {supported}"
        )
    return config


def processor_files(folder: Path) -> list[Path]:
    """The processor, tokenizer, chat template and generation config files of a checkpoint (relative paths)."""
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return [f for f in files if any(fnmatch.fnmatch(f.as_posix(), pattern) for pattern in PROCESSOR_PATTERNS)]


def source_license(folder: Path) -> dict[str, str]:
    """The licence metadata (`license`, and `license_name`/`license_link` for "other") of a checkpoint's model card
    front matter; empty when there is no card or it names no licence."""
    import yaml

    path = folder / CARD_FILE
    if not path.is_file():
        return {}
    lines = path.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---" or "---" not in (line.strip() for line in lines[1:]):
        return {}
    end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    if not isinstance(meta, dict) or not isinstance(meta.get("license"), str):
        return {}
    return {key: str(meta[key]) for key in LICENSE_KEYS if isinstance(meta.get(key), str)}
