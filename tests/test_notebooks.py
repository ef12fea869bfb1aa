"""The notebooks in notebooks/ run top to bottom in fast mode (CI=true), without errors.

Each one executes in a fresh ``python3`` kernel whose working directory is a temporary
copy, so the committed outputs and the figures in docs/ are left alone (fast runs do
not save figures). About two minutes in all on 2 CPU cores.
"""
import pathlib
import shutil

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _errors(nb):
  return [f"{o.get('ename')}: {o.get('evalue')}"
          for c in _code_cells(nb) for o in c.get("outputs", [])
          if o.get("output_type") == "error"]


def _docs_snapshot():
  docs = ROOT / "docs"
  return {p.name: p.stat().st_mtime_ns for p in docs.glob("*")} if docs.is_dir() else {}


def test_there_are_notebooks():
  names = [p.stem for p in NOTEBOOKS]
  assert len(names) >= 6, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_sets_up_colab_and_devices(path):
  first = _code_cells(nbformat.read(path, as_version=4))[0].source
  for needle in ('"google.colab" in sys.modules', "JAXGC_REPO_URL", "set_cpu_device_count(8)",
                 'os.environ.get("CI") == "true"'):
    assert needle in first, f"{path.name}: first code cell lacks {needle!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_outputs_and_no_errors(path):
  nb = nbformat.read(path, as_version=4)
  assert all(c.get("outputs") for c in _code_cells(nb)[:1]), f"{path.name} was committed unexecuted"
  assert not _errors(nb), f"{path.name} was committed with errors: {_errors(nb)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_in_fast_mode(path, tmp_path, monkeypatch):
  monkeypatch.setenv("CI", "true")
  monkeypatch.setenv("JAXGC_ROOT", str(ROOT))
  monkeypatch.delenv("JAXGC_FIG_DIR", raising=False)
  # conftest.py asks for 8 CPU devices through XLA_FLAGS; the notebook must do it itself.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  copy = tmp_path / path.name
  shutil.copy(path, copy)
  nb = nbformat.read(copy, as_version=4)
  before = _docs_snapshot()
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()   # raises CellExecutionError, naming the cell, on the first error
  assert not _errors(nb)
  setup_out = "".join(o.get("text", "") for o in _code_cells(nb)[0].outputs)
  assert "fast mode: True" in setup_out, setup_out
  assert "8 cpu device(s)" in setup_out or "cpu" not in setup_out, setup_out
  # It ends with conclusions printed from its own numbers, and wrote nothing to docs/.
  assert any(o.get("output_type") == "stream" and o.get("text", "").strip()
             for o in _code_cells(nb)[-1].outputs), f"{path.name}: last code cell printed nothing"
  assert _docs_snapshot() == before, "a fast run must not overwrite docs/"
