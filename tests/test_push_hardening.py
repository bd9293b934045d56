"""`proxyv push` refuses what it must never publish or run: symbolic links (which could carry files from outside the
folder), Python code the package did not write and `auto_map` entries that would import it, and Hub tokens that could
leak into error messages. Each refusal is one line and happens before any request to the Hub."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from hub_server import HubError, LocalHub
from test_push import converted, folder, no_load_check  # noqa: F401 - the same tiny converted model
from typer.testing import CliRunner

from proxyv_convert import push as push_module
from proxyv_convert.cli import app
from proxyv_convert.errors import ProxyVError
from proxyv_convert.push import push, redact, upload_files

TOKEN = "hf_hardeningSecret0123456789abcdef"
WRONG = "hf_wrongHardening0123456789ABCDEF"
REPO = "local-user/tiny-proxyv"
SECRET = b"outside-secret-content-3f9a"


@pytest.fixture
def static_checks_only(monkeypatch):
    """Fail the test if the load-and-run check is reached: the refusal must come from the static checks."""
    def no_subprocess(*args, **kwargs):
        raise AssertionError("the static checks must catch this before the load-and-run check")

    monkeypatch.setattr(push_module, "check_runs", no_subprocess)


def _push(hub: LocalHub, folder: Path, **kwargs):
    return push(folder, REPO, endpoint=hub.url, token=kwargs.pop("token", TOKEN), progress=False, **kwargs)


def _refused(hub: LocalHub, folder: Path, match: str) -> str:
    with pytest.raises(ProxyVError, match=match) as refused:
        _push(hub, folder)
    message = str(refused.value)
    assert "\n" not in message and "Traceback" not in message
    assert hub.requests == []  # nothing was sent, so nothing was committed
    return message


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


# --- symbolic links --------------------------------------------------------------------------------------------------


def _file_outside(folder: Path) -> str:
    secret = folder.parent / "secret.txt"
    secret.write_bytes(SECRET)
    (folder / "notes.txt").symlink_to(secret)
    return "notes.txt"


def _folder_outside(folder: Path) -> str:
    outside = folder.parent / "outside"
    outside.mkdir()
    (outside / "data.txt").write_bytes(SECRET)
    (folder / "extra").symlink_to(outside, target_is_directory=True)
    return "extra"


def _dangling(folder: Path) -> str:
    (folder / "gone.json").symlink_to(folder.parent / "does-not-exist.json")
    return "gone.json"


def _inside(folder: Path) -> str:
    (folder / "alias.json").symlink_to(folder / "config.json")
    return "alias.json"


def _nested(folder: Path) -> str:
    (folder / "docs").mkdir()
    secret = folder.parent / "secret.txt"
    secret.write_bytes(SECRET)
    (folder / "docs" / "notes.txt").symlink_to(secret)
    return "docs/notes.txt"


def _replaced_code(folder: Path) -> str:
    # a byte-equal copy of the code, but stored outside and linked: what is uploaded is whatever the link points at
    outside = folder.parent / "modeling_proxyv.py"
    shutil.move(folder / "modeling_proxyv.py", outside)
    (folder / "modeling_proxyv.py").symlink_to(outside)
    return "modeling_proxyv.py"


@pytest.mark.parametrize(
    "link", [_file_outside, _folder_outside, _dangling, _inside, _nested, _replaced_code],
    ids=["file-outside", "folder-outside", "dangling", "inside", "nested", "code-file"],
)
def test_a_symlink_anywhere_in_the_folder_is_refused_before_any_request(local_hub, folder, static_checks_only, link):
    name = link(folder)
    message = _refused(local_hub, folder, "symbolic link")
    assert name in message
    assert all(SECRET not in r.body for r in local_hub.requests)


def test_upload_files_never_lists_a_symlink_or_a_file_outside_the_folder(folder):
    _file_outside(folder)
    with pytest.raises(ProxyVError, match="notes.txt .*symbolic link"):
        upload_files(folder)


def test_a_folder_given_through_a_symlink_is_pushed(local_hub, folder, no_load_check, tmp_path):
    # the folder argument itself may be a link (e.g. to a data disk): only links inside it are refused
    via = tmp_path / "via-link"
    via.symlink_to(folder, target_is_directory=True)
    result = _push(local_hub, via)
    files = local_hub.files(REPO)
    assert {k: v for k, v in files.items() if k not in ("README.md", ".gitattributes")} == {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    assert "config.json" in result.files


# --- code the package did not write ----------------------------------------------------------------------------------

EVIL = textwrap.dedent(
    """
    from pathlib import Path
    Path({marker!r}).write_text("imported")
    from transformers import ProcessorMixin


    class EvilProcessor(ProcessorMixin):
        pass
    """
)


def test_an_auto_map_to_an_extra_module_is_refused_before_it_can_run(local_hub, folder, tmp_path):
    # the real load-and-run check: before the fix it imported evil.py with trust_remote_code=True
    marker = tmp_path / "evil-was-imported"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    _edit_json(folder / "processor_config.json", auto_map={"AutoProcessor": "evil.EvilProcessor"})
    with pytest.raises(ProxyVError) as refused:
        _push(local_hub, folder)
    assert not marker.exists(), "evil.py was imported"
    assert local_hub.requests == []
    message = str(refused.value)
    assert "evil.py" in message and "proxyv did not write" in message and "\n" not in message


@pytest.mark.parametrize("name", ["helpers.py", "sub/tool.py", ".hidden/run.py", "Upper.PY"])
def test_an_extra_python_file_is_refused(local_hub, folder, static_checks_only, name):
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_text("print('hello')\n")
    message = _refused(local_hub, folder, "proxyv did not write")
    assert name in message


@pytest.mark.parametrize(
    ("file", "auto_map"),
    [
        ("processor_config.json", {"AutoProcessor": "evil.EvilProcessor"}),
        ("preprocessor_config.json", {"AutoImageProcessor": "image_processing_evil.EvilImageProcessor"}),
        ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_evil.Slow", None]}),
        ("config.json", {"AutoConfig": "configuration_proxyv.ProxyVLlavaConfig", "AutoModel": "evil.Model"}),
        ("config.json", {"AutoModelForImageTextToText": "someone/other-repo--modeling_proxyv.Model"}),
        ("generation_config.json", {"AutoModel": "modeling_evil.Model"}),
        ("processor_config.json", {"AutoProcessor": "modeling_proxyv.sub.Processor"}),
    ],
    ids=["processor", "preprocessor", "tokenizer", "config", "other-repo", "any-json", "dotted"],
)
def test_an_auto_map_naming_another_module_is_refused(local_hub, folder, static_checks_only, file, auto_map):
    path = folder / file
    if path.exists():
        _edit_json(path, auto_map=auto_map)
    else:
        path.write_text(json.dumps({"auto_map": auto_map}))
    message = _refused(local_hub, folder, "auto_map")
    assert file in message


def test_the_canonical_auto_map_is_accepted(local_hub, folder, no_load_check):
    _edit_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, None]})
    _push(local_hub, folder)
    assert "tokenizer_config.json" in local_hub.files(REPO)


@pytest.mark.parametrize(
    "auto_map",
    [["modeling_proxyv.Model"], 3, None, "modeling_proxyv.Model", {"AutoModel": 3},
     {"AutoModel": ["modeling_proxyv.Model", 3]}, {"AutoModel": {"nested": "modeling_proxyv.Model"}}],
    ids=["list", "number", "null", "string", "number-value", "number-in-list", "dict-value"],
)
def test_a_malformed_auto_map_is_a_one_line_error(local_hub, folder, static_checks_only, auto_map):
    _edit_json(folder / "config.json", auto_map=auto_map)
    result = CliRunner().invoke(app, ["push", str(folder), "--repo-id", REPO, "--endpoint", local_hub.url,
                                      "--token", TOKEN, "-q"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "config.json" in result.stderr and "auto_map" in result.stderr
    assert local_hub.requests == []


# --- the token -------------------------------------------------------------------------------------------------------


def _forms(token: str) -> set[str]:
    """The token as it could appear in a message: raw, stripped, and escaped as repr/ascii/bytes/JSON write it."""
    forms = set()
    for t in (token, token.strip()):
        forms |= {t, repr(t)[1:-1], ascii(t)[1:-1], repr(t.encode("utf-8", "surrogatepass"))[2:-1],
                  json.dumps(t)[1:-1]}
    return {f for f in forms if f}


@pytest.mark.parametrize("local_hub", [{"token": TOKEN}], indirect=True)
@pytest.mark.parametrize(
    ("token", "exit_code"),
    [
        (WRONG + "\n", 1),  # stripped, then rejected by the Hub
        (WRONG + "\r\n", 1),
        ("  " + WRONG + "  ", 1),
        ("hf_" + "A" * 4000, 1),
        (WRONG[:10] + "\t" + WRONG[10:], 2),  # refused before any request
        (WRONG[:10] + " " + WRONG[10:], 2),
        ("hf_k\u00e9" + WRONG[5:], 2),
        ("hf_\u2028" + WRONG[4:], 2),
        (WRONG + "\x00", 2),
        ("hf_\U0001f511" + WRONG[4:] + "\n", 2),
    ],
    ids=["newline", "crlf", "spaces", "very-long", "tab", "inner-space", "non-ascii", "line-separator", "nul",
         "emoji-newline"],
)
def test_a_bad_token_never_appears_in_output(local_hub, folder, no_load_check, token, exit_code):
    result = CliRunner().invoke(app, ["push", str(folder), "--repo-id", REPO, "--endpoint", local_hub.url,
                                      "--token", token, "-q"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)[:300]
    assert result.exit_code == exit_code, result.output[:300]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr[:300]
    leaked = [f for f in _forms(token) if f in result.output]
    assert not leaked, "the token appears in the output"
    assert not [r for r in local_hub.requests if "/commit/" in r.path]
    if exit_code == 2:
        assert local_hub.requests == []
        assert "token" in result.stderr


@pytest.mark.parametrize("local_hub", [{"token": TOKEN}], indirect=True)
def test_a_bad_token_from_the_environment_is_refused_without_showing_it(local_hub, folder, no_load_check, monkeypatch):
    token = "hf_k\u00e9" + WRONG[5:]
    monkeypatch.setenv("HF_TOKEN", token)
    result = CliRunner().invoke(app, ["push", str(folder), "--repo-id", REPO, "--endpoint", local_hub.url, "-q"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output[:300]
    assert not [f for f in _forms(token) if f in result.output]
    assert local_hub.requests == []


@pytest.mark.parametrize("local_hub", [{"token": TOKEN}], indirect=True)
@pytest.mark.parametrize("padded", [TOKEN + "\n", f" {TOKEN}\r\n", f"\t{TOKEN} "], ids=["newline", "crlf", "tab"])
def test_surrounding_whitespace_is_stripped_from_a_good_token(local_hub, folder, no_load_check, padded):
    result = CliRunner().invoke(app, ["push", str(folder), "--repo-id", REPO, "--endpoint", local_hub.url,
                                      "--token", padded, "-q"])
    assert result.exit_code == 0, result.output[:300]
    assert not [f for f in _forms(padded) if f in result.output]
    assert "config.json" in local_hub.files(REPO)


@pytest.mark.parametrize("local_hub", [{"token": TOKEN}], indirect=True)
def test_a_hub_error_echoing_the_token_in_any_form_is_redacted(local_hub, folder, no_load_check, monkeypatch):
    def echoing(method, target, headers, body):
        auth = headers.get("authorization", "")
        raise HubError(500, f"bad header {auth!r} {auth.encode()!r} {json.dumps(auth)} {auth[7:25]}")

    monkeypatch.setattr(local_hub, "handle", echoing)
    with pytest.raises(ProxyVError) as refused:
        _push(local_hub, folder, token=TOKEN + "\n")
    message = str(refused.value)
    assert "***" in message and TOKEN not in message and TOKEN[:18] not in message


@pytest.mark.parametrize(
    "token", [WRONG + "\n", " " + WRONG + " ", "hf_k\u00e9" + WRONG[5:], WRONG[:10] + "\t" + WRONG[10:]],
    ids=["newline", "spaces", "non-ascii", "tab"],
)
def test_redact_removes_every_form_of_the_token(token):
    text = " | ".join(sorted(_forms(token))) + " | hf_unrelated | local-user/x"
    redacted = redact(text, token)
    assert not [f for f in _forms(token) if f in redacted]
    assert "hf_unrelated" in redacted and "local-user/x" in redacted


def test_redact_removes_a_truncated_token():
    redacted = redact(f"Bearer {WRONG[:16]}... was refused; hf_wrong is not a token", WRONG)
    assert WRONG[:16] not in redacted and "***..." in redacted and "hf_wrong is not" in redacted


def test_token_validation_happens_before_reading_the_folder(tmp_path):
    with pytest.raises(ProxyVError, match="token") as refused:
        push(tmp_path / "missing", REPO, endpoint="http://127.0.0.1:9", token="hf_k\u00e9y", progress=False)
    assert "k\u00e9y" not in str(refused.value) and "\\xe9" not in str(refused.value)
