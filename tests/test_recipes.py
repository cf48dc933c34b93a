"""Every YAML under recipes/, found recursively, loads through the real loader."""

from pathlib import Path

import pytest

from ppow_plugin.config import load_config

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_loads(path):
    cfg = load_config(path)
    text = path.read_text()
    assert text.startswith("#"), "each recipe opens with a comment block saying how to launch it"
    assert "ppow " in text.split("\n\n")[0], "the opening comment names the launch command"
    assert cfg.stage in ("sft", "ppow")
