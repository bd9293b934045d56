"""Image- and video-prompt data for every command that reads a dataset (distill, eval), from wherever users keep it.

`--data` may be:
  - `shapes`: the built-in task (generated deterministically and cached);
  - a folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict);
  - a `.parquet`, `.jsonl` or `.json` file whose image column holds image paths or bytes; paths are relative to the
    file and must stay inside its folder (see `_resolve_image_paths`);
  - a folder of images (with an optional `metadata.jsonl` holding prompts and answers, as `imagefolder` reads it);
  - a dataset name on the Hugging Face Hub (downloaded with `datasets`, honouring HF_ENDPOINT / HF_TOKEN).
A split may select rows with Python slice syntax, `validation[:-500]` / `validation[-500:]`, so that one split
gives disjoint training and held-out rows. Images are decoded lazily; those that fail to decode are skipped and
counted, never fatal.

A row may hold a video instead of an image (for the families that take videos): the video column (`video` unless
`--video-column` names another) holds a list of frames (images, in any form the image column takes) or a video file
(decoded with PyAV or decord where one is installed). In data with a video column, a row with neither an image nor a
video is a text-only prompt.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .config import Columns
from .errors import ProxyVError
from .video import Video, read_video_file

if TYPE_CHECKING:  # imported where used: commands that read no dataset start without it
    import datasets

BUILTIN = ("shapes",)
PROMPT_COLUMNS = ("question", "prompt", "instruction", "text", "query")
ANSWER_COLUMNS = ("answer", "response", "output", "label")
VIDEO_COLUMNS = ("video",)
TABLE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
DEFAULT_PROMPT = "Describe the image."
SPLIT_SLICE = re.compile(r"^(?P<name>[^\[\]]+?)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


class TextOnly:
    """The visual input of a row that holds neither an image nor a video."""

    def __repr__(self) -> str:
        return "TEXT_ONLY"


TEXT_ONLY = TextOnly()
Visual = Image.Image | Video | TextOnly  # what a prompt shows: an image, a video, or nothing


@dataclass
class ImageTextData:
    """One split: rows with an undecoded image or video (or, in data with a video column, neither), a prompt and an
    optional answer."""

    rows: datasets.Dataset
    image: str | None  # None: the data has only a video column
    prompt: str | None  # None: every row gets DEFAULT_PROMPT
    answer: str | None
    source: str
    video: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> tuple[Visual | None, str, str | None]:
        """(image, video or TEXT_ONLY; None when the image or video does not decode, prompt, answer)."""
        row = self.rows[index]
        prompt = row[self.prompt] if self.prompt else DEFAULT_PROMPT
        answer = row[self.answer] if self.answer else None
        image = row[self.image] if self.image else None
        video = row[self.video] if self.video else None
        if video is not None:
            visual = decode_video(video)
        elif image is not None or self.video is None:
            visual = decode_image(image)
        else:
            visual = TEXT_ONLY
        return visual, str(prompt), None if answer is None else str(answer)


def decode_video(value) -> Video | None:
    """A video from a list of frames (each decoded as `decode_image` does) or a video file; None if it fails."""
    if isinstance(value, (list, tuple)):
        frames = [decode_image(frame) for frame in value]
        return Video(tuple(frames)) if frames and all(f is not None for f in frames) else None
    return read_video_file(value)


def decode_image(value) -> Image.Image | None:
    """An RGB image from a datasets Image value ({bytes, path}), a PIL image, bytes or a path; None if it fails.

    Failing covers anything the value may be: bytes that are no image, a truncated or empty file, a missing path, a
    value of the wrong type, and an image larger than PIL's decompression-bomb limit (a tiny file can claim 20000x20000
    pixels: PIL raises DecompressionBombError beyond twice its MAX_IMAGE_PIXELS and warns beyond it; the warning
    counts as a failure too, since decoding such an image takes gigabytes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(value, Image.Image):
                image = value
            elif isinstance(value, dict):
                image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else _open_file(value["path"])
            elif isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            else:
                image = _open_file(value)
            image.load()
            return image.convert("RGB")
    except Exception:  # noqa: BLE001 - whatever the value holds, an image that does not decode is skipped and counted
        return None


def _open_file(path) -> Image.Image:
    # a path must name a regular file: a FIFO or a device (/dev/zero) would block or never end
    if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
        raise FileNotFoundError(path)
    return Image.open(path)


