"""The docs' generated blocks: the README's options table (from the option declarations), docs/methods.md's table
(from the method registry and a benchmark run) and docs/performance.md's measured figures. ``python scripts/docs.py``
rewrites them; tests check that each equals what its source generates."""

from __future__ import annotations

from pathlib import Path

from camserve.api.options import options_table
from camtools.bench import (
    COSTS_END,
    COSTS_START,
    FIGURES_END,
    FIGURES_START,
    methods_table,
    readme_figures,
    replace_readme_block,
)

__all__ = ["OPTIONS_END", "OPTIONS_START", "generated_blocks", "readme_options", "regenerate"]

OPTIONS_START = "<!-- options:start"
OPTIONS_END = "<!-- options:end -->"


def readme_options() -> str:
    """The README's options block, from :data:`camserve.api.options.OPTIONS`."""
    return "\n".join(
        [f"{OPTIONS_START} (generated from camserve/api/options.py by `python scripts/docs.py`) -->", options_table()]
        + [OPTIONS_END]
    )


def generated_blocks(root: Path) -> list[tuple[Path, str, str, str]]:
    """Each generated block: (file, start marker, end marker, its text now)."""
    return [
        (root / "README.md", OPTIONS_START, OPTIONS_END, readme_options()),
        (root / "docs" / "methods.md", COSTS_START, COSTS_END, methods_table(root)),
        (root / "docs" / "performance.md", FIGURES_START, FIGURES_END, readme_figures(root)),
    ]


def block_in(path: Path, start_marker: str, end_marker: str) -> str:
    text = path.read_text()
    start, end = text.index(start_marker), text.index(end_marker) + len(end_marker)
    return text[start:end]


def regenerate(root: Path) -> list[Path]:
    """Rewrite every generated block; return the files that changed."""
    changed = []
    for path, start, end, block in generated_blocks(root):
        text = path.read_text()
        new = replace_readme_block(text, start, end, block)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed
