"""Image-prompt data for distillation and evaluation, from wherever users keep it.

`--data` may be:
  - `shapes`: the built-in task (generated deterministically and cached);
  - a folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict);
  - a `.parquet`, `.jsonl` or `.json` file whose image column holds image paths (relative to the file) or bytes;
  - a folder of images (with an optional `metadata.jsonl` holding prompts and answers, as `imagefolder` reads it);
  - a dataset name on the Hugging Face Hub (downloaded with `datasets`, honouring HF_ENDPOINT / HF_TOKEN).
Images are decoded lazily; those that fail to decode are skipped and counted, never fatal.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .errors import ProxyVError

if TYPE_CHECKING:  # imported where used: commands that read no dataset start without it
    import datasets

BUILTIN = ("shapes",)
PROMPT_COLUMNS = ("question", "prompt", "instruction", "text", "query")
ANSWER_COLUMNS = ("answer", "response", "output", "label")
TABLE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
DEFAULT_PROMPT = "Describe the image."


@dataclass(frozen=True)
class Columns:
    """Column names; `prompt`/`answer` of None are detected from common names."""

    image: str = "image"
    prompt: str | None = None
    answer: str | None = None


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
    data: str | Path,
    *,
    split: str,
    columns: Columns = Columns(),
    revision: str | None = None,
) -> ImageTextData:
    """The `split` of `data` with its columns resolved; ProxyVError when it is missing, empty or unusable."""
    import datasets

    rows = _load_split(str(data), split, revision, columns.image)
    if columns.image not in rows.column_names:
        raise ProxyVError(
            f"the data has no image column '{columns.image}'; its columns: {', '.join(rows.column_names)} "
            "(choose one with --image-column)"
        )
    prompt = _column(rows, columns.prompt, PROMPT_COLUMNS, "--prompt-column")
    answer = _column(rows, columns.answer, ANSWER_COLUMNS, "--answer-column")
    if len(rows) == 0:
        raise ProxyVError(f"the '{split}' split of {data} is empty")
    if isinstance(rows.features.get(columns.image), datasets.Image):
        rows = rows.cast_column(columns.image, datasets.Image(decode=False))  # decode ourselves, skipping failures
    return ImageTextData(rows=rows, image=columns.image, prompt=prompt, answer=answer, source=str(data))


def _column(rows: datasets.Dataset, name: str | None, candidates: tuple[str, ...], option: str) -> str | None:
    if name is not None:
        if name not in rows.column_names:
            raise ProxyVError(
                f"the data has no column '{name}'; its columns: {', '.join(rows.column_names)} (choose with {option})"
            )
        return name
    return next((c for c in candidates if c in rows.column_names), None)


def _load_split(data: str, split: str, revision: str | None, image_column: str) -> datasets.Dataset:
    import datasets

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
