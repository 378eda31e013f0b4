"""The docs: every generated block equals what its one source generates, the README stays a front door, and every
relative link resolves."""

from __future__ import annotations

import re

import pytest

from camserve.api import OPTIONS
from camserve.cam import METHODS
from camtools.docs import OPTIONS_END, OPTIONS_START, block_in, generated_blocks
from tests.conftest import ROOT


@pytest.mark.parametrize("index", range(3))
def test_each_generated_block_equals_its_source(index):
    path, start, end, block = generated_blocks(ROOT)[index]
    assert block_in(path, start, end) == block, f"rerun: python scripts/docs.py ({path.name} is stale)"


def test_the_readme_options_table_lists_every_option_and_every_method():
    table = block_in(ROOT / "README.md", OPTIONS_START, OPTIONS_END)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [option.name for option in OPTIONS]
    method_row = next(row for row in rows if row.startswith("| `method`"))
    assert all(f"`{name}`" in method_row for name in METHODS)


def test_the_readme_counts_the_registered_methods():
    readme = (ROOT / "README.md").read_text()
    assert f"one of {len(METHODS)} methods of its family" in readme and f"the {len(METHODS)} methods" in readme


def test_the_methods_table_lists_every_registered_method_with_its_cost():
    from camtools.bench import COSTS_END, COSTS_START

    rows = [line for line in block_in(ROOT / "docs" / "methods.md", COSTS_START, COSTS_END).splitlines()]
    rows = [row for row in rows if row.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(METHODS)
    costs = {row.split("`")[1]: row.rstrip(" |").rsplit("| ", 1)[1] for row in rows}
    over_budget = {"sess": 245, "sscam": 2241, "iscam": 641}  # passes per image, over the default budget of 100
    assert {name: cost for name, cost in costs.items() if not cost[0].isdigit()} == {
        name: f"not timed: {passes} passes" for name, passes in over_budget.items()
    }
    assert costs["legrad"].endswith(" on ViT-B/16, at its last block")  # vision transformers only


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for heading in ("## Requirements", "## Two commands", "## Authentication", "## Requests", "### Errors"):
        assert heading in readme
    for doc in ("methods", "faithfulness", "models", "performance", "reliability", "kserve", "tools", "development"):
        assert f"(docs/{doc}.md)" in readme
    assert "original script" not in readme and "224×224" not in readme


@pytest.mark.parametrize(
    "path", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
)
def test_every_relative_link_resolves(path):
    text = (ROOT / path).read_text()
    base = (ROOT / path).parent
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):
        assert (base / target).exists(), f"{path} links to {target}, which does not exist"


def test_the_layout_names_every_module():
    layout = (ROOT / "docs" / "development.md").read_text()
    for package in ("camserve", "camtools"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "__init__.py":
                assert path.name in layout, f"docs/development.md's layout misses {path.relative_to(ROOT)}"


def test_the_labels_default_the_docs_give_is_the_builds():
    """ImageNet's names are the default of a single-label model of 1000 classes only: a multi-label one of 1000
    outputs gets class_0, ..., and the README and the build's help say so."""
    from camtools.models import prepare_model

    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `--labels FILE`"))
    assert "ImageNet's for a single-label (multiclass) model of 1000 classes" in row
    multilabel = prepare_model(arch="resnet18", weights="random", task="multilabel", progress=False)
    multiclass = prepare_model(arch="resnet18", weights="random", progress=False)
    assert multilabel.spec.labels[:2] == ("class_0", "class_1") and multiclass.spec.labels[281] == "tabby"
