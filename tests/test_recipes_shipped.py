"""The recipes that ship with proxyv."""

from test_run import cli

from proxyv_convert.config import load_recipe, shipped_recipes


def test_every_shipped_recipe_validates():
    shipped = shipped_recipes()
    assert {"llava-shapes", "llava-1.5-7b", "llava-1.5-13b", "llava-next-7b"} <= set(shipped)
    for name, path in shipped.items():
        recipe, _ = load_recipe(name)
        assert recipe.stages()[:2] == ["convert", "distill"], name
        assert path.read_text().startswith(f"# proxyv run {name}"), "the header gives the exact command"
    result = cli("validate", "llava-shapes")
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "checked against builtin:llava-shapes" in result.stdout
