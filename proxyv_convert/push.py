"""`proxyv push`: check a ProxyV model folder, then publish it with its model card to the Hugging Face Hub.

Every check runs before the first request to the Hub: the token fits an HTTP header, the folder is a ProxyV model with
no symbolic link in it, its only code is the package's own (the code files byte for byte, no other `.py` file, no
`auto_map` naming another module), its safetensors are complete and hold every tensor the model needs, its processor
files are there, and a fresh Python process without proxyv loads it with `trust_remote_code=True` and runs one forward
pass.

A push is two commits. The first holds the model (weights, config, code, processor files, recipe, reports); the
second adds the model card, whose usage snippet pins `revision=` to the first commit, so users pin the exact code and
weights the card describes (a card cannot name the commit that contains it). Pushing an unchanged folder again makes
no commit: the client skips files whose ids the Hub already has, and the card pins the same commit as before.
Each commit is atomic on the Hub, so an interrupted push leaves the repository as it was or with the model but an
older card; running the push again completes it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import torch

from . import __version__
from .card import model_card, pinned_revision
from .convert import target_name
from .errors import ProxyVError
from .model_folder import CARD_FILE, CODE_FILES, code_differences, folder_family
from .safetensors_stream import read_checkpoint
from .source import processor_files

# Never uploaded: dot files and folders (the `.distill/` checkpoints, temporary files of atomic writes, caches),
# Python caches and editor/temporary files. README.md is replaced by the generated card.
IGNORED = (".*", "__pycache__", "*.pyc", "*.tmp", "*.lock", "*.swp", "*~")
# Files on the Hub that a push replaces or deletes when the folder no longer has them: stale weights, configs, code
# or reports would mislead loaders and readers. Anything else a user added to the repository is left alone.
MANAGED = ("*.safetensors", "*.json", "*.py", "*.yaml", "*.jinja")
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# An `auto_map` entry may only name a class of the package's own code files: any other module (or a
# "repo--module.Class" reference to another repository) is code that trust_remote_code would import unchecked.
CODE_MODULES = "|".join(name.removesuffix(".py") for name in CODE_FILES)
AUTO_MAP_ENTRY = re.compile(rf"(?:{CODE_MODULES})\.[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class PushResult:
    """What `push` did."""

    repo_id: str
    repo_url: str
    commit: str  # head of the pushed branch (or pull request) after the push
    commit_url: str
    revision: str  # the commit to pin: it holds the model files, and the card's snippet names it
    pr_url: str | None
    files: tuple[str, ...]  # repository paths pushed from the folder, README.md (the card) included
    changed: tuple[str, ...]  # paths this push added, changed or deleted on the Hub (empty when all was up to date)


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> PushResult:
    """Check the ProxyV model in `folder`, then upload it with a generated model card to `repo_id` (created when
    missing), on branch `revision` (created from main when missing) or as a pull request against main.

    The token is `token`, else HF_TOKEN, else the saved login; it is never printed nor written anywhere. Raises
    ProxyVError, before anything is sent, when a check fails.
    """
    folder = Path(folder)
    _check_options(repo_id, revision, create_pr)
    token = _resolve_token(token)
    files = check_folder(folder)
    check_runs(folder, progress=progress)
    with _hub_errors(token, endpoint), _quiet_hub(progress):
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token, library_name="proxyv", library_version=__version__)
        return _upload(api, folder, files, repo_id, private=private, branch=revision, create_pr=create_pr,
                       commit_message=commit_message)


# --- checks ----------------------------------------------------------------------------------------------------------


def _check_options(repo_id: str, revision: str | None, create_pr: bool) -> None:
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if constants.HF_HUB_OFFLINE:
        raise ProxyVError("HF_HUB_OFFLINE is set, which blocks uploads; unset it to push")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ProxyVError(
            f"--repo-id {repo_id} is not a valid Hub repository id (like 'your-name/model-name')"
        ) from None
    if create_pr and revision not in (None, "main"):
        raise ProxyVError("--create-pr opens a pull request against main; it cannot be combined with --revision")


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    # Surrounding whitespace (a pasted newline) is dropped; what is left must fit an HTTP header, and the message
    # never shows the token, not even in part.
    token = ((token or "").strip() or get_token() or "").strip()
    if not token:
        raise ProxyVError("no Hugging Face token found: pass --token, set HF_TOKEN, or log in with `hf auth login`")
    if not all("!" <= c <= "~" for c in token):
        raise ProxyVError(
            "the Hugging Face token (from --token, HF_TOKEN or the saved login) contains spaces, control characters "
            "or non-ASCII characters, which no Hub token has; copy the token again from your Hub account settings"
        )
    return token


def check_folder(folder: Path) -> list[str]:
    """Run the checks that need no subprocess; returns the files to upload (relative POSIX paths, card excluded)."""
    if not folder.is_dir():
        raise ProxyVError(f"{folder} is not a folder")
    check_links(folder)
    if folder_family(folder) is None:
        raise ProxyVError(
            f"{folder} is not a ProxyV model folder (its config.json has no ProxyV model_type); "
            "make one with `proxyv convert`"
        )
    check_code(folder)
    check_weights(folder)
    check_processor(folder)
    model_card(folder)  # a report the card cannot render fails here, not between the two commits
    return upload_files(folder)


def _shown(path: Path | str) -> str:
    """A path for a one-line message: as is, or escaped when it holds a newline or other unprintable character."""
    text = str(path)
    return text if text.isprintable() else ascii(text)


def _link_error(path: Path, folder: Path) -> ProxyVError:
    return ProxyVError(
        f"{_shown(path)} is a symbolic link, and push uploads only regular files inside {_shown(folder)}; replace the "
        "link with a copy of what it points to, or delete it"
    )


def check_links(folder: Path) -> None:
    """No symbolic link anywhere in `folder` (dangling, to a file or folder, inside it or not): the upload and the
    load check would read whatever the link points to, possibly outside the folder."""
    for root, dirs, names in os.walk(folder):  # does not descend into linked folders
        for name in sorted(dirs + names):
            if (path := Path(root, name)).is_symlink():
                raise _link_error(path, folder)


def check_code(folder: Path) -> None:
    """The only code in `folder` is the package's: its code files byte for byte, no other `.py` file at any depth,
    and no `auto_map` (in any top-level JSON file) naming another module, which trust_remote_code would import."""
    stale = code_differences(folder)
    if stale:
        raise ProxyVError(
            f"{', '.join(stale)} in {folder} differ from the ProxyV code of proxyv {__version__} (missing, edited or "
            "from another version); convert the model again with this version"
        )
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() == ".py" and path.relative_to(folder).as_posix() not in CODE_FILES:
            raise ProxyVError(
                f"{_shown(path)} is Python code that proxyv did not write, and a ProxyV model carries only "
                f"{', '.join(CODE_FILES)}; move it out of the folder and push again"
            )
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".json" and p.is_file()):
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            continue  # transformers cannot read an auto_map from it either
        problem = _auto_map_problem(data)
        if problem:
            raise ProxyVError(
                f"{_shown(path)} has an auto_map that {problem}; a ProxyV model's auto_map names only classes of "
                f"{', '.join(CODE_FILES)}: remove the entry or convert the model again"
            )


def _auto_map_problem(data: object) -> str | None:
    """What is wrong with the `auto_map`s anywhere in parsed JSON `data`; None when every entry is a "module.Class"
    reference (or a list of them and nulls, as tokenizers have) into the package's code files."""
    stack = [data]
    while stack:  # no recursion: JSON may nest deeper than Python's recursion limit allows
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        if not isinstance(item, dict):
            continue
        stack.extend(item.values())
        if "auto_map" not in item:
            continue
        auto_map = item["auto_map"]
        if not isinstance(auto_map, dict):
            return f"is {json.dumps(auto_map)[:80]}, not a mapping from Auto class names to 'module.Class' references"
        for key, value in auto_map.items():
            references = value if isinstance(value, list) else [value]
            if not isinstance(value, str | list) or not all(r is None or isinstance(r, str) for r in references):
                return f"maps {key!r} to {json.dumps(value)[:80]}, not a 'module.Class' reference or a list of them"
            for reference in references:
                if reference is not None and not AUTO_MAP_ENTRY.fullmatch(reference):
                    return f"maps {key!r} to {reference[:80]!r}, code that proxyv did not write"
    return None