def load_data(
    data: str | Path | datasets.Dataset | datasets.DatasetDict,
    *,
    split: str,
    columns: Columns = Columns(),
    revision: str | None = None,
) -> ImageTextData:
    """The `split` of `data` with its columns resolved; ProxyVError when it is missing, empty or unusable. `data` may
    also be a Dataset or DatasetDict in memory."""
    import datasets

    name, rows_slice = parse_split(split)
    if isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        rows = _pick_split(data, name, "the dataset")
    else:
        rows = _load_split(str(data), name, revision, columns)
    video = _column(rows, columns.video, VIDEO_COLUMNS, "--video-column")
    image = columns.image if columns.image in rows.column_names else None
    if image is None and (video is None or columns.image != Columns().image):
        raise ProxyVError(
            f"the data has no image column '{columns.image}'; its columns: {', '.join(rows.column_names)} "
            "(choose one with --image-column, or the videos with --video-column)"
        )
    prompt = _column(rows, columns.prompt, PROMPT_COLUMNS, "--prompt-column")
    answer = _column(rows, columns.answer, ANSWER_COLUMNS, "--answer-column")
    if rows_slice is not None:
        rows = rows.select(range(len(rows))[rows_slice])
    if len(rows) == 0:
        raise ProxyVError(f"the '{split}' split of {data} is empty")
    for column in (image, video):  # decode ourselves, skipping failures
        if column is not None:
            rows = _undecoded(rows, column)
    source = str(data) if isinstance(data, (str, Path)) else "the dataset"
    return ImageTextData(rows=rows, image=image, prompt=prompt, answer=answer, source=source, video=video)


def _undecoded(rows: datasets.Dataset, column: str) -> datasets.Dataset:
    """`rows` with an image column, a column of lists of images, or a video column cast to undecoded values."""
    import datasets

    feature = rows.features.get(column)
    if isinstance(feature, datasets.Image):
        return rows.cast_column(column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)  # a list (or Sequence) of frames
    if isinstance(inner, datasets.Image):
        return rows.cast_column(column, type(feature)(datasets.Image(decode=False)))
    if isinstance(feature, getattr(datasets, "Video", ())):
        return rows.cast_column(column, datasets.Video(decode=False))
    return rows


def parse_split(split: str) -> tuple[str, slice | None]:
    """("validation", slice(-500, None)) for "validation[-500:]"; (split, None) without a slice."""
    found = SPLIT_SLICE.match(split.strip())
    if found is None:
        raise ProxyVError(f"split '{split}' is neither a split name nor NAME[start:stop] (e.g. validation[-500:])")
    bounds = [int(found[key]) if found[key] else None for key in ("start", "stop")]
    return found["name"], None if found.group(2) is None else slice(*bounds)


def _column(rows: datasets.Dataset, name: str | None, candidates: tuple[str, ...], option: str) -> str | None:
    if name is not None:
        if name not in rows.column_names:
            raise ProxyVError(
                f"the data has no column '{name}'; its columns: {', '.join(rows.column_names)} (choose with {option})"
            )
        return name
    return next((c for c in candidates if c in rows.column_names), None)


def _load_split(data: str, split: str, revision: str | None, columns: Columns) -> datasets.Dataset:

    if data in BUILTIN:
        from .shapes import load_shapes

        return load_shapes(split)
    path = Path(data).expanduser()
    if path.exists():
        loaded = _load_local(path, columns)
    elif data.startswith((".", "/", "~")) or data.endswith(tuple(TABLE_FORMATS)):
        raise ProxyVError(f"data {data} does not exist")
    else:
        loaded = _load_hub(data, revision)
    return _pick_split(loaded, split, data)


def _pick_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, data: str) -> datasets.Dataset:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if split not in ("train", loaded.split and str(loaded.split)):
            raise ProxyVError(f"{data} has a single split, 'train'; there is no '{split}' split")
        return loaded
    if split not in loaded:
        raise ProxyVError(f"{data} has no '{split}' split; its splits: {', '.join(loaded)}")
    return loaded[split]


def _load_local(path: Path, columns: Columns) -> datasets.Dataset | datasets.DatasetDict:
    import datasets

    if path.is_file():
        fmt = TABLE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ProxyVError(f"{path} is not a .parquet, .jsonl or .json file")
        if path.stat().st_size == 0:
            raise ProxyVError(f"{path} is empty; it needs rows with an image column")
        if fmt == "json":
            _check_json_text(path)
        with _datasets_quiet():  # its own log line would repeat the error below
            try:
                rows = datasets.load_dataset(fmt, data_files=str(path), split="train")
            except Exception as error:  # noqa: BLE001 - any parse failure is the user's file
                raise ProxyVError(f"{path} could not be read as {fmt}: {_reason(error)}") from None
            for column in {columns.image, columns.video or VIDEO_COLUMNS[0]} & set(rows.column_names):
                rows = _resolve_image_paths(rows, path, column)
            return rows
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            return datasets.load_from_disk(str(path))
        except Exception as error:  # noqa: BLE001 - datasets fails in many ways on empty or damaged folders
            raise ProxyVError(
                f"{path} could not be read with datasets.load_from_disk (is it empty or damaged? "
                f"{type(error).__name__}: {error})"
            ) from None
    try:
        return datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    except Exception as error:  # noqa: BLE001
        raise ProxyVError(
            f"{path} is neither a save_to_disk folder nor a folder of images: {_reason(error)}"
        ) from None


