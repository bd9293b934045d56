"""Read and write safetensors checkpoints one tensor at a time, without loading a model.

The format: an 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}, plus
`__metadata__`}), then the tensors' raw bytes; `data_offsets` are relative to the end of the header and must cover
the data without holes. Copying a tensor is copying its byte range, so original tensors stay bit-for-bit identical.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import ProxyVError

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # the dtypes `--dtype` casts (8-bit floats are quantised weights)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library enforces
COPY_CHUNK_BYTES = 4 * 2**20  # bytes of a tensor held in memory while copying or casting it


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: `nbytes` bytes at absolute offset `begin` of `path`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(path: Path, why: str) -> ProxyVError:
    return ProxyVError(f"{path} is not a valid safetensors file ({why}); download or save it again")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, after checking that the header is consistent with the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise _corrupt(path, f"only {size} bytes")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise _corrupt(path, f"header length {header_len} does not fit in a file of {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge numbers, hostile nesting
            raise _corrupt(path, f"header is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    tensors, end = {}, 0
    for name, entry in sorted(header.items(), key=lambda item: _offsets(path, item)[0]):
        begin, stop = _offsets(path, (name, entry))
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES or not isinstance(shape, list) or not all(
            _is_count(d) for d in shape
        ):
            raise _corrupt(path, f"tensor '{name}' has dtype {str(dtype)[:40]!r} and shape {str(shape)[:80]}")
        if begin != end or stop - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise _corrupt(path, f"tensor '{name}' has data offsets {[begin, stop]} that do not match its shape")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, stop - begin)
        end = stop
    if data_start + end != size:
        raise _corrupt(path, f"the header describes {data_start + end} bytes but the file has {size} (truncated?)")
    return tensors


def _offsets(path: Path, item: tuple[str, object]) -> tuple[int, int]:
    name, entry = item
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _corrupt(path, f"tensor '{name}' has no valid data_offsets")
    return offsets[0], offsets[1]


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (a shape dimension or a byte offset); JSON `true` is no integer here."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, or the single `model.safetensors`."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        files = sorted(set(_weight_map(index_path).values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise ProxyVError(f"{folder} is incomplete: {', '.join(missing)} listed in {INDEX_FILE} is missing")
        return [folder / name for name in files]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    return []


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's {tensor name: shard file}; every shard must be a file name inside the index's folder (an index
    that points elsewhere, `/etc/...` or `../other`, would read files the checkpoint does not hold)."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ProxyVError(f"{index_path} is not a valid safetensors index (no weight_map)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ProxyVError(f"{index_path} is not a valid safetensors index (weight_map must map names to file names)")
    for name, shard in weight_map.items():
        # judged by the name, not by where symlinks lead: the Hub's cache links every shard to a blob elsewhere
        normal = os.path.normpath(shard)
        if os.path.isabs(shard) or normal == os.pardir or normal.startswith(os.pardir + os.sep) or "\0" in shard:
            raise ProxyVError(f"{index_path} puts tensor '{name}' in {shard[:200]!r}, outside the checkpoint folder; "
                              "shards must be files beside the index")
    return weight_map


def read_checkpoint(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, in file and offset order."""
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(folder):
        for name, info in read_header(path).items():
            if name in tensors:
                raise ProxyVError(f"tensor '{name}' is stored twice ({tensors[name].path.name} and {path.name})")
            tensors[name] = info
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        listed = set(_weight_map(index_path))
        if listed != set(tensors):
            raise ProxyVError(
                f"{index_path} lists {len(listed)} tensors but its shards hold {len(tensors)}; the checkpoint is "
                "inconsistent"
            )
    return tensors


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: its header entry and a function that writes exactly `nbytes` bytes of data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    write: Callable[[BinaryIO], None]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def read_chunks(info: TensorInfo) -> Iterator[memoryview]:
    """A tensor's bytes in chunks of at most COPY_CHUNK_BYTES (a multiple of every element size), in one reused buffer:
    each chunk is valid until the next one is read."""
    buffer = memoryview(bytearray(min(COPY_CHUNK_BYTES, info.nbytes)))
    with open(info.path, "rb") as f:
        f.seek(info.begin)
        left = info.nbytes
        while left:
            want = min(left, len(buffer))
            if f.readinto(buffer[:want]) != want:
                raise ProxyVError(f"{info.path} ended while reading tensor '{info.name}' (truncated?)")
            yield buffer[:want]
            left -= want


def copy_bytes(info: TensorInfo) -> Callable[[BinaryIO], None]:
    """A writer that copies a source tensor's bytes as they are (no decoding, bounded memory)."""

    def write(out: BinaryIO) -> None:
        for chunk in read_chunks(info):
            out.write(chunk)

    return write


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Split tensors into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own).

    Within a shard, wider dtypes come first so that every tensor starts at an offset aligned to its element size.
    """
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [sorted(shard, key=lambda t: -DTYPE_SIZES[t.dtype]) for shard in shards]


def shard_names(count: int) -> list[str]:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def encode_header(tensors: Iterable[OutputTensor]) -> bytes:
    """Length prefix + JSON header, padded with spaces so the data starts 8-byte aligned (as safetensors does)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        entry = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        header[tensor.name] = entry
        offset += tensor.nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)
    return struct.pack("<Q", len(data)) + data


def write_shard(path: Path, tensors: list[OutputTensor], on_bytes: Callable[[int], None]) -> None:
    """Write one safetensors file, calling `on_bytes(n)` after each tensor."""
    with open(path, "wb") as f:
        f.write(encode_header(tensors))
        for tensor in tensors:
            start = f.tell()
            tensor.write(f)
            assert f.tell() - start == tensor.nbytes, (
                f"{tensor.name}: wrote {f.tell() - start} of {tensor.nbytes} bytes"
            )
            on_bytes(tensor.nbytes)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(
    folder: Path,
    tensors: list[OutputTensor],
    max_shard_bytes: int,
    on_bytes: Callable[[int], None],
    *,
    own_file: tuple[str, list[OutputTensor]] | None = None,
) -> list[str]:
    """Write the tensors as shards plus an index; returns the file names written.

    `own_file` (name, tensors) goes to a file of its own, so that it can later be replaced without rewriting the
    shards. Tensors of one dtype are written in list order (`plan_shards` sorts stably), so their writers may share
    state.
    """
    shards = plan_shards(tensors, max_shard_bytes)
    names = shard_names(len(shards))
    if own_file is not None:
        names.append(own_file[0])
        shards.append(sorted(own_file[1], key=lambda t: -DTYPE_SIZES[t.dtype]))
    for name, shard in zip(names, shards, strict=True):
        write_shard(folder / name, shard, on_bytes)
    index = {
        "metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard)},
        "weight_map": {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, INDEX_FILE]
