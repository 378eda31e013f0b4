"""Rewrite the docs' generated blocks: the README's options table, docs/methods.md's table and docs/performance.md's
measured figures, from their one source each (the option declarations, the method registry, docs/bench/*.json)."""

from __future__ import annotations

import sys
from pathlib import Path

from camtools.docs import regenerate

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    changed = regenerate(ROOT)
    print("rewrote " + ", ".join(str(path.relative_to(ROOT)) for path in changed) if changed else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
