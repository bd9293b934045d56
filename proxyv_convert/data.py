"""Image-prompt data for every command that reads a dataset (distill, eval), from wherever users keep it.

`--data` may be:
  - `shapes`: the built-in task (generated deterministically and cached);
  - a folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict);
  - a `.parquet`, `.jsonl` or `.json` file whose image column holds image paths (relative to the file) or bytes;
  - a folder of images (with an optional `metadata.jsonl` holding prompts and answers, as `imagefolder` reads it);
  - a dataset name on the Hugging Face Hub (downloaded with `datasets`, honouring HF_ENDPOINT / HF_TOKEN).
A split may select rows with Python slice syntax, `validation[:-500]` / `validation[-500:]`, so that one split
gives disjoint training and held-out rows. Images are decoded lazily; those that fail to decode are skipped and
counted, never fatal.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .config import Columns
from .errors import ProxyVError

if TYPE_CHECKING:  # imported where used: commands that read no dataset start without it
    import datasets

BUILTIN = ("shapes",)
PROMPT_COLUMNS = ("question", "prompt", "instruction", "text", "query")
ANSWER_COLUMNS = ("answer", "response", "output", "label")
TABLE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
DEFAULT_PROMPT = "Describe the image."
SPLIT_SLICE = re.compile(r"^(?P<name>[^\[\]]+?)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


@dataclass
class ImageTextData:
    """One split: rows with an undecoded image, a prompt and an optional answer."""

    rows: datasets.Dataset
    image: str
    prompt: str | None  # None: every row gets DEFAULT_PROMPT
    answer: str | None
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> tuple[Image.Image | None, str, str | None]:
        """(image or None when it does not decode, prompt, answer)."""
        row = self.rows[index]
        prompt = row[self.prompt] if self.prompt else DEFAULT_PROMPT
        answer = row[self.answer] if self.answer else None
        return decode_image(row[self.image]), str(prompt), None if answer is None else str(answer)


def decode_image(value) -> Image.Image | None:
    """An RGB image from a datasets Image value ({bytes, path}), a PIL image, bytes or a path; None if it fails."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            image = Image.open(value)
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, TypeError, KeyError, SyntaxError):
        return None


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
        rows = _load_split(str(data), name, revision, columns.image)
    if columns.image not in rows.column_names:
        raise ProxyVError(
            f"the data has no image column '{columns.image}'; its columns: {', '.join(rows.column_names)} "
            "(choose one with --image-column)"
        )
    prompt = _column(rows, columns.prompt, PROMPT_COLUMNS, "--prompt-column")
    answer = _column(rows, columns.answer, ANSWER_COLUMNS, "--answer-column")
    if rows_slice is not None:
        rows = rows.select(range(len(rows))[rows_slice])
    if len(rows) == 0:
        raise ProxyVError(f"the '{split}' split of {data} is empty")
    if isinstance(rows.features.get(columns.image), datasets.Image):
        rows = rows.cast_column(columns.image, datasets.Image(decode=False))  # decode ourselves, skipping failures
    source = str(data) if isinstance(data, (str, Path)) else "the dataset"
    return ImageTextData(rows=rows, image=columns.image, prompt=prompt, answer=answer, source=source)


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


def _load_split(data: str, split: str, revision: str | None, image_column: str) -> datasets.Dataset:

    if data in BUILTIN:
        from .shapes import load_shapes

        return load_shapes(split)
    path = Path(data).expanduser()
    if path.exists():
        loaded = _load_local(path, image_column)
    elif data.startswith((".", "/", "~")) or data.endswith(tuple(TABLE_FORMATS)):
        raise ProxyVError(f"data {data} does not exist")
    else:
        loaded = _load_hub(data, revision)
    return _pick_split(loaded, split, data)


def _pick_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, data: str) -> datasets.Dataset:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if split not in ("train", loaded.split and str(loaded.split)):
            raise ProxyVError(f"{data} has a single split; ask for split 'train'")
        return loaded
    if split not in loaded:
        raise ProxyVError(f"{data} has no '{split}' split; its splits: {', '.join(loaded)}")
    return loaded[split]


def _load_local(path: Path, image_column: str) -> datasets.Dataset | datasets.DatasetDict:
    import datasets

    if path.is_file():
        fmt = TABLE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ProxyVError(f"{path} is not a .parquet, .jsonl or .json file")
        try:
            rows = datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as error:  # noqa: BLE001 - any parse failure is the user's file
            raise ProxyVError(f"{path} could not be read as {fmt}: {str(error).splitlines()[0]}") from None
        return _resolve_image_paths(rows, path.parent, image_column)
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
            f"{path} is neither a save_to_disk folder nor a folder of images: {str(error).splitlines()[0]}"
        ) from None


def _resolve_image_paths(rows: datasets.Dataset, base: Path, column: str) -> datasets.Dataset:
    """Image paths in a table are relative to the table's folder."""
    import datasets

    feature = rows.features.get(column)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return rows.map(lambda row: {column: str(base / row[column])})
    return rows


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