def check_weights(folder: Path) -> None:
    """Every tensor the model needs is stored once, with its shape, in valid safetensors files."""
    stored = read_checkpoint(folder)  # names a missing shard or a corrupt/truncated file
    if not stored:
        raise ProxyVError(f"{folder} has no safetensors weights (model.safetensors or model.safetensors.index.json)")
    try:
        family = folder_family(folder)
        config = family.config.from_pretrained(folder)
        with torch.device("meta"):
            model = family.head(config)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ProxyVError(f"{folder / 'config.json'} does not describe a valid ProxyV model: {e}") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    vision = "vision_model." if any(k.startswith("model.vision_tower.vision_model.") for k in expected) else ""
    found: dict[str, str] = {}
    problems = []
    for key, info in stored.items():
        name = key if key in expected else target_name(key, vision, family.key_rules)
        if name not in expected:
            continue  # transformers ignores unexpected tensors (e.g. old rotary buffers)
        if info.shape != expected[name]:
            problems.append(f"{key} in {info.path.name} is {list(info.shape)}, expected {list(expected[name])}")
        found[name] = key
    tied = set(model.all_tied_weights_keys)  # may be absent: transformers ties them on load
    missing = [n for n in expected if n not in found and n not in tied]
    if missing:
        problems.append(f"{len(missing)} tensors are missing ({', '.join(missing[:3])}{', ...' * (len(missing) > 3)})")
    if problems:
        raise ProxyVError(f"the weights in {folder} do not match its config: {'; '.join(problems[:3])}")


