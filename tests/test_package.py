"""The package's shape: no import loops (at any depth, function-level imports included), and every model type is
named only in the family entries and the remote model code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "proxyv_convert"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The package modules `path` imports anywhere in its code (function-level imports included)."""
    name = module_name(path)
    package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parents = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join(parents + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import module`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module in MODULES and module != name}


def test_no_import_loops():
    graph = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for following in sorted(graph[node]):
            assert following not in path, "import loop: " + " -> ".join([*path[path.index(following):], following])
            if following not in done:
                visit(following, [*path, following])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    assert "proxyv_convert.config" in graph["proxyv_convert.distill"]  # the graph is read, not empty


def test_model_types_are_named_only_by_the_family_entries():
    """Pipeline modules ask `families.FAMILIES`; adding a family touches families.py and remote/ only."""
    # vllm_model.py holds vLLM's counterpart of the remote classes, one per family (named by `Family.vllm`).
    allowed = {PACKAGE / "families.py", PACKAGE / "vllm_model.py"} | set((PACKAGE / "remote").glob("*.py"))
    pattern = re.compile(r"""["'](proxyv_)?llava(_next|_onevision|_next_video)?["']|image_sizes|LlavaNext|Onevision"""
                         r"""|pixel_values_videos|video_token""")
    offenders = [f"{p.relative_to(PACKAGE)}:{n}" for p in PACKAGE.rglob("*.py") if p not in allowed
                 and "shapes" not in p.parts
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and not line.lstrip().startswith(("#", '"""'))]
    assert not offenders, offenders
