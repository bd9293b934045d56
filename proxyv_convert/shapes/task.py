"""The shapes task: synthetic visual question answering whose answers need fine spatial detail.

Each image is 64x64 pixels: a 4x4 grid of 16-pixel cells on a black background, with 3 to 8 objects in distinct cells.
An object is one of 12 kinds (4 colours x 3 shapes), each kind at most once per image, drawn 11-13 pixels wide with
up to 2 pixels of jitter. Three kinds of question, equally often:

- ``cell``: "what is in row two column 3 ?" -> "red circle" or "nothing" (binds a position to its content; the row
  is a word and the column a digit so that the two are different tokens);
- ``count``: "how many red shapes are there ?" / "how many circles are there ?" -> "0".."4" (aggregates objects);
- ``compare``: "which is further left , the red shape or the blue shape ?" -> "red" (compares two objects' positions;
  objects are named by a colour or a shape that only they have in the image, and never share the compared row or
  column; scenes for this kind are drawn again until two such objects exist).

Every example is generated from its own seed, a string of (task version, seed, split, index), so an example is the
same whatever else is generated, images are identical on regeneration (PNG bytes), and splits with different names
are independent streams. `scene` metadata (JSON) lets anyone recompute the answer.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
from PIL import Image, ImageDraw

TASK_VERSION = "shapes-v2"
IMAGE_SIZE = 64
GRID = 4  # cells per side
CELL = IMAGE_SIZE // GRID  # pixels per cell side
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (60, 100, 255), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
KINDS = ("cell", "count", "compare")
ROW_WORDS = ("one", "two", "three", "four")
# Which object a comparison picks: (axis: 0 row 1 column, sign: -1 the smaller coordinate, +1 the larger).
COMPARISONS = {"further left": (1, -1), "further right": (1, 1), "higher": (0, -1), "lower": (0, 1)}
MIN_OBJECTS, MAX_OBJECTS = 3, 8
EMPTY_ANSWER = "nothing"
SPLIT_SIZES = {"train": 20000, "validation": 600, "test": 600}
_SUPERSAMPLE = 4  # shapes are drawn at 4x and reduced with a box filter: anti-aliased and deterministic


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    row: int  # 0-based cell row
    col: int  # 0-based cell column
    size: int  # pixels
    dx: int  # jitter of the centre, pixels
    dy: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    answer: str


def example_rng(seed: int, split: str, index: int) -> random.Random:
    """The random stream of one example (string seeds are hashed with SHA-512 by `random`, stable across runs)."""
    return random.Random(f"{TASK_VERSION}/{seed}/{split}/{index}")


def sample_scene(rng: random.Random) -> list[ShapeObject]:
    count = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), count)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    return [
        ShapeObject(colour, shape, cell // GRID, cell % GRID, rng.randint(11, 13), rng.randint(-2, 2),
                    rng.randint(-2, 2))
        for cell, (colour, shape) in zip(cells, kinds, strict=True)
    ]


def render(scene: list[ShapeObject]) -> Image.Image:
    """The 64x64 RGB image of a scene."""
    scale = _SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for obj in scene:
        cx = (obj.col * CELL + CELL / 2 + obj.dx) * scale
        cy = (obj.row * CELL + CELL / 2 + obj.dy) * scale
        half = obj.size * scale / 2
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=colour)
        elif obj.shape == "square":
            side = half * 0.85  # a square of the same width looks bigger than the circle
            draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=colour)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def cell_question(scene: list[ShapeObject], rng: random.Random) -> Question:
    by_cell = {(o.row, o.col): o for o in scene}
    empty = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in by_cell]
    if rng.random() < 0.8 or not empty:
        obj = rng.choice(scene)
        row, col, answer = obj.row, obj.col, obj.name
    else:
        (row, col), answer = rng.choice(empty), EMPTY_ANSWER
    return Question("cell", f"what is in row {ROW_WORDS[row]} column {col + 1} ?", answer)


def count_question(scene: list[ShapeObject], rng: random.Random) -> Question:
    if rng.random() < 0.5:
        colour = rng.choice(list(COLOURS))
        return Question("count", f"how many {colour} shapes are there ?", str(sum(o.colour == colour for o in scene)))
    shape = rng.choice(SHAPES)
    return Question("count", f"how many {shape}s are there ?", str(sum(o.shape == shape for o in scene)))


def unique_references(scene: list[ShapeObject]) -> dict[str, ShapeObject]:
    """Objects that one word names in this scene ("red" / "circle" when only one object has it), by that word."""
    colours = {o.colour for o in scene if sum(p.colour == o.colour for p in scene) == 1}
    shapes = {o.shape for o in scene if sum(p.shape == o.shape for p in scene) == 1}
    references = {o.colour: o for o in scene if o.colour in colours}
    references.update({o.shape: o for o in scene if o.shape in shapes})
    return references


def reference_phrase(word: str) -> str:
    return f"the {word} shape" if word in COLOURS else f"the {word}"


def compare_options(scene: list[ShapeObject]) -> list[tuple[str, str, str]]:
    """(comparison, word a, word b) for every pair of singly named objects (both by colour or both by shape) that
    differ along the comparison's axis."""
    references = unique_references(scene)
    options = []
    for group in ([w for w in references if w in COLOURS], [w for w in references if w in SHAPES]):
        for a in group:
            for b in group:
                for comparison, (axis, _) in COMPARISONS.items():
                    oa, ob = references[a], references[b]
                    if a != b and (oa.row, oa.col)[axis] != (ob.row, ob.col)[axis]:
                        options.append((comparison, a, b))
    return options