def check_processor(folder: Path) -> None:
    names = {p.as_posix() for p in processor_files(folder)}
    missing = [
        " or ".join(group) for group in (PROCESSOR_CONFIGS, TOKENIZER_FILES) if not any(n in names for n in group)
    ]
    if missing:
        raise ProxyVError(
            f"{folder} has no {' and no '.join(missing)}: users could not build inputs; convert again from a "
            "checkpoint that has its processor and tokenizer files"
        )


def upload_files(folder: Path) -> list[str]:
    """The folder's files that a push uploads, as relative POSIX paths (README.md is the generated card instead)."""
    files = []
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not path.resolve().is_relative_to(root):  # never upload what lies outside
            raise _link_error(path, folder)
        relative = PurePosixPath(path.relative_to(folder).as_posix())
        if not path.is_file() or str(relative) == CARD_FILE:
            continue
        if any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in IGNORED):
            continue
        files.append(str(relative))
    return files


CHECK_SCRIPT = r"""
import json, sys, traceback
sys.modules["proxyv_convert"] = None  # as for a user without proxyv: the folder's own code must be enough
step = "import torch and transformers"
try:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = sys.argv[1]
    step = "load the model with AutoModelForImageTextToText.from_pretrained(trust_remote_code=True)"
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    step = "load the processor with AutoProcessor.from_pretrained"
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    step = "build an input (a noise image and a prompt) with the processor's chat template"

    def side(size):
        get = (size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)) if size else None
        if get and get("height") and get("width"):
            return get("height"), get("width")
        if get and get("shortest_edge"):
            return get("shortest_edge"), get("shortest_edge")
        return None

    images = processor.image_processor
    crop = getattr(images, "crop_size", None) if getattr(images, "do_center_crop", False) else None
    height, width = side(crop) or side(getattr(images, "size", None)) or (336, 336)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device, dtype=model.dtype)
    step = "run one forward pass"
    with torch.no_grad():
        logits = model(**inputs).logits
    if not torch.isfinite(logits).all():
        raise ValueError("the logits are not finite")
except Exception as error:
    message = "".join(traceback.format_exception_only(error)).strip().splitlines()
    print(json.dumps({"step": step, "error": message[0] if message else type(error).__name__}))
    raise SystemExit(1)
print(json.dumps({"logits": list(logits.shape), "class": type(model).__module__ + "." + type(model).__name__}))
"""


