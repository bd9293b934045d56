"""Replacing the ProxyV tensors of a checkpoint folder without touching any other tensor.

Every safetensors file that holds ProxyV tensors is rewritten next to itself (its other tensors copied byte for byte)
and renamed over the old one, so a reader sees either the old file or the new one. Converted folders keep the ProxyV
tensors in a file of their own, so only that small file is ever rewritten.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .atomic import LOCK_FILE, atomic_output, folder_lock, replacing, write_text
from .errors import ProxyVError
from .model_folder import CHECKPOINT_DIR, EVAL_REPORT, MEASURED_FILES, PROXYV_PREFIX
from .safetensors_stream import OutputTensor, copy_bytes, read_checkpoint, write_shard

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# A copy with new ProxyV weights is another model; the source's lock (a hard link would share it) is not the copy's
SKIP_ON_COPY = (CHECKPOINT_DIR, *MEASURED_FILES, LOCK_FILE)


def _tensor_writer(tensor: torch.Tensor):
    def write(out) -> None:
        out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())

    return write


def _replace_in_folder(folder: Path, params: dict[str, torch.Tensor]) -> None:
    stored = read_checkpoint(folder)
    proxyv = {name: info for name, info in stored.items() if name.startswith(PROXYV_PREFIX)}
    if set(proxyv) != set(params):
        missing, extra = sorted(set(proxyv) - set(params)), sorted(set(params) - set(proxyv))
        raise ProxyVError(
            f"{folder} holds other ProxyV tensors than the model (missing {missing[:3]}, extra {extra[:3]})"
        )
    for path in sorted({info.path for info in proxyv.values()}):
        tensors = []
        for name, info in stored.items():
            if info.path != path:
                continue
            if name in params:
                value = params[name].detach().to("cpu", TORCH_DTYPES[info.dtype])
                assert tuple(value.shape) == info.shape, f"{name}: {tuple(value.shape)} vs {info.shape}"
                tensors.append(OutputTensor(name, info.dtype, info.shape, _tensor_writer(value)))
            else:
                tensors.append(OutputTensor(name, info.dtype, info.shape, copy_bytes(info)))
        with replacing(path) as tmp:  # a new file of an unpredictable name, renamed over the shard
            write_shard(tmp, tensors, lambda n: None)


def _write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        write_text(folder / name, text)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard links are safe: files of a model folder are only ever replaced by rename, never modified in place."""
    for item in source.iterdir():
        if item.name in SKIP_ON_COPY:
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
            continue
        try:
            os.link(item, target / item.name)
        except OSError:
            shutil.copy2(item, target / item.name)


def write_proxyv_weights(
    folder: Path, params: dict[str, torch.Tensor], *, out: Path | None = None, files: dict[str, str] | None = None
) -> Path:
    """Store `params` (full names `model.proxyv.*`) as the ProxyV tensors of `folder`, in their stored dtypes, plus
    text `files`; with `out`, into a new folder `out` (a copy of `folder`) instead, created atomically. The evaluation
    report of the old weights is removed (in place) or not copied (with `out`)."""
    files = files or {}
    if out is None:
        with folder_lock(folder):  # the caller's own lock, when it holds it already
            _replace_in_folder(folder, params)
            _write_files(folder, files)
            (folder / EVAL_REPORT).unlink(missing_ok=True)
        return folder
    with atomic_output(out, overwrite=False) as tmp:
        _link_or_copy(folder, tmp)
        _replace_in_folder(tmp, params)
        _write_files(tmp, files)
    return out