def compare_question(scene: list[ShapeObject], rng: random.Random) -> Question:
    comparison, a, b = rng.choice(compare_options(scene))
    question = f"which is {comparison} , {reference_phrase(a)} or {reference_phrase(b)} ?"
    return Question("compare", question, answer(scene, question))


QUESTION_MAKERS = {"cell": cell_question, "count": count_question, "compare": compare_question}


def _compared(scene: list[ShapeObject], words: list[str]) -> tuple[ShapeObject, ShapeObject, str]:
    """The two objects of a comparison question and its comparison, from the question's words."""
    comparison = " ".join(words[2 : words.index(",")])
    rest = " ".join(words[words.index(",") + 1 :]).split(" or ")
    names = [phrase.split()[1] for phrase in rest]  # "the red shape" / "the circle" -> "red" / "circle"
    references = unique_references(scene)
    return references[names[0]], references[names[1]], comparison


def answer(scene: list[ShapeObject], question: str) -> str:
    """Recompute the answer of a question from the scene (an independent check of the generator)."""
    words = question.rstrip(" ?").split()
    if words[:3] == ["what", "is", "in"]:
        row, col = ROW_WORDS.index(words[4]), int(words[6]) - 1
        return next((o.name for o in scene if (o.row, o.col) == (row, col)), EMPTY_ANSWER)
    if words[:2] == ["how", "many"]:
        target = words[2]
        return str(sum(o.colour == target or f"{o.shape}s" == target for o in scene))
    if words[:2] == ["which", "is"]:
        a, b, comparison = _compared(scene, words)
        axis, sign = COMPARISONS[comparison]
        picked = a if ((a.row, a.col)[axis] - (b.row, b.col)[axis]) * sign > 0 else b
        return picked.colour if a.colour in question else picked.shape
    raise ValueError(f"not a shapes question: {question!r}")


def referents(scene: list[ShapeObject], question: str) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """The cells (row, col) a question is about: (the asked cell / the counted objects / the object a comparison picks,
    the other compared object)."""
    words = question.rstrip(" ?").split()
    if words[:3] == ["what", "is", "in"]:
        return {(ROW_WORDS.index(words[4]), int(words[6]) - 1)}, set()
    if words[:2] == ["how", "many"]:
        target = words[2]
        return {(o.row, o.col) for o in scene if o.colour == target or f"{o.shape}s" == target}, set()
    if words[:2] == ["which", "is"]:
        a, b, _ = _compared(scene, words)
        picked, other = (a, b) if answer(scene, question) in (a.colour, a.shape) else (b, a)
        return {(picked.row, picked.col)}, {(other.row, other.col)}
    raise ValueError(f"not a shapes question: {question!r}")


def generate(split: str, index: int, seed: int = 0, *, questions: int = 1) -> tuple[list[ShapeObject], list[Question]]:
    """Scene and questions of example `index` of a split. The first question's kind cycles through KINDS, so a split
    is balanced; with `questions > 1` (training) more questions about the same image follow, of random kinds."""
    rng = example_rng(seed, split, index)
    kinds = [KINDS[index % len(KINDS)]] + [rng.choice(KINDS) for _ in range(questions - 1)]
    kinds = kinds[:questions]
    scene = sample_scene(rng)
    while "compare" in kinds and not compare_options(scene):
        scene = sample_scene(rng)
    return scene, [QUESTION_MAKERS[kind](scene, rng) for kind in kinds]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "kind": datasets.Value("string"),
        "scene": datasets.Value("string"),  # JSON list of objects (colour, shape, row, col, size, dx, dy)
        "index": datasets.Value("int32"),
    }
)


def _rows(split: str, n: int, seed: int) -> Iterator[dict]:
    for index in range(n):
        scene, (question,) = generate(split, index, seed)
        yield {
            "image": {"bytes": png_bytes(render(scene)), "path": None},
            "question": question.question,
            "answer": question.answer,
            "kind": question.kind,
            "scene": json.dumps([asdict(o) for o in scene]),
            "index": index,
        }


def build_split(split: str, n: int | None = None, seed: int = 0) -> datasets.Dataset:
    """The first `n` examples (default: the split's standard size) of a split, as a `datasets.Dataset`."""
    n = SPLIT_SIZES.get(split, 0) if n is None else n
    if n <= 0:
        raise ValueError(f"split '{split}' needs a size: pass n (standard sizes: {SPLIT_SIZES})")
    return datasets.Dataset.from_list(list(_rows(split, n, seed)), features=FEATURES, split=split)


def shapes_dataset(sizes: dict[str, int] | None = None, seed: int = 0) -> datasets.DatasetDict:
    """All splits (default sizes: SPLIT_SIZES) as a DatasetDict, ready for `save_to_disk`."""
    sizes = SPLIT_SIZES if sizes is None else sizes
    return datasets.DatasetDict({split: build_split(split, n, seed) for split, n in sizes.items()})


def cache_dir() -> Path:
    root = os.environ.get("PROXYV_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "proxyv"
    return Path(root) / "shapes"


def load_shapes(
    split: str = "test", n: int | None = None, seed: int = 0, *, cache: Path | None = None
) -> datasets.Dataset:
    """A split, built once and then loaded from the cache (`$PROXYV_CACHE/shapes`, default ~/.cache/proxyv/shapes)."""
    n = SPLIT_SIZES.get(split, 0) if n is None else n
    folder = Path(cache or cache_dir()) / f"{TASK_VERSION}-seed{seed}-{split}-{n}"
    if not (folder / "dataset_info.json").is_file():
        dataset = build_split(split, n, seed)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        dataset.save_to_disk(str(tmp))
        try:
            tmp.rename(folder)  # atomic; another process may have finished first
        except OSError:
            shutil.rmtree(tmp)
    return datasets.load_from_disk(str(folder))