def check_runs(folder: Path, *, progress: bool = True) -> None:
    """Load `folder` as a user without proxyv would (a fresh process, `trust_remote_code=True`, offline, no token)
    and run one forward pass on a real processor input; raise ProxyVError naming the failed step."""
    check_links(folder)
    check_code(folder)  # trust_remote_code imports what the folder names: only the package's code, checked first
    if progress:
        print(f"Checking that {folder} loads and runs in a fresh process with trust_remote_code=True...",
              file=sys.stderr)
    dropped = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE")
    with tempfile.TemporaryDirectory(prefix="proxyv-check-") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env.update(HF_HUB_OFFLINE="1", HF_HOME=str(Path(tmp) / "hf"), TOKENIZERS_PARALLELISM="false")
        done = subprocess.run(
            [sys.executable, "-c", CHECK_SCRIPT, str(folder.resolve())],
            cwd=tmp, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        )
    lines = done.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {}
    if done.returncode == 0 and "logits" in report:
        return
    step = report.get("step", "run the check")
    last = report.get("error") or next(
        (line for line in reversed(done.stderr.splitlines()) if line.strip()), f"exit code {done.returncode}"
    )
    raise ProxyVError(
        f"{folder} failed the load-and-run check (a fresh Python process without proxyv, trust_remote_code=True) "
        f"at step '{step}': {last.strip()}; nothing was uploaded"
    )


# --- upload ----------------------------------------------------------------------------------------------------------


def _upload(api, folder: Path, files: list[str], repo_id: str, *, private: bool, branch: str | None,
            create_pr: bool, commit_message: str | None) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = repo_url.repo_id
    if branch and branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    branch = branch or "main"
    head = api.repo_info(repo_id, revision=branch).sha
    before = _remote_files(api, repo_id, head)
    stale = [p for p in before if p not in files and p != CARD_FILE and _managed(p)]
    operations = [CommitOperationDelete(p) for p in stale]
    operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in files]
    message = commit_message or f"Upload the ProxyV model {folder.resolve().name} (proxyv {__version__})"
    model_commit = api.create_commit(repo_id, operations=operations, commit_message=message, revision=branch,
                                     create_pr=create_pr, parent_commit=head)
    model_changed = model_commit.oid != head
    pin = model_commit.oid if model_changed else (_previous_pin(api, repo_id, head, before) or head)
    card = model_card(folder, repo_id=repo_id, revision=pin)
    card_ref = model_commit.pr_revision or branch
    card_commit = api.create_commit(
        repo_id, operations=[CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode())],
        commit_message=f"{commit_message or 'Model card'} (pins revision {pin[:12]})", revision=card_ref,
        create_pr=create_pr and model_commit.pr_revision is None,
        parent_commit=model_commit.oid if model_changed else head,
    )
    after = _remote_files(api, repo_id, card_commit.oid)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    return PushResult(
        repo_id=repo_id,
        repo_url=str(repo_url),
        commit=card_commit.oid,
        commit_url=card_commit.commit_url,
        revision=pin,
        pr_url=card_commit.pr_url or model_commit.pr_url,
        files=tuple(sorted([*files, CARD_FILE])),
        changed=tuple(changed),
    )


def _managed(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in MANAGED)


def _remote_files(api, repo_id: str, revision: str) -> dict[str, str]:
    """{path: blob id} of the files at `revision`."""
    from huggingface_hub.hf_api import RepoFile

    tree = api.list_repo_tree(repo_id, revision=revision, recursive=True)
    return {entry.path: entry.blob_id for entry in tree if isinstance(entry, RepoFile)}


