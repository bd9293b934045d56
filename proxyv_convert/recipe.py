"""The resolved recipe (`recipe.yaml`) saved with every model: what was run, on what, with which versions.

A recipe is a YAML mapping of sections. A header comment gives the exact command that produced it. `convert`
writes `model`, `proxyv` and `provenance`; later steps (distill, eval, bench, push) read the recipe, add their own
section and their command, and write it back. Sections are always written in `SECTIONS` order, so the file reads
like the pipeline.
"""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .errors import ProxyVError

RECIPE_FILE = "recipe.yaml"
SECTIONS = ("model", "proxyv", "distill", "eval", "bench", "push", "provenance")


def provenance() -> dict[str, str]:
    """Versions and time of the current run."""
    import torch
    import transformers

    return {
        "proxyv_version": __version__,
        "transformers_version": str(transformers.__version__),
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def dump_recipe(sections: dict[str, dict[str, Any]], commands: list[str]) -> str:
    """YAML text of a recipe: one header comment line per command, then the sections in pipeline order."""
    unknown = set(sections) - set(SECTIONS)
    assert not unknown, f"unknown recipe sections {sorted(unknown)}; known: {SECTIONS}"
    header = "".join(f"# {command}\n" for command in commands)
    ordered = {name: sections[name] for name in SECTIONS if name in sections}
    return header + yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False)


def write_recipe(folder: Path, sections: dict[str, dict[str, Any]], commands: list[str]) -> Path:
    path = Path(folder) / RECIPE_FILE
    path.write_text(dump_recipe(sections, commands))
    return path


def read_recipe(folder: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(sections, header commands) of a model folder's recipe."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        raise ProxyVError(f"{folder} has no {RECIPE_FILE}; is it a folder written by `proxyv convert`?")
    text = path.read_text()
    try:
        sections = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ProxyVError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    commands = [line[2:] for line in itertools.takewhile(lambda line: line.startswith("# "), text.splitlines())]
    return sections, commands

