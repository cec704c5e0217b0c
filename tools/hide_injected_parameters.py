"""Tag the cells papermill injected (``injected-parameters``) with ``hide-input`` in executed notebooks.

The book shows a collapsed "Show code cell source" for them instead of the raw parameter assignments; the
values stay one click away, as the record of what the page was run with. Usage:
``python tools/hide_injected_parameters.py NOTEBOOK.ipynb ...`` (notebooks are rewritten in place).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

TAG, HIDE = "injected-parameters", "hide-input"


def hide_injected(path: Path) -> int:
    """Add :data:`HIDE` to every cell tagged :data:`TAG` of the notebook at ``path``; returns how many changed."""
    nb = nbformat.read(path, as_version=4)
    changed = 0
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if TAG in tags and HIDE not in tags:
            tags.append(HIDE)
            changed += 1
    if changed:
        nbformat.write(nb, path)
    return changed


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        hide_injected(Path(arg))