def _previous_pin(api, repo_id: str, head: str, files: dict[str, str]) -> str | None:
    """The commit the card at `head` pins, when its model files are those at `head` (so an unchanged push keeps the
    card, and makes no commit)."""
    from huggingface_hub.errors import HfHubHTTPError

    if CARD_FILE not in files:
        return None
    with tempfile.TemporaryDirectory(prefix="proxyv-card-") as tmp:
        card = Path(api.hf_hub_download(repo_id, CARD_FILE, revision=head, cache_dir=tmp)).read_text()
    pin = pinned_revision(card)
    if pin is None:
        return None
    try:
        pinned = _remote_files(api, repo_id, pin)
    except HfHubHTTPError:
        return None
    without_card = {p: oid for p, oid in files.items() if p != CARD_FILE}
    return pin if {p: o for p, o in pinned.items() if p != CARD_FILE} == without_card else None


# --- errors and noise ------------------------------------------------------------------------------------------------


def redact(text: str, token: str | None) -> str:
    """`text` with `token` replaced by ***: as given, stripped, escaped (repr, ascii, JSON, bytes, URL), or cut short
    (an `hf_` word sharing its first 12 or more characters)."""
    if not token:
        return text
    forms = set()
    for secret in {token, token.strip()}:
        forms |= {secret, repr(secret)[1:-1], ascii(secret)[1:-1], json.dumps(secret)[1:-1],
                  repr(secret.encode("utf-8", "backslashreplace"))[2:-1], quote(secret, safe="")}
    for form in sorted(forms - {""}, key=len, reverse=True):
        text = text.replace(form, "***")
    stripped = token.strip()

    def cut(match: re.Match) -> str:
        shared = len(os.path.commonprefix([match[0], stripped]))
        return "***" + match[0][shared:] if shared >= 12 else match[0]

    return re.sub(r"hf_\w+", cut, text)


@contextlib.contextmanager
def _hub_errors(token: str, endpoint: str | None) -> Iterator[None]:
    """Client errors -> one-line ProxyVErrors, and no exception leaves with the token in its message."""
    import huggingface_hub.errors as hub_errors
    from huggingface_hub import constants

    where = endpoint or constants.ENDPOINT
    transport = getattr(hub_errors, "HTTPError", OSError)
    try:
        yield
    except ProxyVError as e:
        raise ProxyVError(redact(str(e), token), exit_code=e.exit_code) from None
    except hub_errors.OfflineModeIsEnabled:
        raise ProxyVError("HF_HUB_OFFLINE is set, which blocks uploads; unset it to push") from None
    except hub_errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        lines = str(e).strip().splitlines() or [type(e).__name__]
        server = (e.server_message or "").strip().splitlines()
        first = redact(lines[0] + (f" ({server[0]})" if server else ""), token)
        if status == 401:
            message = f"the Hub at {where} rejected the token ({first}); check --token, HF_TOKEN or `hf auth login`"
        elif status == 403:
            message = f"the token may not write to this repository ({first}); use a token with write access"
        else:
            message = f"the Hub at {where} refused the push: {first}; run the same command again to complete it"
        raise ProxyVError(message, exit_code=1) from None
    except (transport, OSError) as e:
        raise ProxyVError(
            f"could not reach the Hub at {where} ({redact(str(e), token) or type(e).__name__}); check the "
            "connection and HF_ENDPOINT, then run the same command again", exit_code=1,
        ) from None
    except Exception as e:
        e.args = tuple(redact(a, token) if isinstance(a, str) else a for a in e.args)
        raise


class _SkipUnchanged(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No files have been modified" not in record.getMessage()


@contextlib.contextmanager
def _quiet_hub(progress: bool) -> Iterator[None]:
    """No 'skipping empty commit' warning (an unchanged push is expected), and no client progress bars unless
    `progress`."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logger = logging.getLogger("huggingface_hub.hf_api")
    skip = _SkipUnchanged()
    logger.addFilter(skip)
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        yield
    finally:
        logger.removeFilter(skip)
        if not progress and not was_disabled:
            enable_progress_bars()
