"""The notebooks run from top to bottom (nbclient, ``notebooks/`` as the working directory) and
are stored without outputs. Their own ``assert`` cells check the answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def stored_outputs(path: Path) -> list[str]:
    """Cells of a notebook that carry outputs or execution counts (``[]`` when clean)."""
    cells = json.loads(path.read_text())["cells"]
    return [f"{path.name} cell {k}" for k, cell in enumerate(cells)
            if cell.get("outputs") or cell.get("execution_count") is not None]


def test_notebooks_exist() -> None:
    assert {"01-quickstart.ipynb", "02-s3-nitf-rpc.ipynb", "03-models.ipynb", "04-scale.ipynb"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_has_no_outputs(name: str) -> None:
    assert stored_outputs(NOTEBOOKS / name) == []


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # The kernel inherits this environment: outputs go to tmp_path, small sizes for the test,
    # and no AWS settings of the machine leak in (02 sets its own for a local moto server).
    monkeypatch.setenv("MODEL_RUNNER_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("MODEL_RUNNER_SCALE_SIZE", "4096")
    if name.startswith("02"):
        if not (SHARED_DATA / "nitf/jitc/i_3001a.ntf").exists():
            pytest.skip("needs ../shared/data (shared test data not present)")
        monkeypatch.setenv("MODEL_RUNNER_SHARED_DATA", str(SHARED_DATA))
    for name_ in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name_, raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # "python3" is ipykernel's native kernel: jupyter_client runs it with this interpreter
    # (the venv), whether or not a kernelspec is installed.
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=240,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name}: {str(exc).strip().splitlines()[-1]}\n{exc}")
    errors = [o for cell in notebook.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