def _reason(error: BaseException) -> str:
    """The first line of the innermost cause of a library error (datasets wraps the parser's message), or its type."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


@contextlib.contextmanager
def _datasets_quiet() -> Iterator[None]:
    """No log lines or progress bars from datasets while it reads a local table (quick, and a bad table's error
    must stay one line)."""
    import datasets

    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _check_json_text(path: Path) -> None:
    """A .json/.jsonl table must be UTF-8 text with some content; in a .jsonl file every non-blank line must be one
    JSON object. Checked line by line here, so that the error names the line (the JSON reader says only "row 0")."""
    lines = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ProxyVError(f"{path} line {number} is not UTF-8 text (byte {error.start}); save it as UTF-8"
                                  ) from None
            if not line.strip():
                continue
            lines += 1
            if path.suffix.lower() != ".jsonl":
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as error:
                raise ProxyVError(f"{path} line {number} is not valid JSON ({str(error)[:200]})") from None
            if not isinstance(row, dict):
                raise ProxyVError(f"{path} line {number} is a JSON {type(row).__name__}, not an object with an "
                                  "image column")
    if not lines:
        raise ProxyVError(f"{path} holds no rows (only blank lines); it needs rows with an image column")


def _resolve_image_paths(rows: datasets.Dataset, table: Path, column: str) -> datasets.Dataset:
    """Image paths in a table are relative to the table's folder, and must stay inside it: an absolute path, a `..`
    that climbs out of the folder, or a symlink that leads out of it is a ProxyVError naming the row (a table must
    not make proxyv read files it was not given). This holds for a column of path strings and for image values
    ({bytes, path}) without bytes; paths are rewritten to the files they resolve to. A null path stays null (the row
    is then skipped as undecodable)."""
    import datasets

    folder = table.parent.resolve()
    feature = rows.features.get(column)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        paths = {row: _inside(folder, value, row, table) for row, value in enumerate(rows[column]) if value}
        return rows.map(lambda _, row: {column: paths.get(row)}, with_indices=True)
    inner = getattr(feature, "feature", None)  # a video as a list of frame paths
    if isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string"):
        frames = {row: [_inside(folder, v, row, table) if v else v for v in value]
                  for row, value in enumerate(rows[column]) if value}
        return rows.map(lambda _, row: {column: frames.get(row)}, with_indices=True)
    is_struct = isinstance(feature, dict) and "path" in feature
    is_video = isinstance(feature, getattr(datasets, "Video", ()))
    if not (isinstance(feature, datasets.Image) or is_struct or is_video):
        return rows
    if is_video:  # its paths are read undecoded, like an image's
        rows = _undecoded(rows, column)
    import pyarrow.compute as pc

    values = rows.with_format("arrow")[column]  # memory-mapped: no image bytes are copied
    path_list = pc.struct_field(values, "path").to_pylist()
    if "bytes" in [values.type.field(i).name for i in range(values.type.num_fields)]:
        has_bytes = pc.fill_null(pc.greater(pc.binary_length(pc.struct_field(values, "bytes")), 0), False).to_pylist()
    else:
        has_bytes = [False] * len(path_list)
    paths = {row: _inside(folder, value, row, table)
             for row, (value, embedded) in enumerate(zip(path_list, has_bytes, strict=True)) if value and not embedded}
    if not paths:
        return rows
    if isinstance(feature, datasets.Image):
        rows = rows.cast_column(column, datasets.Image(decode=False))
    return rows.map(lambda example, row: {column: {**example[column], "path": paths[row]}} if row in paths else {},
                    with_indices=True)


def _inside(folder: Path, value: str, row: int, table: Path) -> str:
    """The resolved path of a table's image path, which must lie inside the table's (resolved) folder."""
    try:
        resolved = (folder / value).resolve()
        inside = not Path(value).is_absolute() and resolved.is_relative_to(folder)
    except (ValueError, OSError):  # a NUL byte, a name too long
        inside = False
    if not inside:
        raise ProxyVError(
            f"row {row + 1} of {table} names the image {str(value)[:200]!r}, which is outside the table's folder; "
            "image paths must be relative to the table and stay inside its folder (no absolute paths, no '..' or "
            "links out of it)"
        )
    return str(resolved)


def _load_hub(name: str, revision: str | None) -> datasets.DatasetDict:
    import datasets

    try:
        return datasets.load_dataset(name, revision=revision)
    except datasets.exceptions.DatasetNotFoundError:
        raise ProxyVError(
            f"dataset '{name}' was not found on the Hub (or is private: log in or set HF_TOKEN)"
        ) from None
    except ConnectionError as error:
        raise ProxyVError(f"the Hub could not be reached to download '{name}' ({error}); pass a local path") from None
