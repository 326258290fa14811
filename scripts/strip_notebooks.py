"""Remove outputs and execution counts from notebooks (they are stored without outputs)."""

from __future__ import annotations

import sys

import nbformat

for path in sys.argv[1:]:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)
    print(f"stripped {path}")
